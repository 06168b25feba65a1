"""The roofline per cell (issue 20, part 5): t(T) measured by each worker before its timed work,
carried on its rows, and the ideal speedup and implementation efficiency the report derives
from it (checked against a plain-Python recomputation)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from mmspec.methods import verify_cost
from mmspec.methods.verify_cost import DEFAULT_T_VALUES, VerifyCost, measure_verify_costs
from mmspec.models.loader import load_target
from mmspec.orchestrator import runner as runner_module
from mmspec.orchestrator.runner import ShardRunner, probe_prompt
from mmspec.orchestrator.shards import Shard
from mmspec.reports import cell_metrics, load_rows, write_report
from mmspec.reports.answer_import import mask_unrecorded
from mmspec.reports.metrics import ALL_TOPIC
from mmspec.reports.roofline import ROOFLINE_COLUMNS, cost_at, cost_ratio, monotone
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.layout import RESULTS, part_name, partition
from mmspec.results.schema import RESULT_SCHEMA, ResultRow, rows_to_table
from mmspec.workloads.synthetic import synthetic_suite
from tests import run_dirs

# ---------------------------------------------------------------- t(T) between measured points


def test_cost_at_is_linear_between_points_and_along_the_last_segment_past_them() -> None:
    tokens, seconds = [1, 2, 4, 8], [1.0, 1.5, 2.0, 4.0]
    assert cost_at(tokens, seconds, 4) == 2.0
    assert cost_at(tokens, seconds, 3) == pytest.approx(1.75)
    assert cost_at(tokens, seconds, 6) == pytest.approx(3.0)
    assert cost_at(tokens, seconds, 12) == pytest.approx(6.0)  # slope 0.5 past T = 8
    # a noisy, downhill last segment must not make a bigger tree cheaper
    assert cost_at([1, 2], [1.0, 0.9], 4) == 0.9
    assert cost_at(tokens, seconds, 0.5) is None
    assert cost_at([1], [1.0], 2) is None
    assert cost_ratio(tokens, seconds, 6) == pytest.approx(3.0)
    assert cost_ratio([2, 4], [1.0, 2.0], 3) is None  # no t(1) to divide by


def test_a_contended_point_is_bounded_by_the_larger_forwards_after_it() -> None:
    # t(1) caught a co-located worker's burst: t(2) bounds it, so the ratio is not deflated
    assert monotone([4.0, 2.0, 2.5, 2.2, 5.0]) == [2.0, 2.0, 2.2, 2.2, 5.0]
    assert cost_ratio([1, 2, 4, 8, 16], [4.0, 2.0, 2.5, 2.2, 5.0], 4) == pytest.approx(1.1)


# ---------------------------------------------------------------- measuring t(T)


@pytest.fixture(scope="module")
def tiny_llava() -> Any:
    return load_target("tiny-llava", "float32", "cpu")


def test_every_point_is_timed_after_a_warm_up_over_the_prompts_cache(
    tiny_llava: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tiny_llava
    turn, image = probe_prompt()
    forwards: list[tuple[tuple[int, ...], int]] = []
    verify = target.verify

    def spy(ids: Any, positions: Any, mask: Any, cache: Any) -> Any:
        forwards.append((tuple(ids.shape), cache.get_seq_length()))
        assert mask.shape == (
            *ids.shape[:1],
            1,
            ids.shape[1],
            cache.get_seq_length() + ids.shape[1],
        )
        return verify(ids, positions, mask, cache)

    monkeypatch.setattr(target, "verify", spy)
    costs = measure_verify_costs(target, turn, image, [2, 1], t_values=(4, 1, 2), repeats=2)
    assert [c.batch_size for c in costs] == [2, 1]
    assert all(c.tokens == (1, 2, 4) and len(c.seconds) == 3 for c in costs)
    assert all(s > 0 for c in costs for s in c.seconds)
    # a warm-up round and two timed ones of each (batch size, T), each over the bare prompt:
    # the cache is cropped back after every forward
    prompt_len = target.encode([turn], [image]).input_ids.shape[1]
    assert costs[0].context_len == prompt_len
    assert sorted(forwards) == sorted(
        [((b, t), prompt_len) for _ in range(3) for b in (2, 1) for t in (1, 2, 4)]
    )


# ---------------------------------------------------------------- the runner


def _shard(runner: ShardRunner, shard_id: str, batch_size: int) -> Shard:
    samples = tuple(synthetic_suite(per_topic=1, seed=0)[:2])
    cell = Cell("c0", runner.model_config, "ar", {}, batch_size, 0.0, 0, 0, 4, "synthetic")
    return Shard("run", shard_id, cell, samples)


def test_runner_measures_once_per_batch_size_before_the_shards_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[list[int], float]] = []

    def spy(*args: Any, **kwargs: Any) -> list[VerifyCost]:
        costs = measure_verify_costs(*args, **kwargs)
        calls.append(([c.batch_size for c in costs], time.perf_counter()))
        return costs

    monkeypatch.setattr(runner_module, "measure_verify_costs", spy)
    runner = ShardRunner(ModelConfig("tiny-llava"), "ar", {}, threads=1)
    try:
        first = runner.run(_shard(runner, "s0", 2))
        measured_at = calls[-1][1]
        window = runner.last_telemetry.column("ts").to_pylist()
        second = runner.run(_shard(runner, "s1", 2))
        third = runner.run(_shard(runner, "s2", 1))
    finally:
        runner.close()
    assert [sizes for sizes, _ in calls] == [[2], [1]]  # batch size 2 once, for both shards
    assert min(window) >= measured_at  # the shard's telemetry (and timing) starts after it
    for rows, batch_size in ((first, 2), (second, 2), (third, 1)):
        cost = runner.verify_cost(batch_size)
        assert cost is not None and cost.tokens == DEFAULT_T_VALUES
        assert all(r.status == "ok" for r in rows)
        assert all(r.verify_cost_tokens == list(DEFAULT_T_VALUES) for r in rows)
        assert all(r.verify_cost_s == list(cost.seconds) for r in rows)
    assert runner.verify_cost(1) != runner.verify_cost(2)  # each batch size its own curve


def test_a_failed_or_disabled_measurement_leaves_the_rows_without_t_of_T(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> list[VerifyCost]:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(runner_module, "measure_verify_costs", out_of_memory)
    for verify_t in (DEFAULT_T_VALUES, ()):
        runner = ShardRunner(ModelConfig("tiny-llava"), "ar", {}, threads=1, verify_t=verify_t)
        try:
            rows = runner.run(_shard(runner, "s0", 2))
        finally:
            runner.close()
        assert rows and all(r.status == "ok" for r in rows)  # the shard itself still runs
        assert all(r.verify_cost_tokens is None and r.verify_cost_s is None for r in rows)


def test_gpu_evidence_and_the_runner_share_one_measurement() -> None:
    # benchmarks/gpu_evidence.py prints t(T) through the runner's own function, not a copy
    source = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_evidence.py").read_text()
    assert "measure_verify_costs(" in source and "def _chain_inputs" not in source
    assert verify_cost.measure_verify_costs is runner_module.measure_verify_costs


# ---------------------------------------------------------------- the report

MODEL = "org/tiny-vl"
T_VALUES = [1, 2, 4, 8, 16, 32, 64]
# Two workers' curves: a flat-ish GPU-like one and a steeper one (seconds = a + b * T).
CURVE_A = [0.010 + 0.0010 * t for t in T_VALUES]
CURVE_B = [0.020 + 0.0040 * t for t in T_VALUES]
TOPICS = ["charts", "charts", "text vqa", "text vqa", "charts", "text vqa"]


def _row(method: str, i: int, **over: Any) -> ResultRow:
    fields: dict[str, Any] = dict(
        run_id="roofline",
        cell_id=f"{method}-b1",
        shard_id=f"{method}-{i % 2}",
        model=MODEL,
        method=method,
        batch_size=1,
        temperature=0.0,
        seed=0,
        repeat=0,
        workload="synthetic",
        topic=TOPICS[i],
        category=TOPICS[i],
        sample_id=f"s{i}",
        turn=0,
        new_tokens=40,
        steps=40,
        total_s=1.0 + 0.1 * i,
        output_sha256=f"sha-{i}",
    )
    fields.update(over)
    return ResultRow(**fields)


def _drafting(method: str, i: int, curve: list[float] | None) -> ResultRow:
    # shard 0 (even i) verifies 10 steps of 5 drafts, shard 1 20 steps of 3: T varies by worker
    steps, per_step = (10, 5) if i % 2 == 0 else (20, 3)
    return _row(
        method,
        i,
        steps=steps,
        drafted_tokens=steps * per_step,
        accepted_tokens=40 - steps,
        total_s=(1.0 + 0.1 * i) / (1.5 + 0.1 * i),
        verify_cost_tokens=None if curve is None else T_VALUES,
        verify_cost_s=curve,
    )


def roofline_rows() -> list[ResultRow]:
    """ar without t(T) (runs never need it: nothing drafted), eagle on two workers with their
    own curves, pld with none (a run before schema 3 would look so), and an eagle error row
    whose garbage must not count."""
    rows = [_row("ar", i) for i in range(6)]
    rows += [_drafting("eagle", i, CURVE_A if i % 2 == 0 else CURVE_B) for i in range(6)]
    rows += [_drafting("pld", i, None) for i in range(6)]
    rows.append(_row("eagle", 0, sample_id="bad", status="error", steps=1, drafted_tokens=999))
    return rows


def _interp(t: float, curve: list[float]) -> float:
    # the test's curves are straight lines: t(T) = a + b * T exactly, between points or not
    slope = (curve[1] - curve[0]) / (T_VALUES[1] - T_VALUES[0])
    return curve[0] + slope * (t - 1)


def reference(rows: list[ResultRow]) -> dict[tuple[str, str], dict[str, float | None]]:
    """(method, topic) -> the roofline columns, recomputed from the module doc's definition."""
    groups: dict[tuple[str, str], list[ResultRow]] = defaultdict(list)
    for r in rows:
        if r.status == "ok":
            for topic in (r.topic, ALL_TOPIC):
                groups[(r.method, topic)].append(r)
    ar = {(r.sample_id, topic): r for (m, topic), rs in groups.items() if m == "ar" for r in rs}
    out: dict[tuple[str, str], dict[str, float | None]] = {}
    for (method, topic), members in groups.items():
        steps = sum(r.steps for r in members)
        drafted = sum(r.drafted_tokens for r in members)
        t_mean = 1 + drafted / steps
        measured = [r for r in members if r.verify_cost_s is not None]
        if drafted == 0:
            ratio: float | None = 1.0
        elif measured:
            ratio = sum(
                r.steps * _interp(t_mean, r.verify_cost_s) / _interp(1, r.verify_cost_s)
                for r in measured
            ) / sum(r.steps for r in measured)
        else:
            ratio = None
        mat = (sum(r.accepted_tokens for r in members) + steps) / steps
        speedup = sum(ar[(r.sample_id, topic)].total_s for r in members) / sum(
            r.total_s for r in members
        )
        ideal = None if ratio is None else mat / ratio
        out[(method, topic)] = {
            "verify_tokens_mean": t_mean,
            "verify_cost_ratio": ratio,
            "ideal_speedup": ideal,
            "implementation_efficiency": None if ideal is None else speedup / ideal,
        }
    return out


