"""`mmspec-orch import`: MMSpec and Spec-Bench answer files as a run that report, compare and
history read like one of ours.

Hand-written answer files pin each field's mapping and every way a file can be bad; our own
exports come back with the same metrics; and, where the real reference results are on disk
(../shared/data/mmspec-reference-results, never copied here), the imported run reproduces
MMSpec's own summary.csv and per-query rounds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from mmspec.cli.main import main
from mmspec.reports import answer_import as importer
from mmspec.reports import write_report
from mmspec.reports.answer_import import (
    AnswerFileError,
    ImportSettings,
    import_answers,
    mask_unrecorded,
)
from mmspec.reports.compare import compare_runs, render_comparison
from mmspec.reports.export import ExportGroup, export_run
from mmspec.reports.history import load_history
from mmspec.reports.metrics import cell_metrics, load_rows
from mmspec.results.layout import read_manifest, result_files
from mmspec.results.schema import SCHEMA_VERSION
from tests.test_compare import MODEL, make_rows, write_run

REFERENCE = Path(__file__).parents[1].parent / "shared/data/mmspec-reference-results"
LLAVA = REFERENCE / "LLaVA-1.5-7B"


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def mmspec_record(qid: str, topic: str, **choice: Any) -> dict[str, Any]:
    return {
        "question_id": qid,
        "topic": topic,
        "category": "default",
        "answer_id": "x",
        "model_id": "m",
        "choices": [{"index": 0, **choice}],
        "tstamp": 1776824481.5,
    }


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def mmspec_dir(tmp_path: Path) -> Path:
    """results/tiny-model/mmspec_testmini/ with a baseline, EAGLE, MSD and ViSpec+ViSkip file."""
    folder = tmp_path / "results" / "tiny-model" / "mmspec_testmini"
    base = dict(idxs=[9, 4], new_tokens=[10, 5], draft_time=[0.0, 0.0])
    write_jsonl(
        folder / "baseline-temperature-0.jsonl",
        [
            mmspec_record("q1", "general vqa", turns=["a b", "c"], wall_time=[1.0, 0.5], **base)
            | {"choices": [{"turns": ["a b", "c"], "wall_time": [1.0, 0.5], **base}]},
            mmspec_record("q2", "text vqa", turns=["d"], idxs=[3], new_tokens=[4], wall_time=[0.4]),
        ],
    )
    # target_time deliberately only on q1 of eagle: the file then lacks it as a whole.
    write_jsonl(
        folder / "eagle-temperature-0.jsonl",
        [
            mmspec_record(
                "q1",
                "general vqa",
                turns=["a b", "c"],
                idxs=[3, 1],
                new_tokens=[10, 5],
                wall_time=[0.5, 0.25],
                acceptance_length=[[2, 1, 3, 0], [1, 2]],
                draft_time=[0.1, 0.05],
                target_time=[0.3, 0.1],
            ),
            mmspec_record(
                "q2",
                "text vqa",
                turns=["d!"],
                idxs=[1],
                new_tokens=[4],
                wall_time=[0.2],
                acceptance_length=[[1, 1]],
                draft_time=[0.02],
            ),
        ],
    )
    write_jsonl(
        folder / "msd-temperature-0.jsonl",
        [
            mmspec_record(
                "q1",
                "general vqa",
                turns=["a b", "c"],
                idxs=[2, 1],
                new_tokens=[10, 5],
                wall_time=[0.3, 0.2],
                acceptance_length=[4.6666669845581055, 4.2],
                draft_time=[0.03, 0.02],
                target_time=[0.2, 0.1],
            ),
        ],
    )
    write_jsonl(
        folder / "vispec_vskip-temperature-0.jsonl",
        [
            mmspec_record(
                "q2",
                "text vqa",
                turns=["d"],
                idxs=[0],
                new_tokens=[4],
                wall_time=[0.1],
                acceptance_length=[[3]],
                draft_time=[0.01],
                target_time=[0.05],
            )
        ],
    )
    return folder


def rows_of(run: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    frame = load_rows(run).collect()
    return {(r["method"], r["sample_id"], r["turn"]): r for r in frame.iter_rows(named=True)}


# ----------------------------------------------------------------------------- MMSpec


def test_mmspec_fields_become_rows(mmspec_dir: Path, tmp_path: Path) -> None:
    result = import_answers([mmspec_dir], tmp_path / "runs", ImportSettings("mmspec"))
    run = result.run_dir
    assert run.parent == tmp_path / "runs" and run.name.startswith("mmspec-tiny-model-testmini-")
    assert result.rows == 3 + 3 + 2 + 1 and result.has_baseline
    rows = rows_of(run)
    ar = rows[("ar", "q1", 0)]
    # The baseline has no acceptance_length: one target forward per token (summarize_metrics).
    assert (ar["steps"], ar["accepted_tokens"], ar["accept_lengths"]) == (10, 0, None)
    assert (ar["total_s"], ar["batch_s"], ar["draft_s"]) == (1.0, 1.0, 0.0)
    assert (ar["model"], ar["workload"], ar["batch_size"], ar["repeat"]) == (
        "tiny-model",
        "testmini",
        1,
        0,
    )
    assert ar["topic"] == "general vqa" and ar["category"] == "default"
    eagle = rows[("eagle", "q1", 1)]
    assert (eagle["steps"], eagle["accepted_tokens"], eagle["accept_lengths"]) == (2, 3, [1, 2])
    assert (eagle["draft_s"], eagle["verify_s"], eagle["total_s"]) == (0.05, 0.1, 0.25)
    assert eagle["output_text"] == "c" and eagle["output_sha256"] == sha("c")
    assert eagle["output_tokens"] is None and eagle["status"] == "ok"
    # Each turn is a batch of its own, numbered in file order.
    assert [rows[("eagle", q, t)]["batch_index"] for q, t in [("q1", 0), ("q1", 1), ("q2", 0)]] == [
        0,
        1,
        2,
    ]
    # MSD records one mean per turn: its rounds are idxs, accepted = mean x rounds, rounded.
    msd = rows[("msd", "q1", 0)]
    assert (msd["steps"], msd["accepted_tokens"], msd["accept_lengths"]) == (2, 9, None)
    assert rows[("msd", "q1", 1)]["accepted_tokens"] == 4
    assert ("viskip+vispec", "q2", 0) in rows

    manifest = read_manifest(run)
    assert manifest["run_id"] == run.name and manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["grid"]["methods"][0] == "ar"
    assert set(manifest["grid"]["methods"]) == {"ar", "eagle", "msd", "viskip+vispec"}
    assert manifest["started_at"].startswith("2026-04-22")  # the earliest answer's tstamp
    assert manifest["environment"] == {
        "source": "stated",
        "cpu": None,
        "cpu_cores": None,
        "memory_bytes": None,
        "gpus": [],
        "gpu_driver": None,
        "cuda_driver": None,
    }
    files = {f["method"]: f for f in manifest["imported"]["files"]}
    assert files["ar"]["name"] == "baseline" and files["ar"]["records"] == 2
    assert files["eagle"]["sha256"] == sha((mmspec_dir / "eagle-temperature-0.jsonl").read_text())
    assert "verify_s" in files["eagle"]["not_recorded"]  # q2 has no target_time
    assert "verify_s" not in files["msd"]["not_recorded"]
    assert "skipped_steps" in files["viskip+vispec"]["not_recorded"]
    assert "skipped_steps" not in files["eagle"]["not_recorded"]
    # Nothing but the run folder is left in the results root (no temp folder).
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]


def test_report_of_an_imported_run(mmspec_dir: Path, tmp_path: Path) -> None:
    run = import_answers(
        [mmspec_dir], tmp_path, ImportSettings("mmspec", gpus=("Test GPU",))
    ).run_dir
    report = write_report(run).read_text()
    assert "## Imported run" in report and "`baseline` as `ar`" in report
    assert "| msd | msd | 0 | 1 | 2 | 0 | prompt_tokens, drafted_tokens, prefill_s, commit_s |" in (
        report
    )
    assert "| GPUs | Test GPU |" in report
    metrics = pl.read_ipc(run / "metrics.arrow").filter(pl.col("topic") == "all")
    by_method = {r["method"]: r for r in metrics.iter_rows(named=True)}
    # What the files do not hold is null (shown as –), never a measured zero.
    for column in ("prefill_s_mean", "commit_s_mean", "accept_rate", "drafted_tokens"):
        assert all(r[column] is None for r in by_method.values()), column
    assert by_method["eagle"]["verify_s_mean"] is None  # the file lacks target_time in part
    assert by_method["msd"]["verify_s_mean"] == pytest.approx(0.15)
    assert by_method["msd"]["draft_s_mean"] == pytest.approx(0.025)
    assert by_method["viskip+vispec"]["skipped_steps"] is None
    assert by_method["eagle"]["skipped_steps"] == 0
    # MAT is MMSpec's draft_accept_mean: (6 + 3 + 2) drafts over (4 + 2 + 2) rounds.
    assert by_method["eagle"]["MAT"] == pytest.approx(11 / 8)
    # Lossless compares answer texts: q2's "d!" differs from the baseline's "d".
    assert by_method["eagle"]["lossless"] == pytest.approx(2 / 3)
    assert by_method["ar"]["speedup_global"] == 1.0
    assert by_method["eagle"]["speedup_global"] == pytest.approx(1.9 / 0.95)
    html = (run / "report.html").read_text()
    assert 'id="imported"' in html and "Test GPU" in html


def test_msd_means_give_mmspecs_draft_accept_mean_exactly(mmspec_dir: Path, tmp_path: Path) -> None:
    """Rows hold MSD's mean x rounds as whole tokens; the manifest keeps what rounding left
    out, so draft_accept_mean is summarize_metrics' sum(mean x rounds) / sum(rounds)."""
    run = import_answers([mmspec_dir], tmp_path, ImportSettings("mmspec")).run_dir
    files = {f["method"]: f for f in read_manifest(run)["imported"]["files"]}
    exact = 4.6666669845581055 * 2 + 4.2 * 1
    assert files["msd"]["accept_residue"] == {"general vqa": pytest.approx(exact - 13)}
    assert files["eagle"]["accept_residue"] == {}
    write_report(run)
    metrics = pl.read_csv(run / "metrics.csv").filter(pl.col("method") == "msd")
    for row in metrics.iter_rows(named=True):  # the topic and the pooled "all" alike
        assert row["draft_accept_mean"] == pytest.approx(exact / 3, rel=1e-12)
        assert row["MAT"] == pytest.approx(13 / 3)  # ours counts the whole tokens
        assert row["MAT_mmspec"] == pytest.approx(15 / 3)
    # ViSkip's skipped rounds are not recorded: no drafting steps to divide by
    viskip = pl.read_csv(run / "metrics.csv").filter(pl.col("method") == "viskip+vispec")
    assert viskip["drafting_steps"].null_count() == viskip.height
    assert viskip["accept_rate_pos_1"].null_count() == viskip.height


