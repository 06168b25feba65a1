"""The report's numbers for MMSpec's findings, on a hand-built batched run, each recomputed here
in plain Python: MMSpec's own MAT and speedups (evaluation/summarize_metrics.py's formulas),
throughput against latency per cell (system tokens/s from batches, TTFT, TPOT, tails),
acceptance per draft position (vLLM's definition) and its histogram, and the methods' taxonomy
grouping the speedups. The real MMSpec files are checked in test_import.py.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from mmspec.reports import cell_metrics, load_rows, write_report
from mmspec.reports.acceptance import acceptance_columns, hist_column, positions, rate_column
from mmspec.reports.families import geometric_mean
from mmspec.reports.throughput import disagreements
from mmspec.results.schema import ResultRow
from mmspec.results.taxonomy import TAXONOMY
from tests import run_dirs
from tests.test_reports import _quantile

MODEL = "org/tiny-vl"
TOPICS = ("general vqa", "text vqa")
METHODS = ("ar", "pld", "eagle", "viskip+pld")
SAMPLES = 6
SHARD = 4  # samples per shard: batch indices restart in the second shard
MANIFEST = {"run_id": "paper", "grid": {"name": "paper", "methods": list(METHODS)}}


def _lengths(method: str, i: int) -> list[int]:
    """Accepted drafts per step of sample i (ar: zeros, one step per token after the first)."""
    if method == "ar":
        return [0] * (20 + 2 * i)
    if method == "eagle":
        return [3, 2, 0, 4, 1, 3][: 3 + i % 4] + [2] * (i % 3)
    # pld, and viskip+pld whose first two steps are skipped (recorded as 0 accepted)
    base = [0, 0, 1, 5, 0, 2] if i % 2 else [2, 0, 0, 3]
    return [0, 0, *base] if method == "viskip+pld" else base


def _rows(batch_sizes: tuple[int, ...] = (1, 2), methods: tuple[str, ...] = METHODS) -> list:
    rows = []
    for bs in batch_sizes:
        for m, method in enumerate(methods):
            cell = f"{method}-b{bs}"
            for start in range(0, SAMPLES, bs):
                members = range(start, min(start + bs, SAMPLES))
                shard = start // SHARD
                batch_index = (start % SHARD) // bs
                built = []
                for i in members:
                    lengths = _lengths(method, i)
                    steps = len(lengths)
                    # ar's outputs are one token longer than a method's on odd samples:
                    # outputs differ in length, so throughput and time ratios part ways
                    new = sum(lengths) + steps + 1 + (method == "ar" and i % 2)
                    prefill = 0.01 * (1 + 0.5 * bs) + 0.001 * i
                    total = prefill + 0.004 * steps * (1 + 0.3 * bs) + 0.002 * m
                    built.append(
                        ResultRow(
                            run_id="paper",
                            cell_id=cell,
                            shard_id=f"{cell}-s{shard}",
                            model=MODEL,
                            method=method,
                            batch_size=bs,
                            temperature=0.0,
                            seed=0,
                            repeat=0,
                            workload="w",
                            topic=TOPICS[i % 2],
                            category="c",
                            sample_id=f"q{i}",
                            turn=0,
                            new_tokens=new,
                            steps=steps,
                            skipped_steps=2 if method == "viskip+pld" else 0,
                            drafted_tokens=4 * steps * (method != "ar"),
                            accepted_tokens=sum(lengths),
                            accept_lengths=lengths,
                            prefill_s=prefill,
                            verify_s=0.003 * steps,
                            total_s=total,
                            batch_index=batch_index,
                            output_sha256=f"sha-q{i}",
                        )
                    )
                # The batch waits for its slowest row; eagle at batch size 2 has a straggler
                # the rows do not show (its batch ends well after them), so its throughput
                # falls behind its latency.
                wall = max(r.total_s for r in built) + (0.2 if (method, bs) == ("eagle", 2) else 0)
                for r in built:
                    r.batch_s = wall
                rows += built
    # pld's first batch at batch size 2 ran out of memory and ran as two halves, one after
    # the other, under the same batch index: their wall times add up.
    for r in rows:
        if (r.method, r.batch_size, r.sample_id) == ("pld", 2, "q1"):
            r.batch_s += 0.05
    return rows


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return run_dirs.write_run(tmp_path / "paper", _rows(), MANIFEST)


def _pooled(run: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    metrics = cell_metrics(load_rows(run))
    return {(r["method"], r["batch_size"], r["topic"]): r for r in metrics.iter_rows(named=True)}


def _groups(rows: list[ResultRow]) -> dict[tuple[str, int, str], list[ResultRow]]:
    out: dict[tuple[str, int, str], list[ResultRow]] = defaultdict(list)
    for r in rows:
        out[(r.method, r.batch_size, r.topic)].append(r)
        out[(r.method, r.batch_size, "all")].append(r)
    return out


def _tokens_per_s(rows: list[ResultRow]) -> float:
    return sum(r.new_tokens for r in rows) / sum(r.total_s for r in rows)


def test_mmspec_definitions_match_summarize_metrics(run: Path) -> None:
    """MAT, draft_accept_mean and both speedups as summarize_metrics computes them."""
    got = _pooled(run)
    groups = _groups(_rows())
    for (method, bs, topic), members in groups.items():
        row = got[(method, bs, topic)]
        base = {r.sample_id: r for r in groups[("ar", bs, topic)]}
        n, steps = sum(r.new_tokens for r in members), sum(r.steps for r in members)
        assert row["MAT_mmspec"] == pytest.approx(n / steps)
        if method == "ar":
            assert row["draft_accept_mean"] is None  # summarize_metrics: NaN
        else:
            recorded = [v for r in members for v in r.accept_lengths]
            assert row["draft_accept_mean"] == pytest.approx(sum(recorded) / len(recorded))
        ratios = [
            (r.new_tokens / r.total_s) / (base[r.sample_id].new_tokens / base[r.sample_id].total_s)
            for r in members
        ]
        assert row["speedup_paired_mmspec"] == pytest.approx(statistics.mean(ratios))

        global_ = _tokens_per_s(members) / _tokens_per_s(list(base.values()))
        assert row["speedup_global_mmspec"] == pytest.approx(global_)
        # ours is a time ratio over the same keys: with outputs of other lengths it differs
        time_ratio = sum(b.total_s for b in base.values()) / sum(r.total_s for r in members)
        assert row["speedup_global"] == pytest.approx(time_ratio)
    assert got[("pld", 1, "all")]["speedup_global"] != pytest.approx(
        got[("pld", 1, "all")]["speedup_global_mmspec"]
    )


def test_throughput_and_latency_per_cell(run: Path) -> None:
    got = _pooled(run)
    rows = _rows()
    system: dict[tuple[str, int], float] = {}
    for (method, bs, topic), members in _groups(rows).items():
        row = got[(method, bs, topic)]
        if topic != "all":
            # a batch mixes topics: its wall time has no per-topic share
            assert row["system_tokens_per_s"] is None and row["throughput_speedup"] is None
            continue
        # one wall time per (shard, batch index), the halves of a split batch added
        walls = {(r.shard_id, r.batch_index, r.batch_s) for r in members}
        system[(method, bs)] = sum(r.new_tokens for r in members) / sum(w for *_, w in walls)
        assert row["system_tokens_per_s"] == pytest.approx(system[(method, bs)])
        assert row["latency_speedup"] == row["speedup_global"]
        prefill = [r.prefill_s for r in members]
        tpot = [(r.total_s - r.prefill_s) / (r.new_tokens - 1) for r in members]
        latency = [r.total_s for r in members]
        for name, values, q in (
            ("ttft_p50_s", prefill, 0.5),
            ("ttft_p90_s", prefill, 0.9),
            ("tpot_p50_s", tpot, 0.5),
            ("tpot_p90_s", tpot, 0.9),
            ("latency_p99_s", latency, 0.99),
        ):
            assert row[name] == pytest.approx(_quantile(values, q)), name
    for (method, bs), value in system.items():
        expected = value / system[("ar", bs)]
        assert got[(method, bs, "all")]["throughput_speedup"] == pytest.approx(expected)
    # the split batch counts both halves
    pld2 = [r for r in rows if (r.method, r.batch_size) == ("pld", 2)]
    assert len({(r.shard_id, r.batch_index) for r in pld2}) < len(
        {(r.shard_id, r.batch_index, r.batch_s) for r in pld2}
    )

    found = disagreements(cell_metrics(load_rows(run)))
    named = {(r["method"], r["batch_size"]) for r in found.iter_rows(named=True)}
    expected = {
        (m, bs)
        for (m, bs, t), r in got.items()
        if t == "all"
        and r["throughput_speedup"] is not None
        and abs(r["throughput_speedup"] / r["latency_speedup"] - 1) > 0.10
    }
    assert named == expected and ("eagle", 2) in named


def test_acceptance_per_position_and_histogram(run: Path) -> None:
    metrics = cell_metrics(load_rows(run))
    longest = max(max(_lengths(m, i) or [0]) for m in METHODS for i in range(SAMPLES))
    assert positions(metrics.columns) == longest
    assert metrics.columns[-len(acceptance_columns(longest)) :] == acceptance_columns(longest)
    got = {(r["method"], r["batch_size"], r["topic"]): r for r in metrics.iter_rows(named=True)}
    for key, members in _groups(_rows()).items():
        row = got[key]
        if key[0] == "ar":  # drafts nothing
            assert row["drafting_steps"] is None and row[rate_column(1)] is None
            continue
        lengths = [v for r in members for v in r.accept_lengths]
        skipped = sum(r.skipped_steps for r in members)
        drafting = len(lengths) - skipped
        assert row["drafting_steps"] == drafting
        for k in range(1, longest + 1):
            at_least = sum(v >= k for v in lengths)
            assert row[rate_column(k)] == pytest.approx(at_least / drafting), (key, k)
        for j in range(longest + 1):
            exactly = sum(v == j for v in lengths) - (skipped if j == 0 else 0)
            assert row[hist_column(j)] == pytest.approx(exactly / drafting), (key, j)
        # the rates add up to the mean accepted length of the drafting steps
        rates = sum(row[rate_column(k)] for k in range(1, longest + 1))
        assert rates == pytest.approx(sum(lengths) / drafting)


def test_report_shows_taxonomy_throughput_and_acceptance(run: Path) -> None:
    md = write_report(run).read_text()
    for heading in ("## Methods", "## Speedup (global) vs batch size", "## Throughput vs latency"):
        assert f"\n{heading}\n" in md
    assert "| pld | linear | vision-agnostic | training-free |" in md
    assert "| eagle | tree | vision-agnostic | training-based |" in md
    # ViSkip decides from the image whether to draft: vision-aware, whatever it wraps
    assert "| viskip+pld | linear | vision-aware | training-free |" in md
    metrics = pl.read_csv(run / "metrics.csv").filter(pl.col("topic") == "all")
    speedup = {
        (r["method"], r["batch_size"]): r["speedup_global"] for r in metrics.iter_rows(named=True)
    }
    agnostic = geometric_mean([speedup[("pld", 2)], speedup[("eagle", 2)]])
    line = next(x for x in md.splitlines() if x.startswith("| vision-agnostic: geometric mean"))
    assert line.endswith(f"| {agnostic:.2f}× (2) |"), line
    assert "Cells where throughput and latency speedups disagree by more than 10%" in md
    assert f"| {MODEL} | 0 | eagle | 2 |" in md
    assert "Acceptance per draft position (vLLM's definition" in md
    recorded = sum(len(_lengths("viskip+pld", i)) for i in range(SAMPLES))
    assert f"| viskip+pld | {recorded - 2 * SAMPLES} |" in md  # ViSkip's skipped steps left out
    for term in ("MAT (MMSpec)", "draft_accept_mean", "Speedup paired (MMSpec)", "TTFT", "TPOT"):
        assert f"- **{term}**" in md
    for column in ("MAT_mmspec", "speedup_paired_mmspec", "speedup_global_mmspec"):
        assert column in metrics.columns


def test_manifest_taxonomy_overrides_the_known_one(tmp_path: Path) -> None:
    manifest = {
        **MANIFEST,
        TAXONOMY: {"pld": {"drafting": "tree", "vision_aware": False, "training_free": True}},
    }
    run = run_dirs.write_run(tmp_path / "r", _rows(batch_sizes=(1,)), manifest)
    md = write_report(run).read_text()
    assert "| pld | tree | vision-agnostic | training-free |" in md
    assert "| viskip+pld | tree | vision-aware | training-free |" in md


def test_run_without_ar_marks_speedups_unavailable(tmp_path: Path) -> None:
    run = run_dirs.write_run(
        tmp_path / "r", _rows(methods=("pld", "eagle")), {"run_id": "no-ar", "grid": {}}
    )
    md = write_report(run).read_text()
    metrics = pl.read_csv(run / "metrics.csv")
    assert metrics["MAT"].null_count() == 0  # MAT needs no baseline
    for column in ("speedup_global", "speedup_global_mmspec", "throughput_speedup"):
        assert metrics[column].null_count() == metrics.height
    lengths = [v for i in range(SAMPLES) for v in _lengths("pld", i)]
    assert f"| pld | {SAMPLES} | 0 | {sum(lengths) / len(lengths):.2f} |" in md
    assert "unavailable" in md and "- **unavailable**" in md
    assert "No throughput speedup here to set beside latency" in md


def test_report_renders_in_chromium(run: Path, tmp_path: Path) -> None:
    """Every chart of the page drawn: speedup per method and per taxonomy group, throughput
    against latency, acceptance per position and histogram per block."""
    from tests.test_report_html import rendered_plot_titles

    titles = rendered_plot_titles(run, tmp_path)
    for prefix in (
        "Vision-aware vs vision-agnostic",
        "Throughput vs latency speedup",
        "Acceptance per draft position",
        "Acceptance-length histogram",
    ):
        assert any(t.startswith(prefix) for t in titles), (prefix, titles)
