"""Run directory, manifest and atomic, idempotent result files."""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from mmspec.orchestrator import store
from mmspec.orchestrator.grid import grid_sha256, parse_grid
from mmspec.orchestrator.manifest import build_manifest
from mmspec.orchestrator.shards import Shard
from mmspec.results import layout
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.schema import RESULT_SCHEMA, SCHEMA_VERSION, rows_to_table
from mmspec.workloads.fingerprint import workload_sha256
from tests.fake_runner import FakeRunner, make_samples

NOW = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC)
GRID = {
    "name": "demo",
    "workloads": [{"builtin": "synthetic", "limit": 6}],
    "models": ["Qwen/Qwen2.5-VL-7B-Instruct"],
    "methods": ["pld"],
}


def make_shard(index: int = 0, run_id: str = "demo-20260301T123005Z") -> Shard:
    model = ModelConfig("Qwen/Qwen2.5-VL-7B-Instruct")
    cell = Cell(
        cell_id="Qwen--Qwen2.5-VL-7B-Instruct__pld__bs2__t0__r0__synthetic",
        model=model,
        method="pld",
        method_args={},
        batch_size=2,
        temperature=0.0,
        repeat=0,
        seed=0,
        max_new_tokens=8,
        workload="synthetic",
    )
    return Shard(run_id, f"{cell.cell_id}__s{index:03d}", cell, tuple(make_samples(6)))


def table_for(shard: Shard) -> pa.Table:
    return rows_to_table(FakeRunner(shard.cell.model, "pld", {}).run(shard))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run_dir = store.create_run_dir(tmp_path / "runs", "demo", now=NOW)
    store.write_manifest(run_dir, {"run_id": run_dir.name})
    return run_dir


def test_run_dir_name_and_collisions(tmp_path: Path) -> None:
    first = store.create_run_dir(tmp_path / "runs", "demo", now=NOW)
    second = store.create_run_dir(tmp_path / "runs", "demo", now=NOW)
    assert first.name == "demo-20260301T123005Z"
    assert second.name == "demo-20260301T123005Z-2"
    assert first.is_dir() and second.is_dir()


def test_manifest_is_written_first(tmp_path: Path) -> None:
    run_dir = store.create_run_dir(tmp_path, "demo", now=NOW)
    shard = make_shard()
    with pytest.raises(store.StoreError, match="manifest before any result"):
        store.write_shard(run_dir, shard, table_for(shard))
    assert not (run_dir / "results").exists()


def test_manifest_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = parse_grid(GRID, "demo.yaml")
    samples = {"synthetic": make_samples(6)}
    run_dir = store.create_run_dir(tmp_path, grid.name, now=NOW)
    manifest = build_manifest(run_dir.name, grid, samples, "name: demo\n", started_at=NOW)
    store.write_manifest(run_dir, manifest)
    saved = layout.read_manifest(run_dir)
    assert saved == json.loads(json.dumps(manifest))
    assert saved["run_id"] == run_dir.name
    assert saved["grid"]["methods"] == ["ar", "pld"]
    assert saved["grid_sha256"] == grid_sha256(grid)
    assert saved["workload_sha256"] == workload_sha256(samples)
    assert saved["schema_version"] == SCHEMA_VERSION
    assert saved["started_at"] == NOW.isoformat()
    assert set(saved["packages"]) == {
        "torch",
        "transformers",
        "ray",
        "pyarrow",
        "polars",
        "mmspec-orch",
    }
    assert saved["packages"]["pyarrow"] == pa.__version__
    assert saved["git_sha"] is None or len(saved["git_sha"]) == 40
    assert saved["host"] and saved["python"]
    # the grid in the manifest is enough to rebuild the run's grid
    assert parse_grid(saved["grid"], "manifest.json") == grid


def test_workload_hash_covers_ids_and_image_bytes() -> None:
    samples = make_samples(4)
    base = workload_sha256({"w": samples})
    assert base == workload_sha256({"w": make_samples(4)})
    other_image = [*samples[:3], dataclasses.replace(samples[3], image_bytes=b"x")]
    assert workload_sha256({"w": other_image}) != base
    assert workload_sha256({"w": make_samples(4, prefix="t")}) != base
    assert workload_sha256({"v": samples}) != base


def test_shard_path_layout(run_dir: Path) -> None:
    shard = make_shard(3)
    path = layout.shard_path(run_dir, shard.cell, shard.shard_id)
    assert path.relative_to(run_dir).parts == (
        "results",
        "model=Qwen--Qwen2.5-VL-7B-Instruct",
        "method=pld",
        "batch_size=2",
        "temperature=0.0",
        "repeat=0",
        f"part-{shard.shard_id}.arrow",
    )


def test_write_and_read_back(run_dir: Path) -> None:
    shard = make_shard()
    table = table_for(shard)
    path = store.write_shard(run_dir, shard, table)
    layout.check_result_file(path)
    with pa.memory_map(str(path)) as source:
        back = ipc.open_file(source).read_all()  # IPC *file* format, footer and all
    assert back.equals(table)
    assert back.schema.metadata[b"mmspec.schema_version"] == str(SCHEMA_VERSION).encode()
    assert layout.completed_shards(run_dir) == {shard.shard_id}
    assert not list(path.parent.glob("*.tmp"))


