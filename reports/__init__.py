"""Reports of a run: Polars metrics per cell, report.md, metrics tables."""

from mmspec.reports.build import write_report
from mmspec.reports.markdown import render_markdown
from mmspec.reports.metrics import ALL_TOPIC, METRIC_COLUMNS, cell_metrics, load_rows

__all__ = [
    "ALL_TOPIC",
    "METRIC_COLUMNS",
    "cell_metrics",
    "load_rows",
    "render_markdown",
    "write_report",
]
