"""`export`: our runs read by parsers written the way the references read their answer files.

`specbench_speed` follows Spec-Bench's evaluation/speed.py (per question: sum of new_tokens /
sum of wall_time; accept_lengths flattened; speedup = mean speed / mean baseline speed; its
baseline token count comes from a tokenizer there, from new_tokens here). `mmspec_turns` and
friends follow how MMSpec's result readers walk choices[0] turn by turn (new_tokens,
wall_time, acceptance_length per turn). The numbers they recompute must be the report's.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from mmspec.reports.commands import export
from mmspec.reports.export import export_run
from mmspec.reports.metrics import cell_metrics, load_rows
from tests.test_compare import MODEL, TOPICS, make_rows, write_run

# Both references name answer files <model id>-temperature-<t>.jsonl.
FILE_RE = re.compile(r"^(?P<name>.+)-temperature-(?P<temp>[^-]+)\.jsonl$")
SPECBENCH_KEYS = {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
SPECBENCH_CHOICE = {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}
MMSPEC_KEYS = {"question_id", "topic", "category", "answer_id", "model_id", "choices", "tstamp"}
MMSPEC_CHOICE = {
    "index",
    "turns",
    "idxs",
    "new_tokens",
    "wall_time",
    "acceptance_length",
    "draft_time",
    "target_time",
}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- Spec-Bench


def specbench_speed(path: Path, base_path: Path, task: str = "overall") -> dict[str, float]:
    def load(p: Path) -> list[dict[str, Any]]:
        data = read_jsonl(p)
        return data if task == "overall" else [d for d in data if d["category"] == task]

    speeds, accept_lengths, tokens_all, times_all = [], [], 0, 0.0
    for d in load(path):
        tokens = sum(d["choices"][0]["new_tokens"])
        times = sum(d["choices"][0]["wall_time"])
        accept_lengths.extend(d["choices"][0]["accept_lengths"])
        speeds.append(tokens / times)
        tokens_all, times_all = tokens_all + tokens, times_all + times
    speeds0, base_times = [], 0.0
    for d in load(base_path):
        tokens = sum(d["choices"][0]["new_tokens"])
        times = sum(d["choices"][0]["wall_time"])
        speeds0.append(tokens / times)
        base_times += times
    return {
        "mean_accepted_tokens": mean(accept_lengths),
        "speedup_ratio": mean(speeds) / mean(speeds0),
        "tokens_per_s": tokens_all / times_all,
        "time_ratio": base_times / times_all,
    }


# ----------------------------------------------------------------------------- MMSpec


def mmspec_turns(path: Path) -> list[dict[str, Any]]:
    """One dict per (sample, turn), as MMSpec's readers walk choices[0]."""
    rows = []
    for r in read_jsonl(path):
        c = r["choices"][0]
        for t in range(len(c["new_tokens"])):
            rows.append(
                {
                    "qid": r["question_id"],
                    "topic": r["topic"],
                    "turn": t,
                    "new_tokens": int(c["new_tokens"][t]),
                    "wall_time": float(c["wall_time"][t]),
                    "accept": c["acceptance_length"][t],
                    "idx": int(c["idxs"][t]),
                }
            )
    return rows


def mmspec_mat(rows: list[dict[str, Any]]) -> float:
    """Mean of the per-step acceptance lengths (bonus excluded): MMSpec's MAT."""
    values = [v for r in rows for v in r["accept"]]
    return sum(values) / len(values)


def mmspec_speedup(method: list[dict[str, Any]], base: list[dict[str, Any]], mode: str) -> float:
    if mode == "global":

        def tp(rs: list[dict[str, Any]]) -> float:
            return sum(r["new_tokens"] for r in rs) / sum(r["wall_time"] for r in rs)

        return tp(method) / tp(base)
    by_key = {(r["qid"], r["turn"]): r for r in base}
    ratios = []
    for r in method:
        b = by_key[(r["qid"], r["turn"])]
        ratios.append((r["new_tokens"] / r["wall_time"]) / (b["new_tokens"] / b["wall_time"]))
    return sum(ratios) / len(ratios)


