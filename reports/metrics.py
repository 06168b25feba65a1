"""Per-cell metrics from a run's result rows: one row per (model, method, batch size, temperature,
topic), plus an "all" topic that pools every topic of the cell. Repeats are pooled.

Beside our MAT and speedups (time ratios over the samples both methods ran): MMSpec's own
definitions (`*_mmspec`, draft_accept_mean: evaluation/summarize_metrics.py), throughput against
latency per cell (system tokens/s from the batches' wall times, TTFT, TPOT, tails; see
throughput.py), acceptance per draft position (acceptance.py) and the roofline: the speedup
verification cost alone allows, and the share of it reached (roofline.py).

run_details() adds what the report shows beside them (latency breakdown and CDF, energy, memory,
error messages). Both read the rows once into memory and group on integer ids (keys.py): a
million-row run reports in seconds.

Both take the static scenario's rows alone: a serving cell's batch size is a concurrency cap,
not a batch, and its latencies count from arrival (serving.py has its metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from mmspec.reports.acceptance import DRAFTING_STEPS, acceptance_stats, is_acceptance_column
from mmspec.reports.float_sums import stable_mean, stable_sum
from mmspec.reports.paired import BASELINE, SAME_WORK, pair_with_ar, paired_aggregates
from mmspec.reports.roofline import (
    COST_INPUTS,
    ROOFLINE_COLUMNS,
    roofline_stats,
    shard_costs,
    with_roofline,
)
from mmspec.reports.row_ids import row_ids
from mmspec.results.layout import result_files
from mmspec.results.schema import ADDED_IN, READABLE_VERSIONS, RESULT_SCHEMA, SCHEMA_VERSION

ALL_TOPIC = "all"
STATIC = "static"  # the scenario of batches (results/schema.py); serving.py reads the others
GROUP_KEYS = ["model", "method", "batch_size", "temperature", "topic"]
CELL_KEYS = GROUP_KEYS[:-1]  # a cell of the grid, topics pooled
_VERSION_KEY = b"mmspec.schema_version"


def _schema_version(path: Path) -> int:
    """The file's schema version; ValueError for one this reader cannot read."""
    # Only the footer is read; a file from another schema version would silently mean other things.
    # A plain file handle: mapping thousands of shards just to read their footers costs more.
    with pa.OSFile(str(path)) as source:
        metadata = ipc.open_file(source).schema.metadata or {}
    version = metadata.get(_VERSION_KEY, b"").decode()
    if version not in {str(v) for v in READABLE_VERSIONS}:
        raise ValueError(
            f"{path}: schema version {version!r}, this reader expects {SCHEMA_VERSION} (or one "
            f"of {', '.join(map(str, READABLE_VERSIONS))})"
        )
    return int(version)


def _scan(files: list[Path]) -> pl.LazyFrame:
    # The columns already carry model/method/...; the key=value folders are only for humans.
    # Paths are files, never patterns: a `[` in a name must not turn into a glob that matches
    # nothing (and so drops the file without a word).
    return pl.scan_ipc(files, hive_partitioning=False, glob=False)


def _upgraded(files: list[Path], version: int) -> pl.LazyFrame:
    """Files of one schema version as rows of the current one: what a version lacked is filled
    in (a run from before variants ran each method once: base_method is method, the arguments
    went unrecorded)."""
    frame = _scan(files)
    fills = {
        "base_method": pl.col("method"),
        "method_args": pl.lit(None, pl.String),
        "verify_cost_tokens": pl.lit(None, pl.List(pl.Int32)),
        "verify_cost_s": pl.lit(None, pl.List(pl.Float64)),
        "scenario": pl.lit("static"),
        "rate": pl.lit(None, pl.Float64),
        "arrival_s": pl.lit(None, pl.Float64),
        "queue_s": pl.lit(None, pl.Float64),
        "ttft_s": pl.lit(None, pl.Float64),
        "token_times_s": pl.lit(None, pl.List(pl.Float64)),
    }
    added = [n for v, names in ADDED_IN.items() if v > version for n in names]
    return frame.with_columns(**{n: fills[n] for n in added}).select(RESULT_SCHEMA.names)


