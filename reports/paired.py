"""Speedup and losslessness of each method against the `ar` baseline of the same cell.

Only keys (sample, turn, repeat) that finished ok under both the method and `ar` are compared:
a sample that failed on one side would otherwise make the other side look faster or slower.
"""

from __future__ import annotations

import polars as pl

from mmspec.reports.stable import stable_mean, stable_sum

BASELINE = "ar"
# What identifies "the same work" across methods; topic is here only because the "all" topic
# duplicates every row, and both sides carry the same label.
SAME_WORK = [
    "model",
    "batch_size",
    "temperature",
    "topic",
    "workload",
    "sample_id",
    "turn",
    "repeat",
]


def paired_vs_ar(ok: pl.LazyFrame, group_keys: list[str]) -> pl.LazyFrame:
    """Per group: paired_keys, speedup_global, speedup_paired, lossless (see module doc).

    `ok` holds only rows with status "ok". Groups with no common key with `ar` are absent.
    """
    baseline = ok.filter(pl.col("method") == BASELINE).select(
        *SAME_WORK,
        ar_total_s=pl.col("total_s"),
        ar_sha=pl.col("output_sha256"),
    )
    # m:1 makes a duplicated ar row (a shard counted twice) fail loudly instead of skewing means.
    paired = ok.join(baseline, on=SAME_WORK, how="inner", validate="m:1")
    greedy = pl.col("temperature") == 0
    is_ar = pl.col("method") == BASELINE
    # A missing hash cannot prove equality, so it counts as a mismatch.
    same_output = (pl.col("output_sha256") == pl.col("ar_sha")).fill_null(False)
    ratio = pl.when(pl.col("total_s") > 0).then(pl.col("ar_total_s") / pl.col("total_s"))
    return (
        paired.group_by(group_keys)
        .agg(
            paired_keys=pl.len(),
            method_s=stable_sum(pl.col("total_s")),
            ar_s=stable_sum(pl.col("ar_total_s")),
            speedup_paired=stable_mean(ratio),
            lossless=same_output.mean(),
        )
        .with_columns(
            speedup_global=pl.when(pl.col("method_s") > 0).then(
                pl.col("ar_s") / pl.col("method_s")
            ),
            # Sampled outputs differ run to run by design; token equality only means something
            # under greedy decoding.
            lossless=pl.when(greedy).then(pl.col("lossless")),
        )
        .with_columns(
            # The baseline against itself is 1.0 by definition, whatever float noise says.
            speedup_global=pl.when(is_ar).then(1.0).otherwise("speedup_global"),
            speedup_paired=pl.when(is_ar).then(1.0).otherwise("speedup_paired"),
            lossless=pl.when(is_ar & greedy).then(1.0).otherwise("lossless"),
        )
        .select(*group_keys, "paired_keys", "speedup_global", "speedup_paired", "lossless")
    )