# ----------------------------------------------------------------------------- tests


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run", make_rows(noise=0.05, seed=4, batch_sizes=(1, 4)))


def _metrics(run: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    frame = cell_metrics(load_rows(run))
    return {
        (r["method"], r["batch_size"], r["topic"]): r
        for r in frame.filter(pl.col("model") == MODEL).iter_rows(named=True)
    }


def _file(folder: Path, method: str, bs: int) -> Path:
    return folder / f"org--tiny-vl-{method}-bs{bs}-r0-temperature-0.0.jsonl"


def test_specbench_round_trip(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "specbench"
    result = CliRunner().invoke(export, [str(run), "--format", "specbench", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        _file(out, m, bs).name for m in ("ar", "pld") for bs in (1, 4)
    )
    metrics = _metrics(run)
    for bs in (1, 4):
        method, base = _file(out, "pld", bs), _file(out, "ar", bs)
        for task, topic in [("overall", "all"), *((t, t) for t in TOPICS)]:
            got = specbench_speed(method, base, task)
            want = metrics[("pld", bs, topic)]
            # Spec-Bench's MAT counts the bonus token.
            assert got["mean_accepted_tokens"] == pytest.approx(want["MAT_with_bonus"], rel=1e-12)
            assert got["tokens_per_s"] == pytest.approx(want["tokens_per_s"], rel=1e-12)
            assert got["time_ratio"] == pytest.approx(want["speedup_global"], rel=1e-12)
            # speed.py's own speedup (mean of per-question speeds) from the rows themselves.
            assert got["speedup_ratio"] == pytest.approx(_speed_py_reference(run, bs, topic))


def _speed_py_reference(run: Path, bs: int, topic: str) -> float:
    frame = load_rows(run).filter(pl.col("batch_size") == bs).collect()
    speeds: dict[str, list[float]] = defaultdict(list)
    per_sample: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in frame.iter_rows(named=True):
        if topic == "all" or r["topic"] == topic:
            acc = per_sample[(r["method"], r["sample_id"])]
            acc[0] += r["new_tokens"]
            acc[1] += r["total_s"]
    for (method, _), (tokens, time) in per_sample.items():
        speeds[method].append(tokens / time)
    return mean(speeds["pld"]) / mean(speeds["ar"])


def test_specbench_layout(run: Path, tmp_path: Path) -> None:
    export_run(run, "specbench", tmp_path / "sb")
    records = read_jsonl(_file(tmp_path / "sb", "pld", 1))
    assert [r["question_id"] for r in records] == [f"q{i:03d}" for i in range(40)]
    for r in records:
        assert set(r) == SPECBENCH_KEYS | {"subcategory"}
        assert set(r["choices"][0]) == SPECBENCH_CHOICE
        assert r["model_id"] == "org--tiny-vl-pld-bs1-r0-temperature-0.0"
    two_turns = records[0]["choices"][0]
    assert two_turns["turns"] == ["answer q000 turn 0", "answer q000 turn 1"]
    assert two_turns["new_tokens"] == [30, 35]
    # One entry per verification step over both turns, each counting the bonus token.
    assert len(two_turns["accept_lengths"]) == sum(two_turns["decoding_steps"])
    assert sum(two_turns["accept_lengths"]) == sum(two_turns["new_tokens"])
    assert records[0]["category"] == "general vqa"
    assert records[0]["subcategory"] == "general vqa (cat)"


def test_mmspec_round_trip(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "mmspec"
    result = CliRunner().invoke(export, [str(run), "--format", "mmspec", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = _metrics(run)
    for path in out.iterdir():
        match = FILE_RE.match(path.name)
        assert match and float(match["temp"]) == 0.0, path.name
    for bs in (1, 4):
        method, base = mmspec_turns(_file(out, "pld", bs)), mmspec_turns(_file(out, "ar", bs))
        for topic in ("all", *TOPICS):
            m = [r for r in method if topic in ("all", r["topic"])]
            b = [r for r in base if topic in ("all", r["topic"])]
            want = metrics[("pld", bs, topic)]
            assert mmspec_mat(m) == pytest.approx(want["MAT"], rel=1e-12)
            assert mmspec_speedup(m, b, "global") == pytest.approx(
                want["speedup_global"], rel=1e-12
            )
            assert mmspec_speedup(m, b, "paired") == pytest.approx(
                want["speedup_paired"], rel=1e-12
            )
            assert sum(len(r["accept"]) for r in m) == want["steps"]
        assert all(len(r["accept"]) == r["idx"] for r in method)
        assert mmspec_mat(base) == 0.0  # ar accepts no draft


def test_mmspec_layout(run: Path, tmp_path: Path) -> None:
    export_run(run, "mmspec", tmp_path / "mm")
    records = read_jsonl(_file(tmp_path / "mm", "pld", 4))
    for r in records:
        assert set(r) == MMSPEC_KEYS
        assert set(r["choices"][0]) == MMSPEC_CHOICE
        c = r["choices"][0]
        assert len(c["turns"]) == len(c["acceptance_length"]) == len(c["wall_time"])
    first = records[0]
    assert (first["question_id"], first["topic"], first["category"]) == (
        "q000",
        "general vqa",
        "general vqa (cat)",
    )
    assert first["choices"][0]["turns"] == ["answer q000 turn 0", "answer q000 turn 1"]
    assert [len(a) for a in first["choices"][0]["acceptance_length"]] == first["choices"][0]["idxs"]


def test_single_file_and_stdout(run: Path, tmp_path: Path) -> None:
    target = tmp_path / "all.jsonl"
    result = export_run(run, "mmspec", target)
    assert result.files == [target]
    records = read_jsonl(target)
    assert result.records == len(records) == 4 * 40
    keys = {(r["model_id"], r["question_id"]) for r in records}
    assert len(keys) == len(records)

    cli = CliRunner().invoke(export, [str(run), "--format", "mmspec", "--out", "-"])
    assert cli.exit_code == 0
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    assert lines == records


def test_default_folder_and_reproducible(run: Path) -> None:
    first = export_run(run, "specbench")
    assert first.files and all(p.parent == run / "export" / "specbench" for p in first.files)
    before = {p: p.read_bytes() for p in first.files}
    export_run(run, "specbench")
    assert {p: p.read_bytes() for p in first.files} == before


def test_samples_with_errors_are_left_out(tmp_path: Path) -> None:
    rows = make_rows(samples=12)
    for r in rows:
        # the second turn of q000 and the only turn of q003 failed under pld
        if r.method == "pld" and (r.sample_id, r.turn) in {("q000", 1), ("q003", 0)}:
            r.status, r.error, r.total_s = "error", "CUDA out of memory", 0.0
    run = write_run(tmp_path / "err", rows)
    result = CliRunner().invoke(export, [str(run), "--format", "specbench"])
    assert result.exit_code == 0
    assert "22 records, 2 samples left out (errors)" in result.output
    pld = read_jsonl(run / "export" / "specbench" / _file(Path(), "pld", 1).name)
    assert "q000" not in {r["question_id"] for r in pld} and len(pld) == 10


def test_several_workloads_name_their_files(tmp_path: Path) -> None:
    rows = make_rows(samples=4)
    other = make_rows(samples=4)
    for r in other:
        r.workload = "mmspec-testmini"
    run = write_run(tmp_path / "two", rows + [r for r in other if r.method == "ar"])
    names = sorted(p.name for p in export_run(run, "mmspec").files)
    assert names == [
        "org--tiny-vl-ar-bs1-r0-mmspec-testmini-temperature-0.0.jsonl",
        "org--tiny-vl-ar-bs1-r0-synthetic-temperature-0.0.jsonl",
        "org--tiny-vl-pld-bs1-r0-synthetic-temperature-0.0.jsonl",
    ]


def test_unknown_format_is_refused(run: Path) -> None:
    with pytest.raises(ValueError, match="unknown export format"):
        export_run(run, "csv")
