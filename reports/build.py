"""Build a run's report: RUN_DIR/report.md, report.html and the metrics table (Arrow, CSV)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mmspec.reports.answer_import import imported_metrics, mask_unrecorded
from mmspec.reports.html import render_html
from mmspec.reports.markdown import render_markdown
from mmspec.reports.metrics import (
    REPORT_INPUTS,
    STATIC,
    cell_metrics,
    collect_rows,
    load_rows,
    run_details,
)
from mmspec.reports.serving import serving_report
from mmspec.results.layout import (
    METRICS_ARROW,
    METRICS_CSV,
    REPORT_HTML,
    REPORT_MD,
    SERVING_ARROW,
    SERVING_CSV,
    manifest_or_empty,
)


def write_report(run_dir: str | Path) -> Path:
    """Compute a run's metrics and write report.md, report.html, metrics.arrow, metrics.csv
    (and serving_metrics.arrow/csv for a run with serving cells).

    Returns the path of report.md (report.html sits beside it).
    """
    run_dir = Path(run_dir)
    scan = load_rows(run_dir)
    # Every shard file is read once, only the columns the report uses (not output tokens/text).
    rows = collect_rows(scan, REPORT_INPUTS)
    manifest = manifest_or_empty(run_dir)
    # An imported run's sentinels (values its files do not hold) become nulls here, once, so
    # no table, chart or metrics file shows them as measured zeros; MMSpec's draft_accept_mean
    # gets back what its whole-token rows rounded off.
    metrics = imported_metrics(cell_metrics(rows), manifest)
    details = run_details(rows)
    details = replace(details, cells=mask_unrecorded(details.cells, manifest))
    # Arrow keeps types for compare/regression tooling; CSV is for a quick look or a spreadsheet.
    metrics.write_ipc(run_dir / METRICS_ARROW)
    metrics.write_csv(run_dir / METRICS_CSV)
    serving = None
    # The per-token times are read again only where there are serving rows to read them for.
    if rows.height and (rows["scenario"] != STATIC).any():
        serving = serving_report(scan, manifest)
    if serving is not None:
        serving.cells.write_ipc(run_dir / SERVING_ARROW)
        serving.cells.write_csv(run_dir / SERVING_CSV)
    _write_text(run_dir / REPORT_HTML, render_html(metrics, manifest, details, serving))
    report = run_dir / REPORT_MD
    _write_text(report, render_markdown(metrics, manifest, details, serving))
    return report


def _write_text(path: Path, text: str) -> None:
    # Write then rename: a reader (a browser refresh, CI publishing) never sees half a page.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
