"""The run directory: manifest first, then one Arrow IPC file per finished shard.

```
<out>/<name>-<UTC timestamp>/          run_id = this folder's name
    manifest.json                      written before any result
    results/model=<m>/method=<m>/batch_size=<b>/temperature=<t>/repeat=<r>/part-<shard_id>.arrow
    telemetry/<the same partitions>/part-<shard_id>.arrow    the shard's sampler time series
```
A result file appears only when complete (temp file, fsync, rename), so its presence is what
"shard done" means for `--resume`: it is the completion marker. Writing a shard again replaces
it, never duplicates it. A shard's telemetry is written before its result file, so a finished
shard always has its telemetry; a telemetry file without a result file is simply overwritten
when the shard is rerun. Telemetry lives outside results/, so reports never scan it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from mmspec.orchestrator.cells import Cell, Shard
from mmspec.orchestrator.naming import safe_name
from mmspec.orchestrator.schema import RESULT_SCHEMA

MANIFEST = "manifest.json"
RESULTS = "results"
TELEMETRY = "telemetry"
TIMESTAMP = "%Y%m%dT%H%M%SZ"
_PREFIX, _SUFFIX, _TMP = "part-", ".arrow", ".tmp"


class StoreError(RuntimeError):
    """A run directory or result file that is not what the store writes."""


# ----------------------------------------------------------------------------- run directory


def create_run_dir(out: str | Path, name: str, now: datetime | None = None) -> Path:
    """Make `<out>/<name>-<UTC timestamp>/` (with a -2, -3... suffix if that second is taken)."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime(TIMESTAMP)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{stamp}"
    for attempt in range(1, 1000):
        run_dir = root / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir
    raise StoreError(f"cannot create a run directory under {root} named {base}")


def write_manifest(run_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write manifest.json atomically; must happen before any result is written."""
    path = Path(run_dir) / MANIFEST
    data = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode()
    _write_atomic(path, lambda f: f.write(data + b"\n"))
    return path


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{run_dir} is not a run directory: {MANIFEST} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: cannot read the manifest: {exc}") from None


# ----------------------------------------------------------------------------- results


def _partition(cell: Cell) -> Path:
    # hive-style folders, one per cell; results and telemetry share them
    return (
        Path(f"model={safe_name(cell.model.id)}")
        / f"method={cell.method}"
        / f"batch_size={cell.batch_size}"
        / f"temperature={float(cell.temperature)!r}"
        / f"repeat={cell.repeat}"
    )


def shard_path(run_dir: str | Path, cell: Cell, shard_id: str) -> Path:
    """Where a shard's result file lives (hive-style partitions, one folder per cell)."""
    return Path(run_dir) / RESULTS / _partition(cell) / f"{_PREFIX}{shard_id}{_SUFFIX}"


def telemetry_path(run_dir: str | Path, cell: Cell, shard_id: str) -> Path:
    """Where a shard's telemetry series lives: the result file's place, under telemetry/."""
    return Path(run_dir) / TELEMETRY / _partition(cell) / f"{_PREFIX}{shard_id}{_SUFFIX}"


def write_shard(
    run_dir: str | Path, shard: Shard, table: pa.Table, telemetry: pa.Table | None = None
) -> Path:
    """Write a shard's rows (and its telemetry, if any) as Arrow IPC files, atomically.

    The telemetry goes first: the result file is the shard's completion marker. Returns the
    result file's path.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise StoreError(f"{run_dir}: write the manifest before any result")
    if not table.schema.equals(RESULT_SCHEMA, check_metadata=True):
        raise StoreError(f"shard {shard.shard_id}: table does not match RESULT_SCHEMA")
    _check_shard_ids(shard, table, "table")
    if telemetry is not None:
        if not isinstance(telemetry, pa.Table):
            raise StoreError(f"shard {shard.shard_id}: telemetry is not an Arrow table")
        if "shard_id" in telemetry.schema.names:
            _check_shard_ids(shard, telemetry, "telemetry")
        _write_table(telemetry_path(run_dir, shard.cell, shard.shard_id), telemetry)
    path = shard_path(run_dir, shard.cell, shard.shard_id)
    _write_table(path, table)
    return path


def _check_shard_ids(shard: Shard, table: pa.Table, what: str) -> None:
    others = set(table.column("shard_id").to_pylist()) - {shard.shard_id}
    if others:
        raise StoreError(f"shard {shard.shard_id}: {what} holds rows of {sorted(others)}")


def _write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f: BinaryIO) -> None:
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)

    _write_atomic(path, write)


def completed_shards(run_dir: str | Path) -> set[str]:
    """Ids of shards whose result file exists (temp files never count)."""
    results = Path(run_dir) / RESULTS
    return {p.name[len(_PREFIX) : -len(_SUFFIX)] for p in results.rglob(f"{_PREFIX}*{_SUFFIX}")}


def result_files(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / RESULTS).rglob(f"{_PREFIX}*{_SUFFIX}"))


def check_result_file(path: str | Path) -> None:
    """Raise StoreError unless `path` is an Arrow IPC file whose schema is RESULT_SCHEMA."""
    try:
        with pa.OSFile(str(path), "rb") as f:
            schema = pa.ipc.open_file(f).schema
    except (OSError, pa.ArrowInvalid) as exc:
        raise StoreError(f"{path}: not a readable Arrow IPC file: {exc}") from None
    if not schema.equals(RESULT_SCHEMA, check_metadata=True):
        raise StoreError(
            f"{path}: schema differs from RESULT_SCHEMA\n"
            f"found:\n{schema}\nexpected:\n{RESULT_SCHEMA}"
        )


def telemetry_files(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / TELEMETRY).rglob(f"{_PREFIX}*{_SUFFIX}"))


def remove_stale_tmp(run_dir: str | Path) -> int:
    """Delete temp files a crashed writer left behind; returns how many."""
    stale = [p for d in (RESULTS, TELEMETRY) for p in (Path(run_dir) / d).rglob(f"*{_TMP}")]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


# ----------------------------------------------------------------------------- atomic write


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write via `<path>.tmp` in the same folder, fsync, then rename over `path`.

    Same folder, so the rename never crosses file systems; the folder is fsynced too, so
    after a crash the file is either absent or complete.
    """
    tmp = path.with_name(path.name + _TMP)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
