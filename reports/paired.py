"""Speedup and losslessness of each method against the `ar` baseline of the same cell.

Only keys (sample, turn, repeat) that finished ok under both the method and `ar` are compared:
a sample that failed on one side would otherwise make the other side look faster or slower.
"""

from __future__ import annotations

import polars as pl

from mmspec.reports.float_sums import stable_mean, stable_sum
from mmspec.reports.row_ids import row_ids

BASELINE = "ar"
# What identifies "the same work" across methods (a sample has one topic, so topic never splits
# a pair; it keeps the key whole for callers that group by topic).
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


class DuplicateBaselineError(pl.exceptions.ComputeError):
    """Two ok `ar` rows for the same work: a shard counted twice would skew every ratio.

    A ComputeError, as polars' own m:1 join validation raises.
    """


def pair_with_ar(ok: pl.DataFrame, keep: list[str]) -> pl.DataFrame:
    """The `keep` columns, `total_s`, `new_tokens` and `output_sha256` of each ok row that has
    an ok `ar` row of the same work, with that row's `ar_total_s`, `ar_new_tokens` and `ar_sha`
    beside it.

    `ok` holds only rows with status "ok" (and at least SAME_WORK, method, total_s, new_tokens,
    output_sha256). Raises DuplicateBaselineError when `ar` did the same work twice.
    """
    columns = list(dict.fromkeys([*keep, "method", "total_s", "new_tokens", "output_sha256"]))
    rows = ok.select(columns).with_columns(row_ids(ok, SAME_WORK).alias("_work"))
    baseline = rows.filter(pl.col("method") == BASELINE).select(
        "_work",
        ar_total_s=pl.col("total_s"),
        ar_new_tokens=pl.col("new_tokens"),
        ar_sha=pl.col("output_sha256"),
    )
    # Checked here rather than by join(validate="m:1"), which takes a slower join path.
    if baseline["_work"].n_unique() < baseline.height:
        raise DuplicateBaselineError(
            "the same (sample, turn, repeat) has several ok `ar` rows in one cell; was a shard "
            "counted twice?"
        )
    return (
        rows.lazy()
        .join(baseline.lazy(), on="_work", how="inner")
        .select(*columns, "ar_total_s", "ar_new_tokens", "ar_sha")
        .collect()
    )


def paired_aggregates(paired: pl.LazyFrame, group_keys: list[str]) -> pl.LazyFrame:
    """Per group of pair_with_ar()'s rows: paired_keys, speedup_global, speedup_paired, lossless
    and speedup_paired_mmspec.

    Joining once and grouping the pairs at several levels (per topic, all topics) gives the
    same numbers as pairing each level's rows, at a fraction of the cost.
    """
    greedy = pl.col("temperature") == 0
    is_ar = pl.col("method") == BASELINE
    # A missing hash cannot prove equality, so it counts as a mismatch.
    same_output = (pl.col("output_sha256") == pl.col("ar_sha")).fill_null(False)
    ratio = pl.when(pl.col("total_s") > 0).then(pl.col("ar_total_s") / pl.col("total_s"))
    # MMSpec's paired speedup (summarize_metrics.compute_speedup): the mean of throughput
    # ratios, (tokens / s of the method) / (tokens / s of ar); a pair where either side took
    # no time or ar made no token is skipped, as there.
    tokens_ratio = pl.when(
        (pl.col("total_s") > 0) & (pl.col("ar_total_s") > 0) & (pl.col("ar_new_tokens") > 0)
    ).then(
        (pl.col("new_tokens") / pl.col("total_s"))
        / (pl.col("ar_new_tokens") / pl.col("ar_total_s"))
    )
    # Grouped by an id (see keys.py), method and temperature ride along: one value per group.
    riders = [pl.col(c).first() for c in ("method", "temperature") if c not in group_keys]
    return (
        paired.group_by(group_keys)
        .agg(
            *riders,
            paired_keys=pl.len(),
            method_s=stable_sum(pl.col("total_s")),
            ar_s=stable_sum(pl.col("ar_total_s")),
            speedup_paired=stable_mean(ratio),
            speedup_paired_mmspec=stable_mean(tokens_ratio),
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
            speedup_paired_mmspec=pl.when(is_ar).then(1.0).otherwise("speedup_paired_mmspec"),
            lossless=pl.when(is_ar & greedy).then(1.0).otherwise("lossless"),
        )
        .select(
            *group_keys,
            "paired_keys",
            "speedup_global",
            "speedup_paired",
            "speedup_paired_mmspec",
            "lossless",
        )
    )


def paired_vs_ar(ok: pl.LazyFrame, group_keys: list[str]) -> pl.LazyFrame:
    """Per group: paired_keys, speedup_global, speedup_paired, lossless (see module doc).

    `ok` holds only rows with status "ok". Groups with no common key with `ar` are absent.
    """
    return paired_aggregates(pair_with_ar(ok.collect(), group_keys).lazy(), group_keys)