def write_run(run_dir: Path, rows: list[ResultRow]) -> Path:
    manifest = {"run_id": run_dir.name, "grid": {"methods": ["ar", "eagle", "pld"]}}
    return run_dirs.write_run(run_dir, rows, manifest)


def _by_key(metrics: pl.DataFrame) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["method"], r["topic"]): r for r in metrics.iter_rows(named=True)}


def test_roofline_columns_match_the_definition_per_cell_and_topic(tmp_path: Path) -> None:
    rows = roofline_rows()
    got = _by_key(cell_metrics(load_rows(write_run(tmp_path / "run", rows))))
    want = reference(rows)
    assert set(got) == set(want)
    for key, columns in want.items():
        for column, value in columns.items():
            if value is None:
                assert got[key][column] is None, (key, column)
            else:
                assert got[key][column] == pytest.approx(value, rel=1e-12), (key, column)
    eagle = got[("eagle", ALL_TOPIC)]
    # T = 1 + (3 * 50 + 3 * 60) / (3 * 10 + 3 * 20) drafts per step, between measured points
    assert eagle["verify_tokens_mean"] == pytest.approx(1 + 330 / 90)
    # the worker that verified twice the steps weighs twice as much
    t = eagle["verify_tokens_mean"]
    ratio_a, ratio_b = (0.010 + 0.001 * t) / 0.011, (0.020 + 0.004 * t) / 0.024
    assert eagle["verify_cost_ratio"] == pytest.approx((30 * ratio_a + 60 * ratio_b) / 90)
    assert got[("ar", ALL_TOPIC)]["ideal_speedup"] == 1.0  # no t(T) needed
    assert got[("ar", ALL_TOPIC)]["implementation_efficiency"] == 1.0
    assert got[("pld", ALL_TOPIC)]["ideal_speedup"] is None  # drafted, never measured


