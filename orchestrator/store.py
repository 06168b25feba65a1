"""Writes a run directory (layout: `mmspec.results.layout`): manifest first, then one Arrow
IPC file per finished shard, each written atomically (temp file, fsync, rename).

Writing a shard again replaces it, never duplicates it. A shard's telemetry is written before
its result file (the completion marker), so a finished shard always has its telemetry; a
telemetry file without a result file is simply overwritten when the shard is rerun.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from mmspec.orchestrator.shards import Shard
from mmspec.results.layout import (
    MANIFEST,
    RESULTS,
    TELEMETRY,
    TMP_SUFFIX,
    LayoutError,
    run_names,
    shard_path,
    telemetry_path,
)
from mmspec.results.schema import RESULT_SCHEMA


class StoreError(LayoutError):
    """A write the run directory's layout does not allow."""


# ----------------------------------------------------------------------------- run directory


def create_run_dir(out: str | Path, name: str, now: datetime | None = None) -> Path:
    """Make `<out>/<name>-<UTC timestamp>/` (with a -2, -3... suffix if that second is taken)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for run_name in run_names(name, now or datetime.now(UTC)):
        try:
            (root / run_name).mkdir()
        except FileExistsError:
            continue
        return root / run_name
    raise StoreError(f"cannot create a run directory under {root} for {name!r}: all names taken")


def write_manifest(run_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write manifest.json atomically; must happen before any result is written."""
    path = Path(run_dir) / MANIFEST
    data = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode()
    _write_atomic(path, lambda f: f.write(data + b"\n"))
    return path


# ----------------------------------------------------------------------------- results


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


def remove_stale_tmp(run_dir: str | Path) -> int:
    """Delete temp files a crashed writer left behind; returns how many."""
    stale = [p for d in (RESULTS, TELEMETRY) for p in (Path(run_dir) / d).rglob(f"*{TMP_SUFFIX}")]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


# ----------------------------------------------------------------------------- atomic write


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write via `<path>.tmp` in the same folder, fsync, then rename over `path`.

    Same folder, so the rename never crosses file systems; the folder is fsynced too, so
    after a crash the file is either absent or complete.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
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
