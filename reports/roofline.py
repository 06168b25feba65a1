"""Roofline per cell: the speedup a method would reach if verification were all it paid for, and
the share of it the implementation reaches.

A method that commits MAT_with_bonus tokens per verification step (accepted drafts plus the
bonus token) and verifies T_m tokens per row per step pays t(T_m) / MAT_with_bonus of target
time per generated token, where `ar` pays t(1):

    ideal_speedup             = MAT_with_bonus * t(1) / t(T_m) = MAT_with_bonus / verify_cost_ratio
    implementation_efficiency = speedup_global / ideal_speedup

Drafting, acceptance, the KV commit, Python between steps and the padding of ragged trees in a
batch all fall in the gap between the two. t(T) is the target's verification cost as the
worker that ran the row measured it at the row's batch size (results/schema.py
`verify_cost_*`, methods/verify_cost.py).

- T_m = 1 + sum(drafted_tokens) / sum(steps): the root plus the mean drafted nodes per step
  (t at the mean tree size: trees whose size varies from step to step are taken at the mean).
- A bigger forward never costs less, and interference only adds time, so every measured
  t(T) is an upper bound on t(T) and on t of every smaller T: the curve used is the running
  minimum from the largest T down (a contended t(1) would otherwise shrink the cell's ratio
  and inflate its ideal). t between measured T is linear; past the largest measured T it
  goes on along the last segment.
- Rows of a group that ran on several workers: each worker's own t(T_m) / t(1), weighted by
  the steps its rows verified. Rows without a measurement (older runs, imports) add to T_m
  but not to the ratio; a group none of whose rows has one has no ratio.
- A group that drafted nothing has ratio 1 without a measurement: `ar`'s ideal is 1.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

# The row columns the roofline reads (results/schema.py).
COST_INPUTS = ["verify_cost_tokens", "verify_cost_s"]
# The metric columns it adds, in metrics.METRIC_COLUMNS' order.
VERIFY_TOKENS = "verify_tokens_mean"  # T_m
COST_RATIO = "verify_cost_ratio"  # t(T_m) / t(1)
IDEAL = "ideal_speedup"
EFFICIENCY = "implementation_efficiency"
ROOFLINE_COLUMNS = [VERIFY_TOKENS, COST_RATIO, IDEAL, EFFICIENCY]


def cost_at(tokens: Sequence[int], seconds: Sequence[float], t: float) -> float | None:
    """t(T) at `t` from measured points (tokens ascending): linear between them, along the
    last segment (at a slope of at least 0) past the last; None below the first point or
    without one."""
    if not tokens or t < tokens[0]:
        return None
    i = bisect.bisect_left(tokens, t)
    if i < len(tokens) and tokens[i] == t:
        return seconds[i]
    if i == len(tokens):  # past the last point
        if len(tokens) == 1:
            return None
        slope = (seconds[-1] - seconds[-2]) / (tokens[-1] - tokens[-2])
        return seconds[-1] + max(slope, 0.0) * (t - tokens[-1])
    lo, hi = i - 1, i
    share = (t - tokens[lo]) / (tokens[hi] - tokens[lo])
    return seconds[lo] + share * (seconds[hi] - seconds[lo])


def monotone(seconds: Sequence[float]) -> list[float]:
    """The tightest non-decreasing curve under the measured one: each point's running minimum
    over itself and every larger T."""
    out = list(seconds)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def cost_ratio(tokens: Sequence[int], seconds: Sequence[float], t: float) -> float | None:
    """t(t) / t(1) of one measured curve (made monotone); None where either is unknown or
    t(1) is not > 0."""
    curve = monotone(seconds)
    one, at_t = cost_at(tokens, curve, 1), cost_at(tokens, curve, t)
    if one is None or at_t is None or one <= 0:
        return None
    return at_t / one


Curve = tuple[list[int], list[float]]  # (T ascending, seconds of each)


@dataclass(frozen=True)
class ShardCosts:
    """What the roofline reads of a run's ok rows, read once (see shard_costs)."""

    work: pl.DataFrame  # per (topic group, shard): the cell's id, steps, drafted
    curves: dict[str, Curve]  # per shard: its t(T); absent where its rows carry none


