"""Build a run's report: RUN_DIR/report.md plus its metrics table (Arrow and CSV) beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmspec.reports.markdown import render_markdown
from mmspec.reports.metrics import cell_metrics, load_rows


def load_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest.json, or {} when it is missing (the report still renders)."""
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def write_report(run_dir: str | Path) -> Path:
    """Compute the cell metrics of a run and write report.md, metrics.arrow, metrics.csv."""
    run_dir = Path(run_dir)
    metrics = cell_metrics(load_rows(run_dir))
    # Arrow keeps types for compare/regression tooling; CSV is for a quick look or a spreadsheet.
    metrics.write_ipc(run_dir / "metrics.arrow")
    metrics.write_csv(run_dir / "metrics.csv")
    report = run_dir / "report.md"
    report.write_text(render_markdown(metrics, load_manifest(run_dir)), encoding="utf-8")
    return report
