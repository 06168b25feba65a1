"""Build a run's report: RUN_DIR/report.md, report.html and the metrics table (Arrow, CSV)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmspec.reports.html import render_html
from mmspec.reports.markdown import render_markdown
from mmspec.reports.metrics import REPORT_INPUTS, cell_metrics, collect_rows, load_rows, run_details


def load_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest.json, or {} when it is missing (the report still renders)."""
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def write_report(run_dir: str | Path) -> Path:
    """Compute a run's metrics and write report.md, report.html, metrics.arrow, metrics.csv.

    Returns the path of report.md (report.html sits beside it).
    """
    run_dir = Path(run_dir)
    # Every shard file is read once, only the columns the report uses (not output tokens/text).
    rows = collect_rows(load_rows(run_dir), REPORT_INPUTS)
    metrics = cell_metrics(rows)
    details = run_details(rows)
    # Arrow keeps types for compare/regression tooling; CSV is for a quick look or a spreadsheet.
    metrics.write_ipc(run_dir / "metrics.arrow")
    metrics.write_csv(run_dir / "metrics.csv")
    manifest = load_manifest(run_dir)
    _write_text(run_dir / "report.html", render_html(metrics, manifest, details))
    report = run_dir / "report.md"
    _write_text(report, render_markdown(metrics, manifest, details))
    return report


def _write_text(path: Path, text: str) -> None:
    # Write then rename: a reader (a browser refresh, CI publishing) never sees half a page.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