def load_rows(run_dir: str | Path) -> pl.LazyFrame:
    """All result rows of a run as a lazy frame (empty, with the schema, when none were written).

    Files of an older schema version (READABLE_VERSIONS; a run resumed after an upgrade holds
    both) read as the current one."""
    files = result_files(run_dir)
    if not files:
        return pl.from_arrow(RESULT_SCHEMA.empty_table()).lazy()
    by_version: dict[int, list[Path]] = {}
    for path in files:
        by_version.setdefault(_schema_version(path), []).append(path)
    if list(by_version) == [SCHEMA_VERSION]:
        return _scan(files)
    return pl.concat([_upgraded(paths, v) for v, paths in sorted(by_version.items())])


_TPOT = "_tpot_s"  # time per output token after the first, per row (see cell_metrics)


def _quantile(column: str, q: float) -> pl.Expr:
    return pl.col(column).quantile(q, interpolation="linear")


def _safe_div(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    # Null rather than inf/NaN: a group with no steps or no time has no rate, not an infinite one.
    return pl.when(den > 0).then(num / den).otherwise(None)


def _ok_aggregates(ok: pl.LazyFrame, keys: list[str]) -> pl.LazyFrame:
    steps = pl.col("steps_sum")
    accepted = pl.col("accepted_tokens")
    return (
        ok.group_by(keys)
        .agg(
            # One method per group (groups are cells or topics of a cell); a label, not a key.
            pl.col("method").first().cast(pl.String),
            samples=pl.len(),
            # Int32 sums stay Int32 in polars; a long run's token totals could overflow that.
            new_tokens=pl.col("new_tokens").cast(pl.Int64).sum(),
            steps_sum=pl.col("steps").cast(pl.Int64).sum(),
            skipped_steps=pl.col("skipped_steps").cast(pl.Int64).sum(),
            accepted_tokens=pl.col("accepted_tokens").cast(pl.Int64).sum(),
            drafted_tokens=pl.col("drafted_tokens").cast(pl.Int64).sum(),
            total_s_sum=stable_sum(pl.col("total_s")),
            latency_p50_s=_quantile("total_s", 0.5),
            latency_p90_s=_quantile("total_s", 0.9),
            latency_p99_s=_quantile("total_s", 0.99),
            # Time to first token: a row's prefill, which ends with its first token (in a
            # batch, the batch's prefill: every row starts with it).
            ttft_p50_s=_quantile("prefill_s", 0.5),
            ttft_p90_s=_quantile("prefill_s", 0.9),
            tpot_p50_s=_quantile(_TPOT, 0.5),
            tpot_p90_s=_quantile(_TPOT, 0.9),
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
            # MMSpec's summarize_metrics: MAT is tokens per verification round (the bonus
            # included), draft_accept_mean the mean of the per-round accepted drafts, which
            # plain decoding does not record (NaN there; null here).
            MAT_mmspec=_safe_div(pl.col("new_tokens"), steps),
            draft_accept_mean=pl.when(pl.col("method") != BASELINE).then(
                _safe_div(accepted, steps)
            ),
        )
        .rename({"steps_sum": "steps"})
        .drop("total_s_sum", "method")
    )


# What a cell's method is beside its name (results/variants.py): the registered method and the
# arguments it ran with (null for runs that did not record them).
SETTING_COLUMNS = ["base_method", "method_args"]
METRIC_COLUMNS = [
    *GROUP_KEYS,
    *SETTING_COLUMNS,
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
    # the roofline: what verification cost alone allows, and the share reached (roofline.py)
    *ROOFLINE_COLUMNS,
    # MMSpec's own definitions (evaluation/summarize_metrics.py), beside ours
    "MAT_mmspec",
    "draft_accept_mean",
    "speedup_paired_mmspec",
    "speedup_global_mmspec",
    # throughput against latency, per cell
    "system_tokens_per_s",
    "throughput_speedup",
    "latency_speedup",
    "latency_p99_s",
    "ttft_p50_s",
    "ttft_p90_s",
    "tpot_p50_s",
    "tpot_p90_s",
    # acceptance per draft position: drafting_steps here, then acceptance.acceptance_columns()
    "drafting_steps",
]
# Filled in after both levels are built, from the `ar` row of the same group.
_VS_AR = ("speedup_global_mmspec", "throughput_speedup", "latency_speedup")
# Only a cell has them (topics pooled): a batch mixes topics, so its wall time has no share
# per topic.
_CELL_ONLY = ("system_tokens_per_s",)


# What cell_metrics reads: selecting it up front lets the scan skip the heavy columns (output
# tokens and text) and read every shard file once, however many aggregates follow.
CELL_INPUTS = [
    *GROUP_KEYS,
    *SETTING_COLUMNS,
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
    # a batch is (shard, batch index); its wall time is batch_s (system throughput)
    "shard_id",
    "batch_index",
    "batch_s",
    "accept_lengths",
    *COST_INPUTS,
    # only static rows are read (static_rows)
    "scenario",
]
# Low-cardinality labels (and sample ids) become Categorical while the rows are in memory: groups
# and joins then hash small integers instead of strings. Metrics carry plain strings again.
_LABELS = [
    "model",
    "method",
    "topic",
    "workload",
    "status",
    "sample_id",
    "shard_id",
    "scenario",
]


def static_rows(rows: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """The rows of the static scenario (batches), lazily."""
    return rows.lazy().filter(pl.col("scenario") == STATIC)


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
    rows: pl.LazyFrame,
    ok: pl.LazyFrame,
    paired: pl.LazyFrame,
    level_id: str,
    keys: list[str],
    extras: list[pl.DataFrame],
) -> pl.LazyFrame:
    """METRIC_COLUMNS per `level_id` group; at the cell level, the pooled "all" topic.

    `extras` are frames keyed by `level_id` with more of METRIC_COLUMNS (acceptance per
    position, system throughput, the roofline's cost ratio); a column no frame gives is null
    at this level.
    """
    is_ok = pl.col("status") == "ok"
    # Group keys come from all rows so a cell whose every row failed still appears.
    counts = rows.group_by(level_id).agg(
        # a method's name stands for one setting in a run: its setting rides along
        pl.col(keys).first(),
        pl.col(SETTING_COLUMNS).first(),
        errors=(~is_ok).sum().cast(pl.UInt32),
    )
    frame = counts.join(_ok_aggregates(ok, [level_id]), on=level_id, how="left").join(
        paired_aggregates(paired, [level_id]), on=level_id, how="left"
    )
    for extra in extras:
        frame = frame.join(extra.lazy(), on=level_id, how="left")
    frame = frame.with_columns(
        # Counts of a cell with no ok row are zero; its rates and times stay null (undefined).
        pl.col(
            "new_tokens", "steps", "skipped_steps", "accepted_tokens", "drafted_tokens"
        ).fill_null(0),
        samples=pl.col("samples").fill_null(0).cast(pl.UInt32),
        paired_keys=pl.col("paired_keys").fill_null(0).cast(pl.UInt32),
    )
    if "topic" not in keys:
        frame = frame.with_columns(topic=pl.lit(ALL_TOPIC))
    present = set(frame.collect_schema().names())
    missing = [
        pl.lit(None, pl.Float64).alias(c) for c in _extra_columns(extras) if c not in present
    ]
    missing += [
        pl.lit(None, pl.Float64).alias(c) for c in (*_CELL_ONLY, *_VS_AR) if c not in present
    ]
    if DRAFTING_STEPS not in present:
        missing.append(pl.lit(None, pl.Int64).alias(DRAFTING_STEPS))
    frame = frame.with_columns(missing) if missing else frame
    frame = with_roofline(frame)
    return frame.with_columns(pl.col("model", "method", "topic").cast(pl.String)).select(
        *METRIC_COLUMNS, *_extra_columns(extras)
    )


def _extra_columns(extras: list[pl.DataFrame]) -> list[str]:
    """The acceptance columns among `extras`, in their order."""
    return [c for extra in extras for c in extra.columns if is_acceptance_column(c)]


def _system_throughput(ok: pl.DataFrame) -> pl.DataFrame:
    """Per cell: system_tokens_per_s = tokens of its batches / their wall time.

    A batch is the rows of one shard sharing a batch index; its wall time is their batch_s. A
    batch the runner had to split (out of memory) ran as halves one after the other, each with
    its own batch_s: the distinct values add up. A cell whose batches record no time has none.
    """
    # One row per (batch, distinct wall time) first: summing a cell's few hundred thousand
    # wall times once is far cheaper than an order-independent sum inside every batch.
    batches = ok.group_by(_CELL_ID, "shard_id", "batch_index", "batch_s").agg(
        tokens=pl.col("new_tokens").cast(pl.Int64).sum()
    )
    return (
        batches.group_by(_CELL_ID)
        .agg(tokens=pl.col("tokens").sum(), wall_s=stable_sum(pl.col("batch_s")))
        .select(_CELL_ID, system_tokens_per_s=_safe_div(pl.col("tokens"), pl.col("wall_s")))
    )


def _versus_ar(metrics: pl.DataFrame) -> pl.DataFrame:
    """The columns of _VS_AR, each method's against the `ar` row of the same model, batch size,
    temperature and topic."""
    ar = metrics.filter(pl.col("method") == BASELINE).select(
        *[k for k in GROUP_KEYS if k != "method"],
        _ar_tps=pl.col("tokens_per_s"),
        _ar_system=pl.col("system_tokens_per_s"),
    )
    is_ar = pl.col("method") == BASELINE

    def ratio(column: str, baseline: str) -> pl.Expr:
        # `ar` against itself is 1 by definition (where it has the number at all).
        value = _safe_div(pl.col(column), pl.col(baseline))
        return pl.when(is_ar & pl.col(column).is_not_null()).then(1.0).otherwise(value)

    return (
        metrics.join(
            ar, on=[k for k in GROUP_KEYS if k != "method"], how="left", maintain_order="left"
        )
        .with_columns(
            # MMSpec's global speedup: the method's tokens / s over ar's, all ok rows of each.
            speedup_global_mmspec=ratio("tokens_per_s", "_ar_tps"),
            throughput_speedup=ratio("system_tokens_per_s", "_ar_system"),
            # Per request: ar's mean latency over the method's on the same requests, which is
            # what speedup_global has always been; named apart to stand beside throughput.
            latency_speedup=pl.col("speedup_global"),
        )
        .drop("_ar_tps", "_ar_system")
    )


def cell_metrics(rows: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """Metrics per (model, method, batch_size, temperature, topic) of the static rows; see
    METRIC_COLUMNS, then acceptance.acceptance_columns() for the run's longest accepted draft.

    Rows whose status is not "ok" count only in `errors`. Speedup and lossless compare each row
    with the `ar` row of the same sample, turn and repeat (see paired.py). The "all" topic pools
    every topic of a cell (sums over all its rows, not a mean of topics).
    """
    frame = collect_rows(static_rows(rows), CELL_INPUTS)
    frame = frame.with_columns(
        row_ids(frame, GROUP_KEYS).alias(_TOPIC_ID), row_ids(frame, CELL_KEYS).alias(_CELL_ID)
    )
    _, accept = acceptance_stats(
        frame, {_TOPIC_ID: frame[_TOPIC_ID], _CELL_ID: frame[_CELL_ID]}, BASELINE
    )
    # The step lengths are counted and each shard's t(T) taken once: no later step should copy
    # them along with the rows.
    frame = frame.drop("accept_lengths")
    costs = shard_costs(frame.filter(pl.col("status") == "ok"), _TOPIC_ID, _CELL_ID)
    frame = frame.drop(COST_INPUTS)
    decode_tokens = pl.col("new_tokens") - 1
    ok = frame.filter(pl.col("status") == "ok").with_columns(
        # Time per output token after the first: what follows the prefill, per later token.
        _safe_div(pl.col("total_s") - pl.col("prefill_s"), decode_tokens.cast(pl.Float64)).alias(
            _TPOT
        )
    )
    # Paired once, then grouped per topic and per cell: the pairing is the costly step.
    paired = pair_with_ar(ok, [_TOPIC_ID, _CELL_ID, "temperature"]).lazy()
    topic_extras = [*([accept[_TOPIC_ID]] if accept else []), roofline_stats(costs, _TOPIC_ID)]
    cell_extras = [
        *([accept[_CELL_ID]] if accept else []),
        _system_throughput(ok),
        roofline_stats(costs, _CELL_ID),
    ]
    levels = pl.collect_all(
        [
            _level_metrics(frame.lazy(), ok.lazy(), paired, _TOPIC_ID, GROUP_KEYS, topic_extras),
            _level_metrics(frame.lazy(), ok.lazy(), paired, _CELL_ID, CELL_KEYS, cell_extras),
        ]
    )
    # "all" sorts after real topics so tables read left to right, totals last.
    metrics = pl.concat(levels).sort(
        [*GROUP_KEYS[:-1], pl.col("topic") == ALL_TOPIC, "topic"],
    )
    return _versus_ar(metrics)


# ---------------------------------------------------------------- what the report adds


# Per-object noise in error texts: PIL names the BytesIO it could not read by its address, Ray
# names actors, tasks and nodes by id. Masked before grouping, so one failure is one line.
_ERROR_NOISE = (
    (r"0x[0-9a-fA-F]+", "0x…"),  # memory addresses
    (r"\b[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\b", "…"),  # UUIDs
    (r"\b[0-9a-f]{16,}\b", "…"),  # Ray's hex ids (actors, tasks, nodes, objects)
    (r"\bpid=\d+", "pid=…"),  # Ray's "(pid=1234, ip=...)" prefix
)


def error_message(error: pl.Expr) -> pl.Expr:
    """An error text with its per-object noise masked (`0x7f3a…` -> `0x…`): the form every
    grouping of error messages uses."""
    for pattern, mask in _ERROR_NOISE:
        error = error.str.replace_all(pattern, mask)
    return error


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
             markdown.LEGEND), energy_rows, energy_per_token_j, peak_mem_bytes
    latency: CELL_KEYS, quantile, latency_s: total_s at each of CDF_QUANTILES (linear)
    errors:  CELL_KEYS, error, rows: the error rows of each cell by message (error_message's
             form), most frequent first
    rows:    every static row of the run, errors included
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
    frame = collect_rows(static_rows(rows), REPORT_INPUTS)
    frame = frame.with_columns(row_ids(frame, CELL_KEYS).alias(_CELL_ID))
    is_ok = pl.col("status") == "ok"
    needed = [_CELL_ID, *CELL_KEYS, *PHASES, "total_s", "new_tokens", "energy_j", "peak_mem_bytes"]
    ok = frame.lazy().select(*needed, "status").filter(is_ok).drop("status").collect()
    cells, errors = pl.collect_all(
        [
            _cell_details(ok.lazy()),
            frame.lazy()
            .filter(~is_ok)
            .with_columns(error_message(pl.col("error")))
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
