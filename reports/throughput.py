"""Throughput against latency, per cell: MMSpec's third finding is that a method's throughput
speedup (tokens of a batch per second of its wall time, against `ar` at the same batch size)
need not be its latency speedup (how much sooner each request finishes).

In a batch the two part ways: the batch's wall time ends with its slowest row, so a method
that speeds most rows up but not the longest one gains latency and little throughput; and a
method whose outputs are longer or shorter than `ar`'s changes tokens per second without
changing when requests finish.
"""

from __future__ import annotations

import polars as pl

from mmspec.reports.metrics import ALL_TOPIC

DISAGREEMENT = 0.10  # a throughput speedup this far from the latency speedup is named


def disagreements(metrics: pl.DataFrame, threshold: float = DISAGREEMENT) -> pl.DataFrame:
    """The cells (topics pooled) whose throughput speedup differs from their latency speedup
    by more than `threshold` of the latter: model, temperature, method, batch_size,
    throughput_speedup, latency_speedup and gap = throughput / latency - 1, largest gap first.
    """
    pooled = metrics.filter(
        (pl.col("topic") == ALL_TOPIC)
        & pl.col("throughput_speedup").is_not_null()
        & (pl.col("latency_speedup") > 0)
    )
    gap = pl.col("throughput_speedup") / pl.col("latency_speedup") - 1
    return (
        pooled.select(
            "model",
            "temperature",
            "method",
            "batch_size",
            "throughput_speedup",
            "latency_speedup",
            gap=gap,
        )
        .filter(pl.col("gap").abs() > threshold)
        .sort(
            pl.col("gap").abs(),
            "model",
            "temperature",
            "method",
            "batch_size",
            descending=[True, False, False, False, False],
        )
    )
