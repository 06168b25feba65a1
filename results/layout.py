"""The run directory: where every file of a run lives, for the writer and every reader.

```
<out>/<name>-<UTC timestamp>/          run_id = this folder's name
    manifest.json                      written before any result
    run.lock                           the one writer's lock: while held, its host, pid, since
    results/model=<m>/method=<m>/batch_size=<b>/temperature=<t>/repeat=<r>/part-<shard_id>.arrow
    telemetry/<the same partitions>/part-<shard_id>.arrow    the shard's sampler time series
    metrics.arrow, metrics.csv         per-cell metrics (written by the report)
    report.md, report.html
```
A result file appears only when complete (the writer renames a temp file into place), so its
presence is what "shard done" means: it is the completion marker. Temp files sit beside their
file, `<file>.<host>.<pid>.<random>.tmp`, and never count. Telemetry lives outside results/,
so reports never scan it. Nothing here writes; `mmspec.orchestrator.store` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from mmspec.results.cells import Cell
from mmspec.results.ids import method_id, safe_name
from mmspec.results.schema import RESULT_SCHEMA

MANIFEST = "manifest.json"
LOCK = "run.lock"
RESULTS = "results"
TELEMETRY = "telemetry"
METRICS_ARROW = "metrics.arrow"
METRICS_CSV = "metrics.csv"
# serving cells' metrics (reports/serving.py), written only when a run has serving rows
SERVING_ARROW = "serving_metrics.arrow"
SERVING_CSV = "serving_metrics.csv"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
TIMESTAMP = "%Y%m%dT%H%M%SZ"  # the UTC timestamp in a run folder's name
PART_PREFIX, PART_SUFFIX, TMP_SUFFIX = "part-", ".arrow", ".tmp"


class LayoutError(RuntimeError):
    """A run directory or result file that is not what the writer leaves."""


def run_names(name: str, now: datetime) -> Iterator[str]:
    """A run folder's name, `<name>-<UTC timestamp>`, then the -2, -3... a taken one gets."""
    base = f"{name}-{now.astimezone(UTC).strftime(TIMESTAMP)}"
    yield base
    for attempt in range(2, 1000):
        yield f"{base}-{attempt}"


def partition(model: str, method: str, batch_size: int, temperature: float, repeat: int) -> Path:
    """The hive-style folders of one cell, relative to results/ (and telemetry/).

    `model` is the model id as the grid names it, `method` the method's or variant's name (both
    made path-safe here).
    """
    return (
        Path(f"model={safe_name(model)}")
        / f"method={method_id(method)}"
        / f"batch_size={batch_size}"
        / f"temperature={float(temperature)!r}"
        / f"repeat={repeat}"
    )


def part_name(shard_id: str) -> str:
    """A shard's file name: `part-<shard_id>.arrow`."""
    return f"{PART_PREFIX}{shard_id}{PART_SUFFIX}"


def _cell_partition(cell: Cell) -> Path:
    return partition(cell.model.id, cell.method, cell.batch_size, cell.temperature, cell.repeat)


def shard_path(run_dir: str | Path, cell: Cell, shard_id: str) -> Path:
    """Where a shard's result file lives (hive-style partitions, one folder per cell)."""
    return Path(run_dir) / RESULTS / _cell_partition(cell) / part_name(shard_id)


def telemetry_path(run_dir: str | Path, cell: Cell, shard_id: str) -> Path:
    """Where a shard's telemetry series lives: the result file's place, under telemetry/."""
    return Path(run_dir) / TELEMETRY / _cell_partition(cell) / part_name(shard_id)


def lock_path(run_dir: str | Path) -> Path:
    """The run's lock file (see `mmspec.orchestrator.store.RunLock`)."""
    return Path(run_dir) / LOCK


def result_files(run_dir: str | Path) -> list[Path]:
    """The finished shard files of a run, in a stable order (temp files never count)."""
    return sorted((Path(run_dir) / RESULTS).rglob(f"{PART_PREFIX}*{PART_SUFFIX}"))


def telemetry_files(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / TELEMETRY).rglob(f"{PART_PREFIX}*{PART_SUFFIX}"))


def completed_shards(run_dir: str | Path) -> set[str]:
    """Ids of shards whose result file exists."""
    return {p.name[len(PART_PREFIX) : -len(PART_SUFFIX)] for p in result_files(run_dir)}


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest; LayoutError when it is missing or unreadable."""
    path = Path(run_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LayoutError(f"{run_dir} is not a run directory: {MANIFEST} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise LayoutError(f"{path}: cannot read the manifest: {exc}") from None


def manifest_or_empty(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest, or {} when there is none (reports still render without it)."""
    path = Path(run_dir) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def check_result_file(path: str | Path) -> None:
    """Raise LayoutError unless `path` is an Arrow IPC file whose schema is RESULT_SCHEMA."""
    try:
        with pa.OSFile(str(path), "rb") as f:
            schema = pa.ipc.open_file(f).schema
    except (OSError, pa.ArrowInvalid) as exc:
        raise LayoutError(f"{path}: not a readable Arrow IPC file: {exc}") from None
    if not schema.equals(RESULT_SCHEMA, check_metadata=True):
        raise LayoutError(
            f"{path}: schema differs from RESULT_SCHEMA\n"
            f"found:\n{schema}\nexpected:\n{RESULT_SCHEMA}"
        )