def test_mask_unrecorded_leaves_our_runs_alone(tmp_path: Path) -> None:
    run = write_run(tmp_path / "ours", make_rows(samples=10))
    metrics = cell_metrics(load_rows(run))
    assert mask_unrecorded(metrics, read_manifest(run)).equals(metrics)


# ----------------------------------------------------------------------------- Spec-Bench


def specbench_record(qid: int, category: str, **choice: Any) -> dict[str, Any]:
    return {
        "question_id": qid,
        "category": category,
        "answer_id": "x",
        "model_id": "vicuna",
        "choices": [{"index": 0, **choice}],
        "tstamp": 1700000000.0,
    }


def test_specbench_fields_become_rows(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "spec_bench" / "model_answer"
    write_jsonl(
        folder / "vicuna-vanilla-float16-temp-0.0.jsonl",
        [
            specbench_record(
                1,
                "mt_bench",
                turns=["x", "y"],
                decoding_steps=[3, 2],
                new_tokens=[3, 2],
                wall_time=[0.3, 0.2],
                accept_lengths=[1, 1, 1, 1, 1],
            ),
            specbench_record(
                2,
                "qa",
                turns=["z"],
                decoding_steps=[2],
                new_tokens=[2],
                wall_time=[0.2],
                accept_lengths=[1, 1],
            ),
            specbench_record(
                3,
                "qa",
                turns=["w", "v"],
                decoding_steps=[1, 1],
                new_tokens=[1, 1],
                wall_time=[0.1, 0.1],
                accept_lengths=[1, 1],
            ),
        ],
    )
    write_jsonl(
        folder / "vicuna-pld-float16-temperature-0.0.jsonl",
        [
            # Split by decoding_steps, which add up to the flat list.
            specbench_record(
                1,
                "mt_bench",
                turns=["x", "y"],
                decoding_steps=[2, 1],
                new_tokens=[3, 2],
                wall_time=[0.1, 0.1],
                accept_lengths=[2, 1, 2],
            ),
            # One turn: the whole list, whatever the reported steps (PLD reports tokens - 1).
            specbench_record(
                2,
                "qa",
                turns=["z"],
                idxs=[1],
                new_tokens=[2],
                wall_time=[0.1],
                accept_lengths=[2],
            ),
            # Two turns that cannot be placed; the second turn errored.
            specbench_record(
                3,
                "qa",
                turns=["w", "ERROR"],
                decoding_steps=[1, 2],
                new_tokens=[4, 1],
                wall_time=[0.05, 0.05],
                accept_lengths=[2, 2],
            )
            | {"subcategory": "open qa"},
        ],
    )
    result = import_answers(
        [folder],
        tmp_path / "runs",
        ImportSettings(
            "specbench",
            model="vicuna-7b",
            baseline="vicuna-vanilla-float16",
            renames={"vicuna-pld-float16": "pld"},
        ),
    )
    assert result.run_dir.name.startswith("specbench-vicuna-7b-spec_bench-")
    rows = rows_of(result.run_dir)
    assert rows[("ar", "1", 1)]["steps"] == 2 and rows[("ar", "1", 1)]["accepted_tokens"] == 0
    first = rows[("pld", "1", 0)]
    assert (first["steps"], first["accepted_tokens"], first["accept_lengths"]) == (2, 1, [1, 0])
    assert rows[("pld", "1", 1)]["accept_lengths"] == [1]
    assert rows[("pld", "2", 0)]["steps"] == 1 and rows[("pld", "2", 0)]["accept_lengths"] == [1]
    unplaced = rows[("pld", "3", 0)]
    assert (unplaced["steps"], unplaced["accepted_tokens"], unplaced["accept_lengths"]) == (
        1,
        3,
        None,
    )
    assert unplaced["topic"] == "qa" and unplaced["category"] == "open qa"
    assert rows[("pld", "1", 0)]["category"] == "mt_bench"
    errored = rows[("pld", "3", 1)]
    assert errored["status"] == "error" and "ERROR" in errored["error"]
    info = read_manifest(result.run_dir)["imported"]
    pld = next(f for f in info["files"] if f["method"] == "pld")
    assert (pld["unplaced_turns"], pld["error_rows"]) == (2, 1)
    assert {"draft_s", "verify_s"} <= set(pld["not_recorded"])
    report = write_report(result.run_dir).read_text()
    assert "2 turn(s) of multi-turn samples could not be given their per-step lengths" in report
    assert "Error rows: 1." in report.splitlines()[0]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["mmspec", "specbench"])
