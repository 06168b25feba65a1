"""Methods grouped by MMSpec's taxonomy, for its second finding: speedup against batch size,
vision-aware against vision-agnostic methods.

A group's speedup at a batch size is the geometric mean of its methods' speedups (global)
there: speedups are ratios, and the geometric mean of ratios treats a 2x gain and a 2x loss
alike. Methods without a speedup at that batch size (no `ar` there, no request in common) are
left out of it, and the count says how many went in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from mmspec.reports.paired import BASELINE
from mmspec.results.taxonomy import VISION_AGNOSTIC, VISION_AWARE, Family

UNKNOWN = "family unknown"
GROUPS = (VISION_AWARE, VISION_AGNOSTIC, UNKNOWN)  # the order a report lists them in


@dataclass(frozen=True)
class GroupSpeedup:
    """One group's speedup at one batch size."""

    batch_size: int
    speedup: float  # geometric mean over `methods`
    methods: int


def group_of(family: Family | None) -> str:
    """The group a method's family puts it in (vision-aware, vision-agnostic, unknown)."""
    return UNKNOWN if family is None else family.vision


def grouped_methods(
    methods: Sequence[str], families: Mapping[str, Family | None]
) -> dict[str, list[str]]:
    """`methods` (without `ar`) per group, in GROUPS order, groups without a method left out."""
    out: dict[str, list[str]] = {}
    for group in GROUPS:
        members = [m for m in methods if m != BASELINE and group_of(families.get(m)) == group]
        if members:
            out[group] = members
    return out


def geometric_mean(values: Sequence[float]) -> float | None:
    """The geometric mean of positive values; None when there are none."""
    kept = [v for v in values if v is not None and v > 0]
    if not kept:
        return None
    return math.exp(sum(math.log(v) for v in kept) / len(kept))


def group_speedups(
    pooled: pl.DataFrame, members: Sequence[str], column: str = "speedup_global"
) -> list[GroupSpeedup]:
    """Per batch size of `pooled` (one model and temperature, topics pooled), the geometric
    mean of `column` over `members`, where at least one has it."""
    out = []
    for batch_size in sorted(set(pooled["batch_size"].to_list())):
        part = pooled.filter(
            (pl.col("batch_size") == batch_size)
            & pl.col("method").is_in(list(members))
            & pl.col(column).is_not_null()
        )
        values = [v for v in part[column].to_list() if v > 0]
        mean = geometric_mean(values)
        if mean is not None:
            out.append(GroupSpeedup(batch_size, mean, len(values)))
    return out
