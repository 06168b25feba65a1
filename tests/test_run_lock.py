"""One run directory, one writer: the run lock, and writers that never share a temp file.

The other side of each test is a real second process, since the lock (flock) and the temp
names are about processes.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from mmspec.orchestrator import store
from mmspec.results import layout
from tests.test_store import make_shard, table_for

REPO = Path(__file__).resolve().parents[1]
# Holds the run's lock until its stdin closes; says "locked" once it holds it.
HOLDER = """
import sys
from mmspec.orchestrator.store import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""
WRITES = 25  # per writer process


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run_dir = store.create_run_dir(tmp_path / "runs", "demo")
    store.write_manifest(run_dir, {"run_id": run_dir.name})
    return run_dir


@pytest.fixture
def holder(run_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the run's lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_with_the_holders_name(
    run_dir: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(store.RunLockedError) as refused:
        store.RunLock(run_dir).acquire()
    message = str(refused.value)
    assert f"pid {holder.pid} on {socket.gethostname()}" in message
    assert "\n" not in message and str(run_dir) in message
    # refusing leaves the holder's name in place
    assert f'"pid": {holder.pid}' in layout.lock_path(run_dir).read_text()


def test_the_lock_is_free_once_its_holder_dies(
    run_dir: Path, holder: subprocess.Popen[str]
) -> None:
    holder.kill()  # no clean-up runs: the kernel drops the lock
    holder.wait()
    with store.RunLock(run_dir) as lock:
        assert lock.held
        assert f'"pid": {os.getpid()}' in layout.lock_path(run_dir).read_text()
    assert not lock.held
    assert layout.lock_path(run_dir).read_text() == ""  # released: names nobody


def test_one_process_takes_a_run_once(run_dir: Path) -> None:
    with (
        store.RunLock(run_dir),
        pytest.raises(store.RunLockedError, match=f"pid {os.getpid()}"),
    ):
        store.RunLock(run_dir).acquire()


def test_stale_temp_files_are_removed_only_under_the_lock(
    run_dir: Path, holder: subprocess.Popen[str]
) -> None:
    shard = make_shard()
    live = layout.shard_path(run_dir, shard.cell, shard.shard_id)
    live = live.with_name(live.name + ".otherhost.4242.abcd1234.tmp")
    live.parent.mkdir(parents=True)
    live.write_bytes(b"a live writer's half file")
    with pytest.raises(store.RunLockedError):
        store.remove_stale_tmp(run_dir)
    with pytest.raises(store.StoreError, match="only under the run's lock"):
        store.remove_stale_tmp(store.RunLock(run_dir))  # a lock object not held
    assert live.exists()
    holder.kill()
    holder.wait()
    with store.RunLock(run_dir) as lock:
        assert store.remove_stale_tmp(lock) == 1
    assert not live.exists()


def _write_repeatedly(run_dir: str, index: int) -> None:
    """A writer process: the same shard, WRITES times, each table telling its writer apart."""
    shard = make_shard()
    table = table_for(shard)
    table = table.set_column(
        table.schema.get_field_index("new_tokens"),
        table.schema.field("new_tokens"),
        pa.array([index] * table.num_rows, table.schema.field("new_tokens").type),
    )
    for _ in range(WRITES):
        store.write_shard(run_dir, shard, table)


def test_concurrent_writers_of_one_shard_never_collide(run_dir: Path) -> None:
    shard = make_shard()
    path = layout.shard_path(run_dir, shard.cell, shard.shard_id)
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that holds Arrow threads
    writers = [spawn.Process(target=_write_repeatedly, args=(str(run_dir), i)) for i in range(3)]
    for w in writers:
        w.start()
    torn = []
    while any(w.is_alive() for w in writers):
        if not path.exists():
            continue
        try:  # every file a reader finds is one writer's whole table
            with pa.memory_map(str(path)) as source:
                back = ipc.open_file(source).read_all()
            assert len(set(back.column("new_tokens").to_pylist())) == 1
        except (pa.ArrowInvalid, AssertionError) as exc:
            torn.append(repr(exc))
    for w in writers:
        w.join()
    assert [w.exitcode for w in writers] == [0, 0, 0]  # no writer hit FileNotFoundError
    assert torn == []
    assert os.listdir(path.parent) == [path.name]  # every temp file renamed into place
    layout.check_result_file(path)