def test_our_export_comes_back_with_the_same_metrics(fmt: str, tmp_path: Path) -> None:
    run = write_run(tmp_path / "ours", make_rows(noise=0.05, seed=3))
    out = tmp_path / "export"
    export_run(run, fmt, out)
    names = {
        m: ExportGroup(MODEL, m, 1, 0.0, 0, "synthetic").model_id(False) for m in ("ar", "pld")
    }
    imported = import_answers(
        [out],
        tmp_path / "runs",
        ImportSettings(
            fmt,
            model=MODEL,
            workload="synthetic",
            baseline=names["ar"].removesuffix("-temperature-0.0"),
            renames={names["pld"].removesuffix("-temperature-0.0"): "pld"},
        ),
    ).run_dir
    before = {
        (r["method"], r["topic"]): r for r in cell_metrics(load_rows(run)).iter_rows(named=True)
    }
    after = {
        (r["method"], r["topic"]): r
        for r in cell_metrics(load_rows(imported)).iter_rows(named=True)
    }
    assert before.keys() == after.keys()
    same = [
        "samples",
        "new_tokens",
        "steps",
        "accepted_tokens",
        "MAT",
        "MAT_with_bonus",
        "tokens_per_s",
        "latency_p50_s",
        "latency_p90_s",
        "paired_keys",
        "speedup_global",
        "speedup_paired",
        "lossless",
    ]
    if fmt == "mmspec":
        same.append("draft_s_mean")
    for key, want in before.items():
        got = after[key]
        for column in same:
            assert got[column] == pytest.approx(want[column], rel=1e-12), (key, column)
        if fmt == "mmspec":  # MMSpec's target_time is our prefill + verify
            assert got["verify_s_mean"] == pytest.approx(
                want["prefill_s_mean"] + want["verify_s_mean"], rel=1e-12
            )