def test_rewrite_is_idempotent(run_dir: Path) -> None:
    shard = make_shard()
    first = store.write_shard(run_dir, shard, table_for(shard))
    second = store.write_shard(run_dir, shard, table_for(shard))
    assert first == second
    assert layout.result_files(run_dir) == [first]
    assert len(os.listdir(first.parent)) == 1


def test_failed_write_leaves_nothing(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = make_shard()

    def crash(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(store.os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.write_shard(run_dir, shard, table_for(shard))
    folder = layout.shard_path(run_dir, shard.cell, shard.shard_id).parent
    assert list(folder.iterdir()) == []  # neither the part file nor its temp file
    assert layout.completed_shards(run_dir) == set()


def test_a_previous_file_survives_a_failed_rewrite(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = make_shard()
    path = store.write_shard(run_dir, shard, table_for(shard))
    before = path.read_bytes()
    monkeypatch.setattr(store.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        store.write_shard(run_dir, shard, table_for(shard))
    assert path.read_bytes() == before
    assert not list(path.parent.glob("*.tmp"))


def test_rejects_wrong_tables(run_dir: Path) -> None:
    shard = make_shard()
    other = make_shard(1)
    with pytest.raises(store.StoreError, match="holds rows of"):
        store.write_shard(run_dir, shard, table_for(other))
    narrow = pa.table({"run_id": ["x"]})
    with pytest.raises(store.StoreError, match="does not match RESULT_SCHEMA"):
        store.write_shard(run_dir, shard, narrow)
    assert layout.completed_shards(run_dir) == set()


def test_schema_check(run_dir: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.arrow"
    schema = RESULT_SCHEMA.remove(RESULT_SCHEMA.get_field_index("host"))
    with pa.OSFile(str(wrong), "wb") as sink, ipc.new_file(sink, schema) as writer:
        writer.write_table(schema.empty_table())
    with pytest.raises(layout.LayoutError, match="schema differs"):
        layout.check_result_file(wrong)
    garbage = tmp_path / "garbage.arrow"
    garbage.write_bytes(b"not arrow")
    with pytest.raises(layout.LayoutError, match="not a readable Arrow IPC file"):
        layout.check_result_file(garbage)


def test_completed_shards_ignores_temp_files(run_dir: Path) -> None:
    done, pending = make_shard(0), make_shard(1)
    store.write_shard(run_dir, done, table_for(done))
    stale = layout.shard_path(run_dir, pending.cell, pending.shard_id)
    stale = stale.with_name(stale.name + ".tmp")
    stale.write_bytes(b"half a file")
    assert layout.completed_shards(run_dir) == {done.shard_id}
    assert store.remove_stale_tmp(run_dir) == 1
    assert not stale.exists()


def test_read_manifest_of_a_non_run(tmp_path: Path) -> None:
    with pytest.raises(layout.LayoutError, match="not a run directory"):
        layout.read_manifest(tmp_path)


def test_temp_files_are_named_by_their_writer(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = make_shard()
    opened: list[Path] = []
    real_replace = store.os.replace

    def spy(src: Any, dst: Any) -> None:
        opened.append(Path(src))
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", spy)
    store.write_shard(run_dir, shard, table_for(shard))
    store.write_shard(run_dir, shard, table_for(shard))
    first, second = opened
    part = layout.shard_path(run_dir, shard.cell, shard.shard_id).name
    assert first.name.startswith(f"{part}.") and first.name.endswith(".tmp")
    assert f".{os.getpid()}." in first.name
    assert first != second  # a random part too: two writers in one process never share


def test_check_writable_accepts_a_folder_still_to_make(tmp_path: Path) -> None:
    store.check_writable(tmp_path / "runs" / "deeper")
    assert not (tmp_path / "runs").exists()  # a check, not a mkdir


@pytest.mark.parametrize("below", ["", "runs"])
def test_check_writable_refuses_a_file(tmp_path: Path, below: str) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    with pytest.raises(store.StoreError) as refused:
        store.check_writable(taken / below)
    assert str(refused.value) == (
        f"cannot write results in {taken / below}: {taken} is not a folder"
    )


def test_check_writable_names_a_read_only_file_system_and_permissions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests may run as root, for whom modes do not bar writing: the answers are faked here.
    real_statvfs = os.statvfs

    def read_only(path: Any) -> Any:
        found = real_statvfs(path)
        if Path(path) != tmp_path:
            return found
        return os.statvfs_result((*found[:8], found.f_flag | os.ST_RDONLY, found.f_namemax))

    monkeypatch.setattr(store.os, "statvfs", read_only)
    with pytest.raises(store.StoreError, match=f"{tmp_path} is on a read-only file system"):
        store.check_writable(tmp_path / "runs")
    monkeypatch.undo()
    monkeypatch.setattr(store.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(store.StoreError, match=f"{tmp_path}: permission denied"):
        store.check_writable(tmp_path / "runs")
