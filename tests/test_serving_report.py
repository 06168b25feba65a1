"""Serving metrics and the report's Serving section against a hand-built run: every metric is
recomputed here in plain Python from the rows' per-token times."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from mmspec.reports import write_report
from mmspec.reports.metrics import cell_metrics, load_rows, run_details
from mmspec.reports.serving import SERVING_COLUMNS, Slo, serving_metrics, slo_of
from mmspec.results.schema import ResultRow
from tests import run_dirs

MODEL = "org/tiny-vl"
SLO = {"ttft_s": 0.5, "tpot_s": 0.3}
MANIFEST: dict[str, Any] = {
    "run_id": "serving-run",
    "grid": {"name": "serving", "methods": ["ar", "pld"], "slo": SLO},
}
KEY = ("method", "scenario", "batch_size", "rate")


def _request(
    method: str,
    scenario: str,
    concurrency: int,
    rate: float | None,
    shard: str,
    sample: str,
    times: list[float],
    *,
    queue_s: float,
    batch_s: float,
    **over: Any,
) -> ResultRow:
    """A serving request: its first token's time is its TTFT, its last one's its E2E."""
    fields: dict[str, Any] = dict(
        run_id="serving-run",
        cell_id=f"{method}-{scenario}-c{concurrency}-r{rate}",
        shard_id=shard,
        model=MODEL,
        method=method,
        batch_size=concurrency,
        scenario=scenario,
        rate=rate,
        temperature=0.0,
        seed=0,
        repeat=0,
        workload="synthetic",
        topic="general vqa",
        category="general vqa",
        sample_id=sample,
        turn=0,
        new_tokens=len(times),
        steps=len(set(times)),
        prefill_s=times[0] - queue_s,
        total_s=times[-1],
        batch_s=batch_s,
        arrival_s=0.1 * int(sample[1:]),
        queue_s=queue_s,
        ttft_s=times[0],
        token_times_s=times,
        output_sha256=f"sha-{sample}",
    )
    fields.update(over)
    return ResultRow(**fields)


def _failed(
    method: str,
    scenario: str,
    concurrency: int,
    rate: float | None,
    shard: str,
    sample: str,
    batch_s: float,
) -> ResultRow:
    # Garbage numbers: if an error row leaked into any metric, the totals would show it.
    return _request(
        method,
        scenario,
        concurrency,
        rate,
        shard,
        sample,
        [40.0, 41.0, 99.0],
        queue_s=30.0,
        batch_s=batch_s,
        status="error",
        error="prompt does not fit",
        new_tokens=1000,
        output_sha256=None,
    )


def serving_rows() -> list[ResultRow]:
    """ar and pld, continuous at concurrency 2 and poisson at 1 and 2 requests/s (cap 4)."""
    rows = [
        # ar runs two streams (shards) of 2 s and 3 s: 10 tokens in 5 s
        _request("ar", "continuous", 2, None, "ar-c2-0", "s1", [0.5, 0.7, 0.9, 1.1],
                 queue_s=0.0, batch_s=2.0),
        _request("ar", "continuous", 2, None, "ar-c2-0", "s2", [0.6, 0.9, 1.2],
                 queue_s=0.1, batch_s=2.0),
        _failed("ar", "continuous", 2, None, "ar-c2-0", "s5", batch_s=2.0),
        _request("ar", "continuous", 2, None, "ar-c2-1", "s3", [0.4, 0.8],
                 queue_s=0.2, batch_s=3.0),
        _request("ar", "continuous", 2, None, "ar-c2-1", "s4", [1.0],
                 queue_s=0.3, batch_s=3.0),
        # a stream none of whose requests finished: its wall time must not count
        _failed("ar", "continuous", 2, None, "ar-c2-2", "s6", batch_s=77.0),
        # pld commits several tokens a step: they share an emission time
        _request("pld", "continuous", 2, None, "pld-c2-0", "s1", [0.3, 0.5, 0.5, 0.5, 0.8],
                 queue_s=0.0, batch_s=2.5),
        _request("pld", "continuous", 2, None, "pld-c2-0", "s2", [0.4, 0.4, 0.9],
                 queue_s=0.05, batch_s=2.5),
        _request("pld", "continuous", 2, None, "pld-c2-0", "s3", [0.2, 0.6],
                 queue_s=0.1, batch_s=2.5),
        _request("pld", "continuous", 2, None, "pld-c2-0", "s4", [0.45],
                 queue_s=0.15, batch_s=2.5),
    ]  # fmt: skip
    for rate, slow in ((1.0, 1.0), (2.0, 1.5)):
        for method, speed in (("ar", 1.0), ("pld", 0.6)):
            shard = f"{method}-p{rate:g}"
            wall = 4.0 * slow * speed
            rows += [
                _request(method, "poisson", 4, rate, shard, "s1",
                         [slow * speed * t for t in (0.3, 0.6, 0.9)], queue_s=0.0, batch_s=wall),
                _request(method, "poisson", 4, rate, shard, "s2",
                         [slow * speed * t for t in (0.5, 0.5, 1.3)], queue_s=0.2 * slow,
                         batch_s=wall),
            ]  # fmt: skip
    return rows


def static_rows() -> list[ResultRow]:
    """Static batches of 2 (the same size as the continuous cells' concurrency)."""
    rows = []
    for method, total in (("ar", 1.0), ("pld", 0.5)):
        for i in (1, 2):
            rows.append(
                ResultRow(
                    run_id="serving-run",
                    cell_id=f"{method}-b2",
                    shard_id=f"{method}-b2-0",
                    model=MODEL,
                    method=method,
                    batch_size=2,
                    temperature=0.0,
                    seed=0,
                    repeat=0,
                    workload="synthetic",
                    topic="general vqa",
                    category="general vqa",
                    sample_id=f"s{i}",
                    turn=0,
                    new_tokens=10 * i,
                    steps=10 * i if method == "ar" else 5 * i,
                    accepted_tokens=0 if method == "ar" else 5 * i,
                    drafted_tokens=0 if method == "ar" else 8 * i,
                    prefill_s=0.1,
                    total_s=total * i,
                    batch_s=2 * total,
                    output_sha256=f"sha-s{i}",
                )
            )
    return rows


# ---------------------------------------------------------------- the metrics, by hand


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile, as numpy's default."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def tpot(times: list[float]) -> float | None:
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else None


def gaps(times: list[float]) -> list[float]:
    distinct = sorted(set(times))
    return [b - a for a, b in itertools.pairwise(distinct)]


def expected(rows: list[ResultRow], slo: Slo | None) -> dict[tuple[Any, ...], dict[str, Any]]:
    cells: dict[tuple[Any, ...], list[ResultRow]] = defaultdict(list)
    for r in rows:
        if r.scenario != "static":
            cells[(r.method, r.scenario, r.batch_size, r.rate)].append(r)
    out = {}
    for key, part in cells.items():
        ok = [r for r in part if r.status == "ok"]
        walls = {(r.shard_id, r.batch_index): r.batch_s for r in ok}
        wall = sum(walls.values())
        tokens = sum(r.new_tokens for r in ok)
        tpots = [t for r in ok if (t := tpot(r.token_times_s)) is not None]
        itl = [g for r in ok for g in gaps(r.token_times_s)]
        cell: dict[str, Any] = {
            "requests": len(ok),
            "errors": len(part) - len(ok),
            "output_tokens": tokens,
            "wall_s": wall,
            "system_tokens_per_s": tokens / wall,
            "requests_per_s": len(ok) / wall,
        }
        for name, values, shown in (
            ("ttft", [r.ttft_s for r in ok], (50, 90, 99)),
            ("tpot", tpots, (50, 90, 99)),
            ("itl", itl, (50, 90, 99)),
            ("e2e", [r.total_s for r in ok], (50, 90, 99)),
            ("queue", [r.queue_s for r in ok], (50, 99)),
        ):
            for p in shown:
                cell[f"{name}_p{p}_s"] = quantile(values, p / 100)
        if slo is None:
            cell["goodput_requests_per_s"] = cell["slo_attainment"] = None
        else:
            met = [
                r
                for r in ok
                if (slo.ttft_s is None or r.ttft_s <= slo.ttft_s)
                and (slo.tpot_s is None or (t := tpot(r.token_times_s)) is None or t <= slo.tpot_s)
            ]
            cell["goodput_requests_per_s"] = len(met) / wall
            cell["slo_attainment"] = len(met) / len(ok)
        out[key] = cell
    for key, cell in out.items():
        ar = out[("ar", *key[1:])]
        cell["throughput_speedup"] = cell["system_tokens_per_s"] / ar["system_tokens_per_s"]
    return out


def _by_key(frame: pl.DataFrame) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {tuple(r[k] for k in KEY): r for r in frame.iter_rows(named=True)}


@pytest.fixture
def serving_run(tmp_path: Path) -> Path:
    return run_dirs.write_run(tmp_path / "mixed", static_rows() + serving_rows(), MANIFEST)


@pytest.mark.parametrize("slo", [Slo(**SLO), Slo(ttft_s=0.5), Slo(tpot_s=0.3), None])
def test_every_serving_metric_matches_a_hand_computation(serving_run: Path, slo: Slo | None):
    got = _by_key(serving_metrics(load_rows(serving_run), slo))
    want = expected(serving_rows(), slo)
    assert set(got) == set(want)
    for key, cell in want.items():
        for column, value in cell.items():
            if value is None:
                assert got[key][column] is None, (key, column)
            else:
                assert got[key][column] == pytest.approx(value, rel=1e-12), (key, column)
        assert got[key]["temperature"] == 0.0 and got[key]["model"] == MODEL


def test_serving_columns_and_the_slo_they_were_measured_against(serving_run: Path):
    frame = serving_metrics(load_rows(serving_run), slo_of(MANIFEST))
    assert frame.columns == SERVING_COLUMNS
    assert frame["slo_ttft_s"].to_list() == [SLO["ttft_s"]] * frame.height
    assert frame["slo_tpot_s"].to_list() == [SLO["tpot_s"]] * frame.height
    # continuous cells have no rate; poisson cells theirs
    rates = dict(zip(frame["scenario"].to_list(), frame["rate"].to_list()))
    assert rates["continuous"] is None and rates["poisson"] is not None
    assert slo_of({"grid": {}}) is None and slo_of({}) is None
    # a grid may set one objective alone (the manifest then leaves the other out)
    assert slo_of({"grid": {"slo": {"tpot_s": 0.2}}}) == Slo(ttft_s=None, tpot_s=0.2)


def test_one_objective_alone(tmp_path: Path):
    manifest = {**MANIFEST, "grid": {"methods": ["ar", "pld"], "slo": {"ttft_s": 0.5}}}
    run = run_dirs.write_run(tmp_path / "run", serving_rows(), manifest)
    write_report(run)
    md = (run / "report.md").read_text()
    assert "SLO (the grid's `slo:`): TTFT ≤ 0.5 s per request." in md
    frame = pl.read_ipc(run / "serving_metrics.arrow")
    assert frame["slo_tpot_s"].null_count() == frame.height
    assert frame["goodput_requests_per_s"].null_count() == 0


def test_throughput_counts_each_stream_once_and_error_rows_not_at_all(serving_run: Path):
    ar = _by_key(serving_metrics(load_rows(serving_run), None))[("ar", "continuous", 2, None)]
    # two streams of 2 s and 3 s (every row of a stream carries its wall time; the stream of
    # error rows alone adds none); 4 + 3 + 2 + 1 tokens of the ok requests
    assert ar["wall_s"] == pytest.approx(2.0 + 3.0)
    assert ar["output_tokens"] == 4 + 3 + 2 + 1
    assert ar["system_tokens_per_s"] == pytest.approx(10 / 5)
    assert ar["requests_per_s"] == pytest.approx(4 / 5)
    assert (ar["requests"], ar["errors"]) == (4, 2)
    # the error rows' 30 s queue and 99 s latency are nowhere
    assert ar["queue_p99_s"] < 1 and ar["e2e_p99_s"] < 2 and ar["ttft_p99_s"] < 2


def test_inter_token_latency_counts_a_multi_token_step_as_one_gap(serving_run: Path):
    pld = _by_key(serving_metrics(load_rows(serving_run), None))[("pld", "continuous", 2, None)]
    # distinct emission times: s1 0.3 0.5 0.8; s2 0.4 0.9; s3 0.2 0.6; s4 one token
    pooled = [0.2, 0.3, 0.5, 0.4]
    assert pld["itl_p50_s"] == pytest.approx(quantile(pooled, 0.5))
    assert pld["itl_p99_s"] == pytest.approx(quantile(pooled, 0.99))
    # zero gaps for tokens of one step would pull the median down to a fraction of this
    with_zeros = [*pooled, 0.0, 0.0, 0.0]
    assert pld["itl_p50_s"] != pytest.approx(quantile(with_zeros, 0.5))
    # TPOT is per token: s1's 0.5 s after its first token over 4 more tokens
    tpots = [0.5 / 4, 0.5 / 2, 0.4 / 1]
    assert pld["tpot_p50_s"] == pytest.approx(quantile(tpots, 0.5))


def test_goodput_needs_both_slos(serving_run: Path):
    cells = _by_key(serving_metrics(load_rows(serving_run), Slo(**SLO)))
    pld, ar = cells[("pld", "continuous", 2, None)], cells[("ar", "continuous", 2, None)]
    # pld: s1 and s2 meet both; s3 misses TPOT (0.4 s); s4 has one token (no TPOT), TTFT 0.45
    assert pld["slo_attainment"] == pytest.approx(3 / 4)
    assert pld["goodput_requests_per_s"] == pytest.approx(3 / 2.5)
    # ar: s1 (TTFT 0.5, TPOT 0.2) only; s3 meets TTFT but not TPOT, s2 and s4 miss TTFT
    assert ar["slo_attainment"] == pytest.approx(1 / 4)
    assert ar["goodput_requests_per_s"] == pytest.approx(1 / 5)


def test_ratio_to_ar_is_per_scenario_concurrency_and_rate(serving_run: Path):
    cells = _by_key(serving_metrics(load_rows(serving_run), None))
    assert cells[("pld", "continuous", 2, None)]["throughput_speedup"] == pytest.approx(
        (11 / 2.5) / (10 / 5)
    )
    for rate in (1.0, 2.0):
        ar, pld = cells[("ar", "poisson", 4, rate)], cells[("pld", "poisson", 4, rate)]
        assert ar["throughput_speedup"] == 1.0
        want = pld["system_tokens_per_s"] / ar["system_tokens_per_s"]
        assert pld["throughput_speedup"] == pytest.approx(want)
        assert pld["throughput_speedup"] == pytest.approx(1 / 0.6)


def test_lossless_pairs_requests_within_a_serving_cell(tmp_path: Path):
    rows = serving_rows()
    rows = [
        replace(r, output_sha256="other")
        if (r.method, r.scenario, r.rate, r.sample_id) == ("pld", "poisson", 2.0, "s2")
        else r
        for r in rows
    ]
    run = run_dirs.write_run(tmp_path / "run", rows, MANIFEST)
    cells = _by_key(serving_metrics(load_rows(run), None))
    assert cells[("pld", "poisson", 4, 2.0)]["lossless"] == pytest.approx(1 / 2)
    assert cells[("pld", "poisson", 4, 1.0)]["lossless"] == 1.0
    # ar's s1..s4 finished ok: pld's four requests are paired, ar's failed s5 and s6 are not
    assert cells[("pld", "continuous", 2, None)]["paired_keys"] == 4
    write_report(run)
    verdict = (run / "report.md").read_text().splitlines()[0]
    assert verdict.startswith("**Lossless: FAILED** 1/3")
    assert "pld on org/tiny-vl (poisson, concurrency 4, 2/s, T=0)" in verdict
    assert '<header class="verdict fail"' in (run / "report.html").read_text()


def test_a_serving_cell_whose_every_request_failed(tmp_path: Path):
    rows = [
        _failed(r.method, r.scenario, r.batch_size, r.rate, r.shard_id, r.sample_id, r.batch_s)
        if (r.method, r.rate) == ("pld", 2.0)
        else r
        for r in serving_rows()
    ]
    run = run_dirs.write_run(tmp_path / "run", rows, MANIFEST)
    cell = _by_key(serving_metrics(load_rows(run), Slo(**SLO)))[("pld", "poisson", 4, 2.0)]
    assert (cell["requests"], cell["errors"], cell["output_tokens"], cell["paired_keys"]) == (
        0,
        2,
        0,
        0,
    )
    # no time, no rate: nothing measured rather than zeros
    for column in ("wall_s", "system_tokens_per_s", "throughput_speedup", "ttft_p50_s"):
        assert cell[column] is None, column
    for column in ("goodput_requests_per_s", "slo_attainment", "itl_p50_s", "lossless"):
        assert cell[column] is None, column
    write_report(run)
    assert (
        "| poisson | 4 | 2 | pld | 0 | 2 | 0 | – | unavailable |" in (run / "report.md").read_text()
    )


def test_static_tables_leave_serving_rows_out(serving_run: Path, tmp_path: Path):
    static_only = run_dirs.write_run(tmp_path / "static", static_rows(), MANIFEST)
    mixed = load_rows(serving_run)
    assert cell_metrics(mixed).equals(cell_metrics(load_rows(static_only)))
    got, want = run_details(mixed), run_details(load_rows(static_only))
    assert got.cells.equals(want.cells) and got.latency.equals(want.latency)
    assert got.errors.equals(want.errors) and got.rows == want.rows == len(static_rows())
    # the static cell at batch size 2 holds its 2 requests, not the concurrency-2 ones too
    pooled = cell_metrics(mixed).filter(pl.col("topic") == "all", pl.col("method") == "ar")
    assert pooled["samples"].to_list() == [2]


def test_serving_section_and_charts_only_with_serving_rows(serving_run: Path, tmp_path: Path):
    write_report(serving_run)
    md = (serving_run / "report.md").read_text()
    html = (serving_run / "report.html").read_text()
    assert "## Serving" in md and 'id="serving"' in html
    assert "SLO (the grid's `slo:`): TTFT ≤ 0.5 s and TPOT ≤ 0.3 s" in md
    assert "| Scenario | Concurrency | Rate /s | Method | Requests |" in md
    assert "| Scenario | Concurrency | Rate /s | Method | TTFT p50 s |" in md
    for title in (
        "System throughput vs concurrency",
        "TTFT p50 vs arrival rate",
        "E2E p50 vs arrival rate",
        "E2E p99 vs arrival rate",
    ):
        assert f'aria-label="{title} · {MODEL} · T=0"' in html
    # ar is drawn, as the baseline: named so and dashed
    assert html.count('data-label="ar (baseline)"') == 4
    assert 'data-label="ar (baseline)">\n<polyline' in html
    baseline = html.split('data-label="ar (baseline)">\n<polyline', 1)[1].split("/>", 1)[0]
    assert "stroke-dasharray" in baseline
    frame = pl.read_ipc(serving_run / "serving_metrics.arrow")
    assert frame.columns == SERVING_COLUMNS and frame.height == 6
    assert (serving_run / "serving_metrics.csv").exists()
    # the serving errors count in the verdict's error rows, and are listed by message
    assert md.splitlines()[0].endswith("Error rows: 2.")
    assert "| org/tiny-vl | ar | continuous | 2 | – | 0 | prompt does not fit | 2 |" in md
    assert "prompt does not fit" in html

    static_only = run_dirs.write_run(tmp_path / "static", static_rows(), MANIFEST)
    write_report(static_only)
    md = (static_only / "report.md").read_text()
    html = (static_only / "report.html").read_text()
    assert "## Serving" not in md and "Serving terms" not in md
    assert 'id="serving"' not in html and "System throughput vs concurrency" not in html
    assert not (static_only / "serving_metrics.arrow").exists()


def test_a_run_of_serving_cells_alone_reports_them(tmp_path: Path):
    manifest = {**MANIFEST, "grid": {"methods": ["ar", "pld"]}}
    run = run_dirs.write_run(tmp_path / "serving", serving_rows(), manifest)
    write_report(run)
    md = (run / "report.md").read_text()
    html = (run / "report.html").read_text()
    assert md.startswith("**Lossless: all 3 checks passed.** Error rows: 2.")
    assert "No SLO in the grid" in md and "| no SLO |" in md
    assert "## Serving" in md and "no result rows" not in html
    assert pl.read_ipc(run / "metrics.arrow").height == 0