# ----------------------------------------------------------------------------- bad input


def _good(qid: str = "q1") -> dict[str, Any]:
    return mmspec_record(
        qid,
        "general vqa",
        turns=["a", "b"],
        idxs=[1, 1],
        new_tokens=[3, 2],
        wall_time=[0.1, 0.1],
        acceptance_length=[[1, 0], [0, 1]],
    )


def _with_choice(**changes: Any) -> dict[str, Any]:
    """The second record, its choice changed (a None value drops the key)."""
    record = _good("q2")
    choice = record["choices"][0]
    choice.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del choice[key]
    return record


BAD = [
    ("{not json", "2: invalid JSON: Expecting property name enclosed in double quotes"),
    ([1, 2], "2: record: expected a JSON object, got list"),
    ({"topic": "t", "choices": []}, "2: question_id: missing"),
    (_good("q1"), "2: question_id: 'q1' again (first on line 1)"),
    ({**_good("q2"), "choices": []}, "2: choices: expected a non-empty list, got []"),
    (_with_choice(wall_time=[0.1]), "2: choices[0].wall_time: 1 entries, but choices[0].turns"),
    (
        _with_choice(new_tokens=[3, "2"]),
        '2: choices[0].new_tokens[1]: expected an integer >= 0, got "2"',
    ),
    (_with_choice(wall_time=[0.1, -1]), "2: choices[0].wall_time[1]: expected seconds"),
    (_with_choice(turns=[]), "2: choices[0].turns: empty"),
    (
        _with_choice(acceptance_length=[[1, -1], [0]]),
        "2: choices[0].acceptance_length[0][1]: expected an integer >= 0, got -1",
    ),
    (
        _with_choice(acceptance_length=[2.5, 1.0], idxs=None),
        "2: choices[0].idxs: missing, needed with the mean in choices[0].acceptance_length[0]",
    ),
    ({**_good("q2"), "topic": 7}, "2: topic: expected a string, got int"),
]


