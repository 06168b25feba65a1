"""Writes a run directory (layout: `mmspec.results.layout`): manifest first, then one Arrow
IPC file per finished shard, each written atomically (temp file, fsync, rename).

Writing a shard again replaces it, never duplicates it. A shard's telemetry is written before
its result file (the completion marker), so a finished shard always has its telemetry; a
telemetry file without a result file is simply overwritten when the shard is rerun.

One run directory has one writer: `RunLock`, an advisory lock its writer holds from before the
first write to the end. Temp names are still unique per writer (host, pid, random), so even
two writers that ignore the lock never rename, truncate or delete each other's temp file, and
a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import pyarrow as pa

from mmspec.orchestrator.shards import Shard
from mmspec.results.ids import safe_name
from mmspec.results.layout import (
    MANIFEST,
    RESULTS,
    TELEMETRY,
    TMP_SUFFIX,
    LayoutError,
    lock_path,
    run_names,
    shard_path,
    telemetry_path,
)
from mmspec.results.schema import RESULT_SCHEMA


class StoreError(LayoutError):
    """A write the run directory's layout does not allow."""


class RunLockedError(StoreError):
    """Another process holds the run directory's lock."""


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


def check_writable(folder: str | Path) -> None:
    """Raise StoreError (one line: the folder and why) unless a run can be written in `folder`.

    `folder`, or the nearest folder above it that exists (the writer makes the rest), must be
    a folder this process may write in. Checked at validation, before anything starts.
    """
    path = Path(folder)
    existing = path
    try:
        while not (existing.exists() or existing.is_symlink()):
            existing = existing.parent
        reason = _not_writable(existing)
    except OSError as exc:  # e.g. a folder above it that may not be searched
        reason = f"{existing}: {os_error_text(exc)}"
    if reason is not None:
        raise StoreError(f"cannot write results in {path}: {reason}")


def _not_writable(path: Path) -> str | None:
    if not path.is_dir():
        return f"{path} is not a folder"
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return f"{path} is on a read-only file system"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path}: permission denied"
    return None


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


def remove_stale_tmp(run: str | Path | RunLock) -> int:
    """Delete the temp files crashed writers left behind; returns how many.

    Only under the run's lock, so a live writer's temp file is never taken for a stale one:
    pass the RunLock this process holds, or the run directory to hold its lock for the call
    (RunLockedError if another process holds it).
    """
    if not isinstance(run, RunLock):
        with RunLock(run) as lock:
            return remove_stale_tmp(lock)
    if not run.held:
        raise StoreError(f"{run.run_dir}: temp files are removed only under the run's lock")
    stale = [p for d in (RESULTS, TELEMETRY) for p in (run.run_dir / d).rglob(f"*{TMP_SUFFIX}")]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


# ----------------------------------------------------------------------------- the lock


class RunLock:
    """One run directory, one writer: an advisory `flock` on `<run_dir>/run.lock`.

    Example::

        with RunLock(run_dir) as lock:  # RunLockedError at once if another process holds it
            remove_stale_tmp(lock)
            write_shard(run_dir, shard, table)

    The kernel drops the lock when its holder exits, however it ends, so a killed run never
    leaves its directory locked. The file outlives the lock: while held it names the holder
    (host, pid, since), for the message another writer gets; released, it is empty.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)  # the run directory this lock guards
        self._fd: int | None = None  # the lock file, open and locked while held

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock without waiting; RunLockedError naming the holder if it is taken."""
        if self._fd is not None:
            return self
        path = lock_path(self.run_dir)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot lock {self.run_dir}: {os_error_text(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EACCES) else None
            os.close(fd)
            if holder is None:
                raise StoreError(f"cannot lock {self.run_dir}: {os_error_text(exc)}") from None
            raise RunLockedError(
                f"{self.run_dir} is in use by {holder}: one run directory takes one "
                "`submit` at a time; nothing was started"
            ) from None
        self._fd = fd
        self._name_holder()
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # nobody holds it now
        except OSError:
            pass  # the close below still drops the lock; only the name goes stale
        finally:
            os.close(fd)

    def _name_holder(self) -> None:
        assert self._fd is not None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(holder).encode(), 0)
        except OSError as exc:
            self.release()
            raise StoreError(f"cannot lock {self.run_dir}: {os_error_text(exc)}") from None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who holds a lock file, as its holder wrote it (it may not have written yet)."""
    try:
        found = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {found['pid']} on {found['host']} (since {found['since']})"
    except (OSError, ValueError, TypeError, KeyError):
        return "another process"


def os_error_text(exc: OSError) -> str:
    """An OSError in one line: "No space left on device (ENOSPC)"."""
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror} ({name})" if exc.strerror and name else str(exc)


# ----------------------------------------------------------------------------- atomic write


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write via a temp file of this writer's own in the same folder, fsync, then rename
    over `path`.

    Same folder, so the rename never crosses file systems; the folder is fsynced too, so
    after a crash the file is either absent or complete.
    """
    tmp = _temp_path(path)
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


def _temp_path(path: Path) -> Path:
    """`<name>.<host>.<pid>.<random>.tmp`: no other writer, here or on another host sharing
    the folder, ever opens the same temp file (the pid is read now: a fork is a new writer)."""
    writer = f"{safe_name(socket.gethostname())[:32]}.{os.getpid()}.{secrets.token_hex(4)}"
    return path.with_name(f"{path.name}.{writer}{TMP_SUFFIX}")


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
