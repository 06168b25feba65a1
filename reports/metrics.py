"""Per-cell metrics from a run's result rows: one row per (model, method, batch size, temperature,
topic), plus an "all" topic that pools every topic of the cell. Repeats are pooled.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from mmspec.orchestrator.schema import RESULT_SCHEMA, SCHEMA_VERSION
from mmspec.reports.paired import paired_vs_ar
from mmspec.reports.stable import stable_mean, stable_sum

ALL_TOPIC = "all"
GROUP_KEYS = ["model", "method", "batch_size", "temperature", "topic"]
_VERSION_KEY = b"mmspec.schema_version"


def result_files(run_dir: str | Path) -> list[Path]:
    """The finished shard files of a run, in a stable order."""
    results = Path(run_dir) / "results"
    # Dot-files are skipped: a shard still being written may sit under a hidden temp name.
    return sorted(p for p in results.rglob("*.arrow") if not p.name.startswith("."))


def _check_schema_version(path: Path) -> None:
    # Only the footer is read; a file from another schema version would silently mean other things.
    with pa.memory_map(str(path)) as source:
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


def _with_all_topic(rows: pl.LazyFrame) -> pl.LazyFrame:
    return pl.concat([rows, rows.with_columns(topic=pl.lit(ALL_TOPIC))])


def _safe_div(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    # Null rather than inf/NaN: a group with no steps or no time has no rate, not an infinite one.
    return pl.when(den > 0).then(num / den).otherwise(None)


def _ok_aggregates(ok: pl.LazyFrame) -> pl.LazyFrame:
    steps = pl.col("steps_sum")
    accepted = pl.col("accepted_tokens")
    return (
        ok.group_by(GROUP_KEYS)
        .agg(
            samples=pl.len(),
            # Int32 sums stay Int32 in polars; a long run's token totals could overflow that.
            new_tokens=pl.col("new_tokens").cast(pl.Int64).sum(),
            steps_sum=pl.col("steps").cast(pl.Int64).sum(),
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


def cell_metrics(rows: pl.LazyFrame) -> pl.DataFrame:
    """Metrics per (model, method, batch_size, temperature, topic); see METRIC_COLUMNS.

    Rows whose status is not "ok" count only in `errors`. Speedup and lossless compare each row
    with the `ar` row of the same sample, turn and repeat (see paired.py).
    """
    rows = _with_all_topic(rows)
    is_ok = pl.col("status") == "ok"
    # Group keys come from all rows so a cell whose every row failed still appears.
    counts = rows.group_by(GROUP_KEYS).agg(errors=(~is_ok).sum().cast(pl.UInt32))
    ok = rows.filter(is_ok)
    frame = (
        counts.join(_ok_aggregates(ok), on=GROUP_KEYS, how="left")
        .join(paired_vs_ar(ok, GROUP_KEYS), on=GROUP_KEYS, how="left")
        # Counts of a cell with no ok row are zero; its rates and times stay null (undefined).
        .with_columns(
            pl.col("new_tokens", "steps", "accepted_tokens", "drafted_tokens").fill_null(0),
            samples=pl.col("samples").fill_null(0).cast(pl.UInt32),
            paired_keys=pl.col("paired_keys").fill_null(0).cast(pl.UInt32),
        )
        .select(METRIC_COLUMNS)
    )
    # "all" sorts after real topics so tables read left to right, totals last.
    return frame.sort(
        [*GROUP_KEYS[:-1], pl.col("topic") == ALL_TOPIC, "topic"],
    ).collect()