def shard_costs(ok: pl.DataFrame, topic_id: str, cell_id: str) -> ShardCosts:
    """The steps and drafted tokens of each (topic group, shard), and each shard's t(T).

    A shard runs on one worker at one batch size, so all its ok rows carry one curve (or none):
    it is read once per shard, where grouping by the curve would hash two lists per row. A
    topic group lies in one cell.
    """
    work = ok.group_by(topic_id, "shard_id").agg(
        pl.col(cell_id).first(),
        steps=pl.col("steps").cast(pl.Int64).sum(),
        drafted=pl.col("drafted_tokens").cast(pl.Int64).sum(),
    )
    # lazy: on a 1M-row run the eager group_by took 3-4x longer over these list columns
    firsts = (
        ok.lazy()
        .group_by("shard_id")
        .agg(tokens=pl.col(COST_INPUTS[0]).first(), seconds=pl.col(COST_INPUTS[1]).first())
        .drop_nulls()
        .collect()
    )
    curves = {str(shard): (t, s) for shard, t, s in firsts.iter_rows()}
    return ShardCosts(work, curves)


def roofline_stats(costs: ShardCosts, level_id: str) -> pl.DataFrame:
    """Per `level_id` group (a topic group or a cell): verify_tokens_mean and
    verify_cost_ratio (see the module doc); the group id keeps its dtype."""
    per_shard = costs.work.group_by(level_id, "shard_id").agg(
        pl.col("steps").sum(), pl.col("drafted").sum()
    )
    steps: dict[int, int] = defaultdict(int)
    drafted: dict[int, int] = defaultdict(int)
    for key, _, s, d in per_shard.iter_rows():
        steps[key] += s
        drafted[key] += d
    mean_tokens = {k: 1 + drafted[k] / s for k, s in steps.items() if s > 0}
    weighted: dict[int, list[float]] = defaultdict(list)
    weights: dict[int, list[int]] = defaultdict(list)
    for key, shard, s, _ in per_shard.iter_rows():
        curve, t = costs.curves.get(str(shard)), mean_tokens.get(key)
        ratio = None if curve is None or t is None else cost_ratio(*curve, t)
        if ratio is not None and s > 0:
            weighted[key].append(s * ratio)
            weights[key].append(s)
    keys = sorted(mean_tokens)
    ratios = [_ratio(drafted[k], weighted.get(k), weights.get(k)) for k in keys]
    return pl.DataFrame(
        {level_id: keys, VERIFY_TOKENS: [mean_tokens[k] for k in keys], COST_RATIO: ratios},
        schema={
            level_id: costs.work.schema[level_id],
            VERIFY_TOKENS: pl.Float64,
            COST_RATIO: pl.Float64,
        },
    )


def _ratio(drafted: int, weighted: list[float] | None, weights: list[int] | None) -> float | None:
    if drafted == 0:  # every step verified the root alone: t(1) / t(1), measured or not
        return 1.0
    if not weights:
        return None
    # fsum: exact, so the number does not depend on the order the shards came in
    return math.fsum(weighted or []) / sum(weights)


def with_roofline(frame: pl.LazyFrame) -> pl.LazyFrame:
    """`frame` (MAT_with_bonus, speedup_global and roofline_stats()'s columns) with
    ideal_speedup and implementation_efficiency; null where a part is missing."""
    ratio = pl.col(COST_RATIO)
    ideal = pl.when(ratio > 0).then(pl.col("MAT_with_bonus") / ratio)
    efficiency = pl.when(pl.col(IDEAL) > 0).then(pl.col("speedup_global") / pl.col(IDEAL))
    return frame.with_columns(ideal.alias(IDEAL)).with_columns(efficiency.alias(EFFICIENCY))