@pytest.mark.parametrize(("second", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_answer_file_exits_2_and_writes_nothing(
    second: Any, message: str, tmp_path: Path
) -> None:
    folder = tmp_path / "results" / "m" / "mmspec_test"
    good = write_jsonl(folder / "baseline-temperature-0.jsonl", [_good("q1")])
    bad = folder / "eagle-temperature-0.jsonl"
    text = second if isinstance(second, str) else json.dumps(second)
    bad.write_text(json.dumps(_good("q1")) + "\n" + text + "\n")
    out = tmp_path / "runs"
    result = CliRunner().invoke(
        main, ["import", str(good), str(bad), "--format", "mmspec", "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert f"error: {bad}:{message}" in result.stderr
    assert not out.exists()


def test_other_bad_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "answers"
    path = write_jsonl(folder / "a-temperature-0.jsonl", [_good()])
    (folder / "b-temperature-0.jsonl").write_bytes(b'{"question_id": "\xff"}\n')
    (folder / "empty-temperature-0.jsonl").write_text("\n\n")
    write_jsonl(folder / "c-temperature-x.jsonl", [_good()])

    def fails(paths: list[Path], settings: ImportSettings, message: str) -> None:
        with pytest.raises(AnswerFileError, match=message):
            import_answers(paths, tmp_path / "runs", settings)
        assert not (tmp_path / "runs").exists()

    fails([path], ImportSettings("mmspec"), "cannot tell the model from this folder")
    mm = ImportSettings("mmspec", model="m")
    fails([folder / "b-temperature-0.jsonl"], mm, r"b-temperature-0.jsonl:1: not valid UTF-8")
    fails([folder / "empty-temperature-0.jsonl"], mm, "no records")
    fails([folder / "c-temperature-x.jsonl"], mm, "'x', is not a number")
    fails([tmp_path / "nowhere"], mm, "no such file or folder")
    (tmp_path / "empty").mkdir()
    fails([tmp_path / "empty"], mm, "no .jsonl answer files in this folder")
    twice = ImportSettings("mmspec", model="m", renames={"a": "eagle", "c2": "eagle"})
    write_jsonl(folder / "x" / "c2-temperature-0.jsonl", [_good()])
    fails([path, folder / "x" / "c2-temperature-0.jsonl"], twice, "as method 'eagle'")
    specbench = write_jsonl(tmp_path / "sb" / "x.jsonl", [{"question_id": 1, "choices": [{}]}])
    fails([specbench], ImportSettings("specbench", model="m"), r"x.jsonl:1: category: missing")


def test_a_failed_write_leaves_nothing(
    mmspec_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(rows: list[Any]) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(importer, "rows_to_table", broken)
    out = tmp_path / "runs"
    with pytest.raises(OSError, match="disk full"):
        import_answers([mmspec_dir], out, ImportSettings("mmspec"))
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------- the commands


def test_cli_import_then_report_compare_history(mmspec_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "runs"
    args = ["import", str(mmspec_dir), "--format", "mmspec", "--out", str(out)]
    first = runner.invoke(main, [*args, "--model", "llava-1.5-7b", "--gpu", "GPU A"])
    assert first.exit_code == 0, first.output
    assert "methods ar, eagle, msd, viskip+vispec" in first.stderr
    run_a = Path(first.stdout.split("report: ")[1].split()[0]).parent
    second = runner.invoke(
        main,
        [
            *args,
            "--model",
            "llava-1.5-7b",
            "--gpu",
            "GPU B",
            "--name",
            "again",
            "--method",
            "eagle=eagle2",
            "--baseline",
            "none",
        ],
    )
    assert second.exit_code == 0, second.output
    assert "nothing was imported as ar" in second.stderr
    run_b = next(p for p in out.iterdir() if p.name.startswith("again-"))
    assert set(read_manifest(run_b)["grid"]["methods"]) == {
        "baseline",
        "eagle2",
        "msd",
        "viskip+vispec",
    }

    shown = runner.invoke(main, ["report", str(run_a)])
    assert shown.exit_code == 0 and "## Imported run" in shown.stdout

    text = render_comparison(compare_runs(run_a, run_a))
    assert "on GPU A · imported (MMSpec answer files)" in text
    assert "> Note: BASE was imported from MMSpec answer files" in text
    rerun = write_run(
        tmp_path / "rerun", [], environment={"source": "probed", "gpus": [{"name": "GPU B"}]}
    )
    text = render_comparison(compare_runs(run_a, rerun, allow_missing=True))
    assert "> Note: the runs ran on different hardware (GPU A vs GPU B)" in text

    store = tmp_path / "history"
    assert runner.invoke(main, ["history", "add", str(run_a), "--store", str(store)]).exit_code == 0
    assert set(load_history(store)["machine"]) == {"GPU A"}

    resumed = runner.invoke(main, ["submit", "--resume", str(run_a)])
    assert resumed.exit_code == 2 and "an imported run" in resumed.stderr


def test_imported_report_renders_in_chromium(mmspec_dir: Path, tmp_path: Path) -> None:
    """The page of an imported run, in a browser: its Imported table and every chart shown,
    the breakdown drawn although prefill and commit are not recorded (nulls, not NaN)."""
    from tests.test_report_html import check_rendered, find_browser, render_summary

    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found: apt-get install chromium chromium-driver")
    run = import_answers([mmspec_dir], tmp_path / "runs", ImportSettings("mmspec")).run_dir
    md = write_report(run).read_text()
    summary = render_summary(browser, run / "report.html", tmp_path)
    check_rendered(summary, md)
    # The Imported, per-topic, per-method, breakdown, metadata and environment tables at least.
    assert summary["tables"] >= 6


# ----------------------------------------------------------------------------- the reference


def _reference_summary(split: str) -> dict[str, dict[str, str]]:
    with (LLAVA / split / "summary.csv").open() as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def _method(name: str) -> str:
    return {"baseline": "ar", "vispec_vskip": "viskip+vispec"}.get(name, name)


needs_reference = pytest.mark.skipif(
    not REFERENCE.is_dir(),
    reason=f"the MMSpec reference results are not on this machine ({REFERENCE} is absent)",
)


@needs_reference
@pytest.mark.parametrize("split", ["mmspec_test", "mmspec_testmini"])
def test_imported_reference_reproduces_its_summary(split: str, tmp_path: Path) -> None:
    """MMSpec's summary.csv (evaluation/summarize_metrics.py), column by column, from our
    report's metrics where they are the same quantity and from the imported rows otherwise."""
    run = import_answers([LLAVA / split], tmp_path, ImportSettings("mmspec")).run_dir
    write_report(run)
    metrics = pl.read_ipc(run / "metrics.arrow").filter(pl.col("topic") == "all")
    cells = {r["method"]: r for r in metrics.iter_rows(named=True)}
    rows = load_rows(run).collect()
    base = rows.filter(pl.col("method") == "ar").select(
        "sample_id", "turn", b_tps=pl.col("new_tokens") / pl.col("total_s")
    )
    summary = _reference_summary(split)
    assert {_method(m) for m in summary} == set(cells)
    for name, ref in summary.items():
        cell = cells[_method(name)]
        part = rows.filter(pl.col("method") == _method(name))
        assert cell["samples"] == int(ref["n_turns"])
        assert part["sample_id"].n_unique() == int(ref["n_samples"])
        assert cell["new_tokens"] == int(ref["total_new_tokens"])
        assert part["total_s"].sum() == pytest.approx(float(ref["total_wall_time"]), rel=1e-12)
        assert part["draft_s"].sum() == pytest.approx(float(ref["total_draft_time"]), abs=1e-9)
        assert part["verify_s"].sum() == pytest.approx(float(ref["total_target_time"]), rel=1e-12)
        # summarize_metrics' MAT is tokens per round; its draft_accept_mean is our MAT.
        assert cell["new_tokens"] / cell["steps"] == pytest.approx(float(ref["MAT"]), rel=1e-12)
        if ref["draft_accept_mean"] == "nan":
            assert cell["MAT"] == 0
        else:
            # MSD's per-turn means become whole accepted tokens: within 0.05%.
            assert cell["MAT"] == pytest.approx(float(ref["draft_accept_mean"]), rel=5e-4)
        # Its global speedup divides throughputs: our tokens/s over ar's.
        global_ = cell["tokens_per_s"] / cells["ar"]["tokens_per_s"]
        assert global_ == pytest.approx(float(ref["speedup_global"]), rel=1e-12)
        # Its paired speedup: the mean over (sample, turn) of the throughput ratio.
        paired = part.join(base, on=["sample_id", "turn"]).select(
            (pl.col("new_tokens") / pl.col("total_s") / pl.col("b_tps")).mean()
        )
        assert paired.item() == pytest.approx(float(ref["speedup_paired"]), rel=1e-12)


# metrics.csv column -> summary.csv column: MMSpec's own definitions, written beside ours.
MMSPEC_COLUMNS = {
    "MAT_mmspec": "MAT",
    "draft_accept_mean": "draft_accept_mean",
    "speedup_paired_mmspec": "speedup_paired",
    "speedup_global_mmspec": "speedup_global",
}


@needs_reference
@pytest.mark.parametrize("split", ["mmspec_test", "mmspec_testmini"])
def test_report_carries_mmspecs_summary_to_3_decimals(split: str, tmp_path: Path) -> None:
    """metrics.csv's MMSpec columns, number by number, against summary.csv, every method;
    and the report prints them as summary.csv rounds them."""
    run = import_answers([LLAVA / split], tmp_path, ImportSettings("mmspec")).run_dir
    md = write_report(run).read_text()
    metrics = pl.read_csv(run / "metrics.csv").filter(pl.col("topic") == "all")
    cells = {r["method"]: r for r in metrics.iter_rows(named=True)}
    summary = _reference_summary(split)
    assert {_method(m) for m in summary} == set(cells)
    for name, ref in summary.items():
        cell = cells[_method(name)]
        for ours, theirs in MMSPEC_COLUMNS.items():
            if ref[theirs] == "nan":  # summarize_metrics' baseline draft_accept_mean
                assert cell[ours] is None, (name, ours)
                continue
            expected = float(ref[theirs])
            assert round(cell[ours], 3) == round(expected, 3), (name, ours, cell[ours], expected)
            assert cell[ours] == pytest.approx(expected, rel=1e-9), (name, ours)
        # the report's "By MMSpec's definitions" row: summary.csv's numbers to 3 decimals
        accept = ref["draft_accept_mean"]
        shown = [
            _method(name),
            f"{cell['MAT']:.2f}",
            f"{float(ref['MAT']):.3f}",
            "–" if accept == "nan" else f"{float(accept):.3f}",
            f"{float(ref['speedup_paired']):.3f}×",
            f"{float(ref['speedup_global']):.3f}×",
        ]
        assert "| " + " | ".join(shown) + " |" in md, shown


@needs_reference
def test_imported_reference_report_renders_in_chromium(tmp_path: Path) -> None:
    """The 600-sample, 6-method import's page in a browser, with every chart drawn."""
    from tests.test_report_html import rendered_plot_titles

    settings = ImportSettings("mmspec", model="llava-1.5-7b")
    run = import_answers([LLAVA / "mmspec_test"], tmp_path / "runs", settings).run_dir
    titles = rendered_plot_titles(run, tmp_path)
    for prefix in (
        "Speedup vs batch size",
        "Vision-aware vs vision-agnostic",
        "Throughput vs latency speedup",
        "Latency CDF",
        "Acceptance per draft position",
        "Acceptance-length histogram",
    ):
        assert any(t.startswith(prefix) for t in titles), (prefix, titles)


@needs_reference
def test_imported_reference_matches_per_query_rounds(tmp_path: Path) -> None:
    run = import_answers([LLAVA / "mmspec_test"], tmp_path, ImportSettings("mmspec")).run_dir
    per_sample = (
        load_rows(run)
        .group_by("method", "sample_id")
        .agg(pl.col("steps").sum(), pl.col("new_tokens").sum())
        .collect()
    )
    got = {(r["method"], r["sample_id"]): r for r in per_sample.iter_rows(named=True)}
    files = sorted((LLAVA / "mmspec_test").glob("per_query_rounds_*.csv"))
    assert len(files) == 6
    for path in files:
        with path.open() as f:
            for ref in csv.DictReader(f):
                if ref["question_id"].startswith("AVG("):  # the file's closing mean row
                    continue
                row = got[(_method(ref["method"]), ref["question_id"])]
                assert row["steps"] == int(ref["total_rounds"]), (path.name, ref["question_id"])
                assert row["new_tokens"] == int(ref["total_new_tokens"])
    assert len(result_files(run)) == 6
    assert not any(math.isnan(v) for v in per_sample["steps"].cast(pl.Float64))