def test_report_shows_ideal_speedup_and_efficiency_per_cell(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", roofline_rows())
    text = write_report(run).read_text()
    eagle = _by_key(cell_metrics(load_rows(run)))[("eagle", ALL_TOPIC)]
    section = text[text.index("Per method, all topics pooled:") :]
    header = next(line for line in section.splitlines() if line.startswith("| Method |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    line = next(line for line in section.splitlines() if line.startswith("| eagle |"))
    cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
    assert cells["Ideal speedup"] == f"{eagle['ideal_speedup']:.2f}×"
    assert cells["Implementation efficiency"] == f"{100 * eagle['implementation_efficiency']:.1f}%"
    pld = next(line for line in section.splitlines() if line.startswith("| pld |"))
    assert pld.count("not measured") == 2
    assert "- **Ideal speedup**:" in text and "- **Implementation efficiency**:" in text
    csv = pl.read_csv(run / "metrics.csv")
    assert set(ROOFLINE_COLUMNS) <= set(csv.columns)
    html = (run / "report.html").read_text()
    assert "Implementation efficiency" in html and f"{eagle['ideal_speedup']:.2f}×" in html
    # the page's tooltip says what the ideal is made of
    parts = f"MAT incl. bonus {eagle['MAT_with_bonus']:.3f} / t(T)/t(1) "
    assert f"{parts}{eagle['verify_cost_ratio']:.3f} at T = 4.7 tokens" in html


def test_a_run_from_schema_2_reads_with_no_t_of_T(tmp_path: Path) -> None:
    rows = roofline_rows()
    run = write_run(tmp_path / "old", [r for r in rows if r.method == "ar"])
    old = pa.schema(
        [f for f in RESULT_SCHEMA if not f.name.startswith("verify_cost_")],
        metadata={"mmspec.schema_version": "2"},
    )
    eagle = [r for r in rows if r.method == "eagle" and r.status == "ok"]
    path = run / RESULTS / partition(MODEL, "eagle", 1, 0.0, 0) / part_name("eagle-v2")
    path.parent.mkdir(parents=True)
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, old) as writer:
        writer.write_table(rows_to_table(eagle).select(old.names).cast(old))
    loaded = load_rows(run).collect()
    assert loaded.columns == RESULT_SCHEMA.names
    assert loaded.filter(pl.col("method") == "eagle")["verify_cost_s"].null_count() == len(eagle)
    got = _by_key(cell_metrics(load_rows(run)))
    assert got[("eagle", ALL_TOPIC)]["ideal_speedup"] is None
    assert got[("ar", ALL_TOPIC)]["ideal_speedup"] == 1.0


def test_an_imported_run_without_drafted_tokens_has_no_roofline(tmp_path: Path) -> None:
    # imports hold drafted_tokens = 0 as a sentinel: it must not read as "nothing drafted"
    rows = [r for r in roofline_rows() if r.status == "ok"]
    for r in rows:
        r.drafted_tokens, r.verify_cost_tokens, r.verify_cost_s = 0, None, None
    metrics = cell_metrics(load_rows(write_run(tmp_path / "imp", rows)))
    assert metrics.filter(pl.col("method") == "eagle")["ideal_speedup"].null_count() == 0
    files = [{"method": "eagle", "temperature": 0.0, "not_recorded": ["drafted_tokens"]}]
    masked = mask_unrecorded(metrics, {"imported": {"files": files}})
    eagle = masked.filter(pl.col("method") == "eagle")
    for column in ROOFLINE_COLUMNS:
        assert eagle[column].null_count() == eagle.height, column
