"""Serving metrics: one row per serving cell (model, method, scenario, concurrency cap, arrival
rate, temperature), from the rows of its request streams (results/schema.py, version 4).

A serving cell runs its requests as one or more streams (a shard's stream: rows sharing
`shard_id` and `batch_index`), each `batch_s` seconds of wall time. Only ok rows count, except
in `errors`; a stream none of whose rows finished ok adds no wall time.

- system_tokens_per_s: the ok requests' new tokens / the summed wall time of their streams
  (each stream's `batch_s` once); requests_per_s: ok requests / that wall time.
- TTFT: `ttft_s`, arrival -> first token. E2E: `total_s`, arrival -> finished. Queueing delay:
  `queue_s`, arrival -> its prefill began.
- TPOT: per request with n >= 2 tokens, (token_times_s[-1] - token_times_s[0]) / (n - 1): the
  time per output token after the first, as the request saw it.
- ITL (inter-token latency): the gaps between consecutive DISTINCT emission times of a request's
  `token_times_s`, pooled over the cell's requests. A speculative step that commits several
  tokens emits them at one time: that is one gap (the wait for the step), not several gaps of
  zero, so ITL reads as the stall a streaming client sees between updates, and a method that
  commits k tokens a step shows fewer, not shorter, gaps.
- Goodput (given an SLO, `manifest["grid"]["slo"]`): ok requests meeting both ttft_s <=
  slo.ttft_s and TPOT <= slo.tpot_s, per second of wall time; a request of one token has no
  TPOT and meets that part, and an objective the grid leaves out is met by every request.
  slo_attainment: the share of ok requests meeting both. Null without an SLO.
- throughput_speedup: system_tokens_per_s over `ar`'s in the same (model, scenario,
  concurrency, rate, temperature); 1 for `ar`.
- lossless (greedy only): the share of requests (sample, turn, repeat) that finished ok under
  both the method and `ar` in the same cell whose output tokens (SHA-256) equal `ar`'s.

Percentiles are linear-interpolated quantiles, as everywhere in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from mmspec.reports.float_sums import stable_sum
from mmspec.reports.metrics import STATIC, error_message
from mmspec.reports.paired import BASELINE, SAME_WORK, pair_with_ar

# A serving cell; `batch_size` is the concurrency cap, `rate` null but for poisson cells.
SERVING_KEYS = ["model", "method", "scenario", "batch_size", "rate", "temperature"]
_SETTINGS = ["base_method", "method_args"]
SERVING_INPUTS = list(
    dict.fromkeys(
        [
            *SERVING_KEYS,
            *_SETTINGS,
            *SAME_WORK,
            "status",
            "shard_id",
            "batch_index",
            "batch_s",
            "new_tokens",
            "total_s",
            "queue_s",
            "ttft_s",
            "token_times_s",
            "output_sha256",
            "error",
        ]
    )
)
_QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
# name -> (input column, the percentiles shown)
_LATENCIES = {
    "ttft": ("ttft_s", ("p50", "p90", "p99")),
    "tpot": ("_tpot_s", ("p50", "p90", "p99")),
    "itl": ("_gap_s", ("p50", "p90", "p99")),
    "e2e": ("total_s", ("p50", "p90", "p99")),
    "queue": ("queue_s", ("p50", "p99")),
}
LATENCY_COLUMNS = [f"{name}_{p}_s" for name, (_, ps) in _LATENCIES.items() for p in ps]
SERVING_COLUMNS = [
    *SERVING_KEYS,
    *_SETTINGS,
    "requests",
    "errors",
    "output_tokens",
    "wall_s",
    "system_tokens_per_s",
    "throughput_speedup",
    "requests_per_s",
    "slo_ttft_s",
    "slo_tpot_s",
    "goodput_requests_per_s",
    "slo_attainment",
    *LATENCY_COLUMNS,
    "paired_keys",
    "lossless",
]


@dataclass(frozen=True)
class Slo:
    """A request's service-level objective: first token within ttft_s, then at most tpot_s
    per further token; None: that objective is not set (a grid sets at least one)."""

    ttft_s: float | None = None
    tpot_s: float | None = None


def slo_of(manifest: dict[str, Any]) -> Slo | None:
    """The grid's SLO (`slo: {ttft_s, tpot_s}`, either may be left out), None when the grid
    sets none."""
    slo = (manifest.get("grid") or {}).get("slo")
    if not isinstance(slo, dict):
        return None
    limits = {k: float(slo[k]) for k in ("ttft_s", "tpot_s") if slo.get(k) is not None}
    return Slo(**limits) if limits else None


def _safe_div(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    return pl.when(den > 0).then(num / den).otherwise(None)


def _per_request(ok: pl.LazyFrame, slo: Slo | None) -> pl.LazyFrame:
    """TPOT, the distinct-emission gaps and whether the request met the SLO, per ok row."""
    times = pl.col("token_times_s")
    count = times.list.len()
    tpot = pl.when(count >= 2).then((times.list.last() - times.list.first()) / (count - 1))
    frame = ok.with_columns(
        _tpot_s=tpot,
        _gaps=times.list.unique().list.sort().list.diff(null_behavior="drop"),
    )
    if slo is None:
        return frame.with_columns(_met=pl.lit(None, pl.Boolean))
    met = pl.lit(True)
    if slo.ttft_s is not None:
        met &= (pl.col("ttft_s") <= slo.ttft_s).fill_null(False)
    if slo.tpot_s is not None:
        met &= pl.col("_tpot_s").is_null() | (pl.col("_tpot_s") <= slo.tpot_s)
    return frame.with_columns(_met=met)


def _percentiles(name: str) -> list[pl.Expr]:
    column, shown = _LATENCIES[name]
    return [
        pl.col(column).quantile(_QUANTILES[p], interpolation="linear").alias(f"{name}_{p}_s")
        for p in shown
    ]


def _join(left: pl.LazyFrame, right: pl.LazyFrame) -> pl.LazyFrame:
    # `rate` is null outside poisson cells: null keys must meet.
    return left.join(right, on=SERVING_KEYS, how="left", nulls_equal=True)


def _lossless(ok: pl.DataFrame) -> pl.DataFrame:
    """paired_keys and lossless per serving cell (see the module doc)."""
    # The same work is the same request in the same (scenario, rate): each is paired apart,
    # as SAME_WORK knows neither.
    parts = [pair_with_ar(part, SERVING_KEYS) for part in ok.partition_by("scenario", "rate")]
    paired = pl.concat(parts) if parts else pair_with_ar(ok, SERVING_KEYS)
    # A missing hash cannot prove equality: a mismatch.
    same = (pl.col("output_sha256") == pl.col("ar_sha")).fill_null(False)
    return (
        paired.group_by(SERVING_KEYS)
        .agg(paired_keys=pl.len().cast(pl.UInt32), lossless=same.mean())
        # Sampled outputs differ by design: only greedy decoding is checked.
        .with_columns(lossless=pl.when(pl.col("temperature") == 0).then("lossless"))
    )


def _versus_ar(cells: pl.LazyFrame) -> pl.LazyFrame:
    keys = [k for k in SERVING_KEYS if k != "method"]
    ar = cells.filter(pl.col("method") == BASELINE).select(*keys, _ar=pl.col("system_tokens_per_s"))
    ratio = _safe_div(pl.col("system_tokens_per_s"), pl.col("_ar"))
    is_ar = (pl.col("method") == BASELINE) & pl.col("system_tokens_per_s").is_not_null()
    return (
        cells.join(ar, on=keys, how="left", nulls_equal=True)
        .with_columns(throughput_speedup=pl.when(is_ar).then(1.0).otherwise(ratio))
        .drop("_ar")
    )


def _serving_rows(rows: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    return (
        rows.lazy()
        .filter(pl.col("scenario") != STATIC)
        .select(SERVING_INPUTS)
        .with_columns(pl.col("model", "method", "scenario").cast(pl.String))
        .collect()
    )


def serving_metrics(rows: pl.LazyFrame | pl.DataFrame, slo: Slo | None) -> pl.DataFrame:
    """SERVING_COLUMNS per serving cell of `rows` (a run's rows, every scenario; the static
    ones are left out), sorted by model, temperature, scenario, concurrency, rate, method.
    Empty (with those columns) for a run without serving rows."""
    return _cell_metrics(_serving_rows(rows), slo)


def _cell_metrics(frame: pl.DataFrame, slo: Slo | None) -> pl.DataFrame:
    """serving_metrics() of `frame`, the serving rows (SERVING_INPUTS) alone."""
    is_ok = pl.col("status") == "ok"
    ok = _per_request(frame.lazy().filter(is_ok), slo)
    counts = (
        frame.lazy()
        .group_by(SERVING_KEYS)
        .agg(pl.col(_SETTINGS).first(), errors=(~is_ok).sum().cast(pl.UInt32))
    )
    requests = ok.group_by(SERVING_KEYS).agg(
        *[e for name in ("ttft", "tpot", "e2e", "queue") for e in _percentiles(name)],
        requests=pl.len().cast(pl.UInt32),
        output_tokens=pl.col("new_tokens").cast(pl.Int64).sum(),
        _met=pl.col("_met").sum(),
    )
    gaps = (
        ok.select(*SERVING_KEYS, _gap_s=pl.col("_gaps"))
        .explode("_gap_s")
        .drop_nulls("_gap_s")
        .group_by(SERVING_KEYS)
        .agg(_percentiles("itl"))
    )
    # A stream's wall time once, however many of its rows carry it.
    walls = (
        ok.group_by(*SERVING_KEYS, "shard_id", "batch_index")
        .agg(pl.col("batch_s").max())
        .group_by(SERVING_KEYS)
        .agg(wall_s=stable_sum(pl.col("batch_s")))
    )
    has_slo = slo is not None
    cells = (
        _join(_join(_join(counts, requests), gaps), walls)
        .with_columns(
            requests=pl.col("requests").fill_null(0),
            output_tokens=pl.col("output_tokens").fill_null(0),
        )
        .with_columns(
            system_tokens_per_s=_safe_div(pl.col("output_tokens"), pl.col("wall_s")),
            requests_per_s=_safe_div(pl.col("requests"), pl.col("wall_s")),
            slo_ttft_s=pl.lit(slo.ttft_s if has_slo else None, pl.Float64),
            slo_tpot_s=pl.lit(slo.tpot_s if has_slo else None, pl.Float64),
            goodput_requests_per_s=_safe_div(pl.col("_met"), pl.col("wall_s"))
            if has_slo
            else pl.lit(None, pl.Float64),
            slo_attainment=_safe_div(pl.col("_met"), pl.col("requests"))
            if has_slo
            else pl.lit(None, pl.Float64),
        )
    )
    cells = _join(_versus_ar(cells), _lossless(frame.filter(is_ok)).lazy())
    return (
        cells.with_columns(paired_keys=pl.col("paired_keys").fill_null(0))
        .select(SERVING_COLUMNS)
        .sort(["model", "temperature", "scenario", "batch_size", "rate", "method"])
        .collect()
    )


def serving_errors(frame: pl.DataFrame) -> pl.DataFrame:
    """The error rows of each serving cell by message (metrics.error_message's form): the
    SERVING_KEYS, error, rows; most frequent first."""
    return (
        frame.filter(pl.col("status") != "ok")
        .with_columns(error_message(pl.col("error").cast(pl.String)))
        .group_by(*SERVING_KEYS, "error")
        .agg(rows=pl.len().cast(pl.UInt32))
        .sort(
            ["rows", *SERVING_KEYS, "error"], descending=[True, *[False] * len(SERVING_KEYS), False]
        )
    )


@dataclass(frozen=True)
class ServingReport:
    """What the report's Serving section shows.

    cells:  serving_metrics() per serving cell
    errors: serving_errors(): error rows per serving cell and message
    slo:    the grid's SLO the goodput columns were measured against (None: none set)
    """

    cells: pl.DataFrame
    errors: pl.DataFrame
    slo: Slo | None


def serving_report(
    rows: pl.LazyFrame | pl.DataFrame, manifest: dict[str, Any]
) -> ServingReport | None:
    """The Serving section's numbers for a run's rows; None when none is a serving row."""
    frame = _serving_rows(rows)
    if frame.height == 0:
        return None
    slo = slo_of(manifest)
    return ServingReport(_cell_metrics(frame, slo), serving_errors(frame), slo)


def serving_summary(serving: pl.DataFrame) -> str:
    """One line: requests, errors, scenarios, concurrency caps and rates of the serving cells."""
    rates = sorted({r for r in serving["rate"].to_list() if r is not None})
    parts = [
        f"{int(serving['requests'].sum()):,} requests ({int(serving['errors'].sum()):,} errors)",
        "scenarios: " + ", ".join(sorted(set(serving["scenario"].to_list()))),
        "concurrency: " + ", ".join(str(b) for b in sorted(set(serving["batch_size"].to_list()))),
    ]
    if rates:
        parts.append("arrival rates: " + ", ".join(f"{r:g}/s" for r in rates))
    return " · ".join(parts)
