"""Per-cell metrics from a run's result rows: one row per (model, method, batch size, temperature,
topic), plus an "all" topic that pools every topic of the cell. Repeats are pooled.

run_details() adds what the report shows beside them (latency breakdown and CDF, energy, memory,
error messages). Both read the rows once into memory and group on integer ids (keys.py): a
million-row run reports in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from mmspec.reports.float_sums import stable_mean, stable_sum
from mmspec.reports.paired import SAME_WORK, pair_with_ar, paired_aggregates
from mmspec.reports.row_ids import row_ids
from mmspec.results.layout import result_files
from mmspec.results.schema import RESULT_SCHEMA, SCHEMA_VERSION

ALL_TOPIC = "all"
GROUP_KEYS = ["model", "method", "batch_size", "temperature", "topic"]
CELL_KEYS = GROUP_KEYS[:-1]  # a cell of the grid, topics pooled
_VERSION_KEY = b"mmspec.schema_version"


def _check_schema_version(path: Path) -> None:
    # Only the footer is read; a file from another schema version would silently mean other things.
    # A plain file handle: mapping thousands of shards just to read their footers costs more.
    with pa.OSFile(str(path)) as source:
        metadata = ipc.open_file(source).schema.metadata or {}
    version = metadata.get(_VERSION_KEY, b"").decode()
    if version != str(SCHEMA_VERSION):
        raise ValueError(
            f"{path}: schema version {version!r}, this reader expects {SCHEMA_VERSION}"
        )


def load_rows(run_dir: str | Path) -> pl.LazyFrame:
    """All result rows of a run as a lazy frame (empty, with the schema, when none were written)."""
    files = result_files(run_dir)
    if not files:
        return pl.from_arrow(RESULT_SCHEMA.empty_table()).lazy()
    for path in files:
        _check_schema_version(path)
    # The columns already carry model/method/...; the key=value folders are only for humans.
    return pl.scan_ipc(files, hive_partitioning=False)


def _safe_div(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    # Null rather than inf/NaN: a group with no steps or no time has no rate, not an infinite one.
    return pl.when(den > 0).then(num / den).otherwise(None)


def _ok_aggregates(ok: pl.LazyFrame, keys: list[str]) -> pl.LazyFrame:
    steps = pl.col("steps_sum")
    accepted = pl.col("accepted_tokens")
    return (
        ok.group_by(keys)
        .agg(
            samples=pl.len(),
            # Int32 sums stay Int32 in polars; a long run's token totals could overflow that.
            new_tokens=pl.col("new_tokens").cast(pl.Int64).sum(),
            steps_sum=pl.col("steps").cast(pl.Int64).sum(),
            skipped_steps=pl.col("skipped_steps").cast(pl.Int64).sum(),
            accepted_tokens=pl.col("accepted_tokens").cast(pl.Int64).sum(),
            drafted_tokens=pl.col("drafted_tokens").cast(pl.Int64).sum(),
            total_s_sum=stable_sum(pl.col("total_s")),
            latency_p50_s=pl.col("total_s").quantile(0.5, interpolation="linear"),
            latency_p90_s=pl.col("total_s").quantile(0.9, interpolation="linear"),
            prefill_s_mean=stable_mean(pl.col("prefill_s")),
            draft_s_mean=stable_mean(pl.col("draft_s")),
            verify_s_mean=stable_mean(pl.col("verify_s")),
            commit_s_mean=stable_mean(pl.col("commit_s")),
        )
        .with_columns(
            # MMSpec's acceptance length excludes the bonus token; Spec-Bench's includes it.
            MAT=_safe_div(accepted, steps),
            MAT_with_bonus=_safe_div(accepted + steps, steps),
            accept_rate=_safe_div(accepted, pl.col("drafted_tokens")),
            tokens_per_s=_safe_div(pl.col("new_tokens"), pl.col("total_s_sum")),
        )
        .rename({"steps_sum": "steps"})
        .drop("total_s_sum")
    )


METRIC_COLUMNS = [
    *GROUP_KEYS,
    "samples",
    "errors",
    "new_tokens",
    "steps",
    "skipped_steps",
    "accepted_tokens",
    "drafted_tokens",
    "MAT",
    "MAT_with_bonus",
    "accept_rate",
    "tokens_per_s",
    "latency_p50_s",
    "latency_p90_s",
    "prefill_s_mean",
    "draft_s_mean",
    "verify_s_mean",
    "commit_s_mean",
    "paired_keys",
    "speedup_global",
    "speedup_paired",
    "lossless",
]


# What cell_metrics reads: selecting it up front lets the scan skip the heavy columns (output
# tokens and text) and read every shard file once, however many aggregates follow.
CELL_INPUTS = [
    *GROUP_KEYS,
    *[k for k in SAME_WORK if k not in GROUP_KEYS],
    "status",
    "new_tokens",
    "steps",
    "skipped_steps",
    "accepted_tokens",
    "drafted_tokens",
    "total_s",
    "prefill_s",
    "draft_s",
    "verify_s",
    "commit_s",
    "output_sha256",
]
# Low-cardinality labels (and sample ids) become Categorical while the rows are in memory: groups
# and joins then hash small integers instead of strings. Metrics carry plain strings again.
_LABELS = ["model", "method", "topic", "workload", "status", "sample_id"]


def collect_rows(rows: pl.LazyFrame | pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """`columns` of `rows` in memory, labels (model, method, topic, ...) as Categorical."""
    return (
        rows.lazy()
        .select(pl.col(c).cast(pl.Categorical) if c in _LABELS else pl.col(c) for c in columns)
        .collect()
    )


# Row ids of a (model, method, batch size, temperature, topic) group and of its cell: grouping
# by one integer column is several times cheaper than by the five columns (see keys.py).
_TOPIC_ID, _CELL_ID = "_topic_id", "_cell_id"


def _level_metrics(
    rows: pl.LazyFrame, ok: pl.LazyFrame, paired: pl.LazyFrame, level_id: str, keys: list[str]
) -> pl.LazyFrame:
    """METRIC_COLUMNS per `level_id` group; at the cell level, the pooled "all" topic."""
    is_ok = pl.col("status") == "ok"
    # Group keys come from all rows so a cell whose every row failed still appears.
    counts = rows.group_by(level_id).agg(
        pl.col(keys).first(), errors=(~is_ok).sum().cast(pl.UInt32)
    )
    frame = (
        counts.join(_ok_aggregates(ok, [level_id]), on=level_id, how="left")
        .join(paired_aggregates(paired, [level_id]), on=level_id, how="left")
        # Counts of a cell with no ok row are zero; its rates and times stay null (undefined).
        .with_columns(
            pl.col(
                "new_tokens", "steps", "skipped_steps", "accepted_tokens", "drafted_tokens"
            ).fill_null(0),
            samples=pl.col("samples").fill_null(0).cast(pl.UInt32),
            paired_keys=pl.col("paired_keys").fill_null(0).cast(pl.UInt32),
        )
    )
    if "topic" not in keys:
        frame = frame.with_columns(topic=pl.lit(ALL_TOPIC))
    return frame.with_columns(pl.col("model", "method", "topic").cast(pl.String)).select(
        METRIC_COLUMNS
    )


def cell_metrics(rows: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """Metrics per (model, method, batch_size, temperature, topic); see METRIC_COLUMNS.

    Rows whose status is not "ok" count only in `errors`. Speedup and lossless compare each row
    with the `ar` row of the same sample, turn and repeat (see paired.py). The "all" topic pools
    every topic of a cell (sums over all its rows, not a mean of topics).
    """
    frame = collect_rows(rows, CELL_INPUTS)
    frame = frame.with_columns(
        row_ids(frame, GROUP_KEYS).alias(_TOPIC_ID), row_ids(frame, CELL_KEYS).alias(_CELL_ID)
    )
    ok = frame.filter(pl.col("status") == "ok")
    # Paired once, then grouped per topic and per cell: the pairing is the costly step.
    paired = pair_with_ar(ok, [_TOPIC_ID, _CELL_ID, "temperature"]).lazy()
    levels = pl.collect_all(
        [
            _level_metrics(frame.lazy(), ok.lazy(), paired, _TOPIC_ID, GROUP_KEYS),
            _level_metrics(frame.lazy(), ok.lazy(), paired, _CELL_ID, CELL_KEYS),
        ]
    )
    # "all" sorts after real topics so tables read left to right, totals last.
    return pl.concat(levels).sort(
        [*GROUP_KEYS[:-1], pl.col("topic") == ALL_TOPIC, "topic"],
    )


# ---------------------------------------------------------------- what the report adds


# The report's own inputs: cell_metrics' plus error text and telemetry.
REPORT_INPUTS = [*CELL_INPUTS, "error", "energy_j", "peak_mem_bytes"]
# Latency CDF points: every percentile, plus the far tail where speculation tends to differ.
CDF_QUANTILES = (*(i / 100 for i in range(100)), 0.995, 0.999, 1.0)
PHASES = ["prefill_s", "draft_s", "verify_s", "commit_s"]


@dataclass(frozen=True)
class RunDetails:
    """What the report shows beside cell_metrics, per cell (model, method, batch size,
    temperature) with topics pooled; ok rows only unless said otherwise.

    cells:   CELL_KEYS, total_s_mean, other_s_mean (total_s minus the four timed phases, see
             markdown.LEGEND), latency_p99_s, energy_rows, energy_per_token_j, peak_mem_bytes
    latency: CELL_KEYS, quantile, latency_s: total_s at each of CDF_QUANTILES (linear)
    errors:  CELL_KEYS, error, rows: the error rows of each cell by message, most frequent first
    rows:    every row of the run, errors included
    """

    cells: pl.DataFrame
    latency: pl.DataFrame
    errors: pl.DataFrame
    rows: int


def _cell_details(ok: pl.LazyFrame) -> pl.LazyFrame:
    other = pl.col("total_s") - pl.sum_horizontal(PHASES)
    measured = pl.col("energy_j").is_not_null()
    return (
        ok.group_by(_CELL_ID)
        .agg(
            pl.col(CELL_KEYS).first(),
            total_s_mean=stable_mean(pl.col("total_s")),
            other_s_mean=stable_mean(other),
            latency_p99_s=pl.col("total_s").quantile(0.99, interpolation="linear"),
            energy_rows=measured.sum().cast(pl.UInt32),
            energy_j=stable_sum(pl.col("energy_j")),
            energy_tokens=pl.col("new_tokens").filter(measured).cast(pl.Int64).sum(),
            peak_mem_bytes=pl.col("peak_mem_bytes").max(),
        )
        .with_columns(
            # Per generated token over the rows that have a reading; null when none has one.
            energy_per_token_j=_safe_div(pl.col("energy_j"), pl.col("energy_tokens")),
        )
    )


def _latency_points(ok: pl.DataFrame) -> pl.DataFrame:
    # ~100 quantiles per cell's CDF rather than every row: numpy over each cell's slice of the
    # latencies, the slices found by sorting on the cell id once.
    lat = ok.select(_CELL_ID, "total_s").drop_nulls().sort(_CELL_ID)
    ids, values = lat[_CELL_ID].to_numpy(), lat["total_s"].to_numpy()
    bounds = np.flatnonzero(np.diff(ids)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(ids)]
    quantiles = np.asarray(CDF_QUANTILES)
    points = [np.quantile(values[a:b], quantiles) for a, b in zip(starts, ends) if b > a]
    frame = pl.DataFrame(
        {
            _CELL_ID: np.repeat(ids[starts[: len(points)]], len(quantiles)),
            "quantile": np.tile(quantiles, len(points)),
            "latency_s": np.concatenate(points) if points else np.zeros(0),
        },
        schema={_CELL_ID: pl.UInt64, "quantile": pl.Float64, "latency_s": pl.Float64},
    )
    labels = ok.group_by(_CELL_ID).agg(pl.col(CELL_KEYS).first())
    return frame.join(labels, on=_CELL_ID, how="left", maintain_order="left").select(
        *CELL_KEYS, "quantile", "latency_s"
    )


def run_details(rows: pl.LazyFrame | pl.DataFrame) -> RunDetails:
    """Latency breakdown, tail, CDF points, energy, memory and error messages (see RunDetails)."""
    frame = collect_rows(rows, REPORT_INPUTS)
    frame = frame.with_columns(row_ids(frame, CELL_KEYS).alias(_CELL_ID))
    is_ok = pl.col("status") == "ok"
    needed = [_CELL_ID, *CELL_KEYS, *PHASES, "total_s", "new_tokens", "energy_j", "peak_mem_bytes"]
    ok = frame.lazy().select(*needed, "status").filter(is_ok).drop("status").collect()
    cells, errors = pl.collect_all(
        [
            _cell_details(ok.lazy()),
            frame.lazy()
            .filter(~is_ok)
            .group_by(*CELL_KEYS, "error")
            .agg(rows=pl.len().cast(pl.UInt32)),
        ]
    )
    labels = [k for k in CELL_KEYS if k in _LABELS]

    def plain(f: pl.DataFrame) -> pl.DataFrame:
        return f.with_columns(pl.col(labels).cast(pl.String)).sort(CELL_KEYS, maintain_order=True)

    return RunDetails(
        cells=plain(cells.drop(_CELL_ID, "energy_j", "energy_tokens")),
        latency=plain(_latency_points(ok)),
        errors=errors.with_columns(pl.col(labels).cast(pl.String)).sort(
            ["rows", *CELL_KEYS, "error"], descending=[True, *[False] * len(CELL_KEYS), False]
        ),
        rows=frame.height,
    )
