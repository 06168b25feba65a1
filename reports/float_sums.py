"""Float aggregates that do not depend on row order.

Polars joins and groups in parallel, so the rows of a group arrive in varying order and a plain
float sum can differ in the last bits from one build of the same run to the next. Summing the
sorted values makes metrics.arrow identical across rebuilds, which compare/regression checks
rely on.
"""

from __future__ import annotations

import polars as pl


def _sorted_total(values: pl.Expr) -> pl.Expr:
    # The optimizer drops a sort in front of an order-agnostic sum(); a cumulative sum is
    # order-dependent, so the sort stays and the additions happen in sorted order.
    return values.drop_nulls().sort().cum_sum().last()


def stable_sum(values: pl.Expr) -> pl.Expr:
    """Sum of a float column inside an aggregation (nulls skipped), independent of row order."""
    return _sorted_total(values)


def stable_mean(values: pl.Expr) -> pl.Expr:
    """Mean of a float column inside an aggregation (nulls skipped), independent of row order."""
    count = values.drop_nulls().len()
    return pl.when(count > 0).then(_sorted_total(values) / count)
