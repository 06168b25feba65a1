"""`compare` on hand-built runs: a rerun passes, a slowed method or a lossless break fails.

The helpers here (make_rows, write_run) also build the runs of test_history and test_export.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from mmspec.reports.commands import compare
from mmspec.reports.compare import (
    ANALYTIC_MIN_ROWS,
    INSUFFICIENT,
    METRICS,
    REGRESSION,
    UNCHANGED,
    CellKey,
    Estimator,
    compare_metric,
    compare_runs,
    render_comparison,
)
from mmspec.results.schema import ResultRow
from tests import run_dirs

MODEL = "org/tiny-vl"
TOPICS = ("general vqa", "text vqa")
# ar runs at this speed; each method is (1.4 + 0.1 * (i % 5)) times faster on sample i.
SPEED = {"ar": 0.0, "pld": 1.4}


def make_rows(
    run_id: str = "run",
    *,
    samples: int = 40,
    methods: tuple[str, ...] = ("ar", "pld"),
    batch_sizes: tuple[int, ...] = (1,),
    temperature: float = 0.0,
    slow: dict[str, float] | None = None,
    noise: float = 0.0,
    seed: int = 0,
) -> list[ResultRow]:
    """Rows of a run: every method on the same samples; sample q000, q010, ... have 2 turns.

    `slow` multiplies a method's times; `noise` jitters every row's time by up to +-noise.
    Outputs (hashes, token counts) are identical across methods: the runs are lossless.
    """
    rng = np.random.default_rng(seed)
    slow = slow or {}
    rows = []
    for bs in batch_sizes:
        for method in methods:
            for i in range(samples):
                sid, topic = f"q{i:03d}", TOPICS[i % len(TOPICS)]
                for turn in range(2 if i % 10 == 0 else 1):
                    new = 30 + (7 * i) % 23 + 5 * turn
                    ar_s = 0.02 * new * (1 + 0.05 * bs) + 0.005 * (i % 3)
                    if method == "ar":
                        steps, lengths = new, [0] * new
                        total = ar_s
                    else:
                        steps = math.ceil(new / 2.5)
                        lengths = [(new - steps) // steps] * steps
                        lengths[0] += (new - steps) - sum(lengths)
                        total = ar_s / (SPEED.get(method, 1.4) + 0.1 * (i % 5))
                    total *= slow.get(method, 1.0) * (1 + noise * rng.uniform(-1, 1))
                    cell = f"{method}-b{bs}-t{temperature}-r0"
                    rows.append(
                        ResultRow(
                            run_id=run_id,
                            cell_id=cell,
                            shard_id=f"{cell}-s0",
                            model=MODEL,
                            method=method,
                            batch_size=bs,
                            temperature=temperature,
                            seed=0,
                            repeat=0,
                            workload="synthetic",
                            topic=topic,
                            category=f"{topic} (cat)",
                            sample_id=sid,
                            turn=turn,
                            new_tokens=new,
                            steps=steps,
                            drafted_tokens=2 * sum(lengths),
                            accepted_tokens=sum(lengths),
                            accept_lengths=lengths,
                            prefill_s=0.1 * total,
                            draft_s=0.2 * total * (method != "ar"),
                            verify_s=0.6 * total,
                            commit_s=0.05 * total,
                            total_s=total,
                            output_sha256=f"sha-{sid}-{turn}",
                            output_text=f"answer {sid} turn {turn}",
                            energy_j=150.0 * total,
                            device_name="Test GPU",
                            host="testhost",
                        )
                    )
    return rows


def write_run(run_dir: Path, rows: list[ResultRow], **manifest: Any) -> Path:
    """The orchestrator's layout: manifest.json, then one part file per shard."""
    meta = {
        "run_id": run_dir.name,
        "started_at": "2026-01-01T02:30:00+00:00",
        "git_sha": "0123456789abcdef",
        "git_dirty": False,
        "host": "testhost",
        "grid": {"name": "nightly"},
        "grid_sha256": "gridsha",
        **manifest,
    }
    return run_dirs.write_run(run_dir, rows, meta)


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(compare, [str(a) for a in args])


def _regressed_cells(result: Any) -> set[tuple[str, str]]:
    return {(key.method, key.topic) for key, _ in result.regressions}


# ----------------------------------------------------------------------------- the command


def test_rerun_with_noise_passes(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", make_rows(noise=0.02, seed=1, batch_sizes=(1, 4)))
    new = write_run(tmp_path / "new", make_rows(noise=0.02, seed=2, batch_sizes=(1, 4)))
    result = invoke(base, new)
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    # 2 methods x 2 batch sizes x (2 topics + all)
    assert first == "**Compare: OK**: no regression in 12 cells (0 with insufficient data)."
    assert "## Regressions" not in result.output and "## Hard failures" not in result.output


def test_slowed_method_is_flagged(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", make_rows(noise=0.02, seed=1))
    new = write_run(tmp_path / "new", make_rows(noise=0.02, seed=2, slow={"pld": 1.3}))
    out = tmp_path / "compare.md"
    result = invoke(base, new, "--out", out)
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[0].startswith("**Compare: FAILED** (")
    assert out.read_text() == result.output

    comparison = compare_runs(base, new)
    # Every pld cell (each topic and the pooled one) regressed; ar did not.
    assert _regressed_cells(comparison) == {("pld", t) for t in (*TOPICS, "all")}
    pooled = next(c for c in comparison.cells if c.key == CellKey(MODEL, "pld", 1, 0.0, "all"))
    by_name = {c.metric.name: c for c in pooled.changes}
    assert by_name["speedup_global"].verdict == REGRESSION
    assert by_name["speedup_global"].ratio == pytest.approx(1 / 1.3, rel=0.03)
    assert by_name["speedup_global"].ci_high < 1
    for name in ("latency_p50_s", "latency_p90_s", "latency_p99_s", "energy_per_token_j"):
        assert by_name[name].verdict == REGRESSION, name
        assert by_name[name].ratio == pytest.approx(1.3, rel=0.05), name
    # Same tokens, same acceptance: MAT did not move.
    assert by_name["MAT"].verdict == UNCHANGED and by_name["MAT"].ratio == 1.0
    assert not comparison.hard_failures
    assert "| org/tiny-vl | pld | 1 | 0 | all | speedup |" in result.output


def test_change_within_threshold_is_not_a_regression(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", make_rows())
    new = write_run(tmp_path / "new", make_rows(slow={"pld": 1.08}))
    # 8% slower, clearly significant: a regression at 5%, not at 10%.
    assert invoke(base, new).exit_code == 1
    result = invoke(base, new, "--threshold", "0.10")
    assert result.exit_code == 0, result.output


def test_small_cells_are_insufficient_not_regressions(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", make_rows(samples=6))
    new = write_run(tmp_path / "new", make_rows(samples=6, slow={"pld": 1.5}))
    comparison = compare_runs(base, new)
    assert not comparison.failed
    assert {c.verdict for c in comparison.cells} == {INSUFFICIENT}
    assert "(6 with insufficient data)" in render_comparison(comparison).splitlines()[0]
    # Lowering the bar makes the same data count.
    assert compare_runs(base, new, min_samples=3).failed


def test_lossless_mismatch_is_a_hard_failure(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", make_rows())
    rows = make_rows()
    for r in rows:
        if r.method == "pld" and r.sample_id in ("q005", "q010") and r.turn == 0:
            r.output_sha256 = "sha-other"
    new = write_run(tmp_path / "new", rows)
    result = invoke(base, new)
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == "**Compare: FAILED** (1 hard failure(s))."
    assert (
        "- lossless: pld on org/tiny-vl (batch size 1, T=0): 2 of 44 greedy outputs differ "
        "from ar (q005#0 r0, q010#0 r0)"
    ) in result.output


def test_sampled_outputs_are_not_checked_for_losslessness(tmp_path: Path) -> None:
    rows = make_rows(temperature=0.7)
    base = write_run(tmp_path / "base", rows)
    for r in rows:
        if r.method == "pld":
            r.output_sha256 = f"sampled-{r.sample_id}"
    assert not compare_runs(base, write_run(tmp_path / "new", rows)).failed


def test_more_errors_is_a_hard_failure(tmp_path: Path) -> None:
    def with_errors(count: int) -> list[ResultRow]:
        rows = make_rows()
        failing = [r for r in rows if r.method == "pld"][:count]
        for r in failing:
            r.status, r.error, r.output_sha256 = "error", "CUDA out of memory", None
        return rows

    base = write_run(tmp_path / "base", with_errors(1))
    same = write_run(tmp_path / "same", with_errors(1))
    assert not compare_runs(base, same).failed
    worse = compare_runs(base, write_run(tmp_path / "worse", with_errors(3)))
    assert worse.failed and not worse.regressions
    [failure] = worse.hard_failures
    assert failure.kind == "errors"
    assert failure.detail == "pld on org/tiny-vl (batch size 1, T=0): 3 error rows (BASE had 1)"


def test_identical_runs_change_nothing(tmp_path: Path) -> None:
    rows = make_rows(noise=0.05, seed=3)
    comparison = compare_runs(
        write_run(tmp_path / "a", rows), write_run(tmp_path / "b", rows), resamples=500
    )
    assert not comparison.failed
    for cell in comparison.cells:
        for change in cell.changes:
            if change.ratio is not None:
                assert change.ratio == 1.0
                assert change.ci_low <= 1.0 <= change.ci_high
    # ar's speedup and MAT are constant by definition and left out.
    ar = next(c for c in comparison.cells if c.key.method == "ar")
    assert {c.metric.name for c in ar.changes} == {m.name for m in METRICS} - {
        "speedup_global",
        "MAT",
    }


def test_cells_missing_from_new_fail_unless_allowed(tmp_path: Path) -> None:
    # pld at batch size 4 vanished (every shard failed): a guard must not pass that quietly.
    rows = make_rows(batch_sizes=(1, 4))
    base = write_run(tmp_path / "base", rows)
    kept = [r for r in rows if (r.method, r.batch_size) != ("pld", 4)]
    new = write_run(tmp_path / "new", kept, grid_sha256="othergrid")
    comparison = compare_runs(base, new)
    assert [(f.kind, f.detail) for f in comparison.hard_failures] == [
        ("missing", "pld on org/tiny-vl (batch size 4, T=0): no rows in NEW")
    ]
    assert {(k.method, k.batch_size) for k in comparison.only_base} == {("pld", 4)}
    text = render_comparison(comparison)
    assert "## Cells only in BASE" in text
    assert "> Note: the grids differ (grid_sha256 gridsha vs othergrid)." in text
    assert invoke(base, new).exit_code == 1
    assert invoke(base, new, "--allow-missing").exit_code == 0


def test_compare_is_reproducible(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", make_rows(noise=0.05, seed=1))
    new = write_run(tmp_path / "new", make_rows(noise=0.05, seed=2))
    first = render_comparison(compare_runs(base, new, seed=7))
    assert render_comparison(compare_runs(base, new, seed=7)) == first


def test_not_a_run_exits_2(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_rows(samples=2))
    broken = tmp_path / "broken"
    (broken / "results").mkdir(parents=True)
    (broken / "results" / "part-x.arrow").write_bytes(b"not arrow")
    result = invoke(run, broken)
    assert result.exit_code == 2
    assert result.output.startswith("error:")


# ----------------------------------------------------------------------------- statistics


def _gamma_pair(rng: np.random.Generator, n: int, scale: float) -> Estimator:
    return Estimator.ratio(scale * rng.gamma(4.0, 1.0, n), np.ones(n))


def test_interval_covers_the_true_ratio() -> None:
    # Two independent samples whose true ratio of means is 1.1: a lone 95% interval should
    # contain it in about 95% of repetitions (checked loosely, 100 repetitions).
    rng = np.random.default_rng(0)
    spec = METRICS[2]  # tokens/s: a ratio of sums, higher is better
    hits = 0
    for rep in range(100):
        base, new = _gamma_pair(rng, 50, 1.0), _gamma_pair(rng, 50, 1.1)
        change = compare_metric(spec, base, new, resamples=400, rng=np.random.default_rng(rep))
        hits += change.ci_low <= 1.1 <= change.ci_high
    assert 85 <= hits <= 100


def test_closed_form_and_bootstrap_errors_agree() -> None:
    # Above ANALYTIC_MIN_ROWS the se is closed-form; it must match what a bootstrap would say.
    rng = np.random.default_rng(2)
    n = ANALYTIC_MIN_ROWS
    latencies = rng.lognormal(0, 0.5, n)
    # (estimator, how much wider the closed form may be): the rank-based se of a far tail
    # (p99) is the wider one, the safe side; the bootstrap of far tails is shaky itself.
    for estimator, wider in (
        (Estimator.ratio(rng.gamma(4.0, 1.0, n), rng.uniform(0.5, 1.5, n)), 1.1),
        (Estimator.quantile(latencies, 0.5), 1.3),
        (Estimator.quantile(latencies, 0.9), 1.5),
        (Estimator.quantile(latencies, 0.99), 4.0),
    ):
        closed = estimator.log_se(np.random.default_rng(0), 1000)
        draws = estimator.bootstrap(np.random.default_rng(0), 1000)
        booted = float(np.std(np.log(draws), ddof=1))
        assert 0.8 * booted <= closed <= wider * booted


def test_more_tests_widen_each_interval() -> None:
    rng = np.random.default_rng(3)
    base, new = _gamma_pair(rng, 40, 1.0), _gamma_pair(rng, 40, 1.0)
    alone = compare_metric(METRICS[2], base, new)
    among_100 = compare_metric(METRICS[2], base, new, family=100)
    assert among_100.ci_low < alone.ci_low and among_100.ci_high > alone.ci_high
    assert alone.ratio == among_100.ratio


def test_regression_needs_significance() -> None:
    # A 20% drop measured on wildly noisy data is not called a regression.
    rng = np.random.default_rng(1)
    spec = METRICS[0]  # speedup, higher is better
    ones = np.ones(12)
    base = Estimator.ratio(rng.lognormal(0, 1.5, 12), ones)
    new = Estimator.ratio(0.8 * rng.lognormal(0, 1.5, 12), ones)
    change = compare_metric(spec, base, new)
    assert change.ci_low < 1 < change.ci_high
    assert change.verdict == UNCHANGED


def test_same_code_on_large_runs_raises_no_alarm(tmp_path: Path) -> None:
    # Over a thousand rows per cell (closed-form errors), fresh noise in each run: no alarm.
    base = write_run(tmp_path / "base", make_rows(samples=1200, noise=0.2, seed=1))
    new = write_run(tmp_path / "new", make_rows(samples=1200, noise=0.2, seed=2))
    comparison = compare_runs(base, new)
    assert not comparison.failed, render_comparison(comparison)
    assert comparison.tests == 3 * 7 + 3 * 5  # 3 cells each; pld: 7 metrics, ar: 5
    # ... and with that much data a 10% slowdown does not hide in 20% row noise.
    slow = write_run(
        tmp_path / "slow", make_rows(samples=1200, noise=0.2, seed=2, slow={"pld": 1.1})
    )
    assert _regressed_cells(compare_runs(base, slow)) == {("pld", t) for t in (*TOPICS, "all")}
