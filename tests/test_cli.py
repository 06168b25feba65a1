"""`mmspec-orch` through click's CliRunner: validation, dry run, a full local run, resume."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner

import mmspec.reports
from mmspec.cli.main import Hooks, main
from mmspec.methods.registry import method_names
from mmspec.orchestrator import ray_session as ray_session_module
from mmspec.orchestrator.grid import expand, load_grid
from mmspec.results.layout import (
    check_result_file,
    completed_shards,
    lock_path,
    read_manifest,
    result_files,
)
from tests.fake_runner import FakeRunner, ship_to_ray

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "grid.yaml"


def small_grid(tmp_path: Path, **changes: Any) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["workloads"][0]["limit"] = 6
    data["out"] = str(tmp_path / "runs")
    data.update(changes)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def invoke(*args: str, runner_cls: type = FakeRunner) -> Any:
    return CliRunner().invoke(main, list(args), obj=Hooks(runner_cls=runner_cls))


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**kwargs: Any) -> None:
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(ray_session_module, "ray_session", refuse)


def test_bad_grid_exits_2_and_creates_nothing(tmp_path: Path, no_ray: None) -> None:
    grid = small_grid(tmp_path, batch_sizes=[1, -4])
    result = invoke("submit", str(grid), "--local")
    assert result.exit_code == 2
    assert f"{grid}: batch_sizes[1]: got -4; allowed: positive integers" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_method_message(tmp_path: Path, no_ray: None) -> None:
    grid = small_grid(tmp_path, methods=["ar", "medusa9"])
    result = invoke("submit", str(grid), "--dry-run")
    assert result.exit_code == 2
    allowed = ", ".join(method_names())
    assert f"methods[1]: unknown method 'medusa9'; allowed: {allowed}" in result.stderr


def test_missing_grid_file(tmp_path: Path, no_ray: None) -> None:
    result = invoke("submit", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "cannot read the grid file" in result.stderr


def test_local_and_address_conflict(tmp_path: Path, no_ray: None) -> None:
    result = invoke("submit", str(small_grid(tmp_path)), "--local", "--address", "auto")
    assert result.exit_code == 2 and "not both" in result.output


def test_dry_run(no_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes to ./runs: must stay untouched
    result = invoke("submit", str(EXAMPLE), "--dry-run")
    assert result.exit_code == 0, result.output
    for text in ("tiny-qwen2.5-vl", "tiny-llava", "pld", "synthetic"):
        assert text in result.stdout
    # 24 samples in shards of 8 -> 3 per static cell; a serving cell is one stream
    cells = expand(load_grid(EXAMPLE))
    shards = sum(1 if c.serving else 3 for c in cells)
    summary = f"{len(cells)} cells, {shards} shards ({shards} to run), samples per shard: 8"
    assert summary in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    # One Ray node for the module; `submit --local` finds it and reuses it.
    ship_to_ray()
    with ray_session_module.ray_session(local=True):
        yield


@pytest.fixture
def report_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = mmspec.reports.write_report

    def spy(run_dir: Path) -> Path:
        calls.append(Path(run_dir))
        return real(run_dir)

    monkeypatch.setattr(mmspec.reports, "write_report", spy)
    return calls


def test_submit_local_then_resume(
    ray_local: None, tmp_path: Path, report_calls: list[Path]
) -> None:
    grid = small_grid(tmp_path)
    result = invoke("submit", str(grid), "--local")
    assert result.exit_code == 0, result.output

    [run_dir] = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("default-")
    manifest = read_manifest(run_dir)
    assert manifest["run_id"] == run_dir.name
    assert manifest["grid"]["workloads"][0]["limit"] == 6
    # 6 samples in shards of 8 -> 1 shard per cell
    cells = len(expand(load_grid(grid)))
    files = result_files(run_dir)
    assert len(files) == cells
    assert report_calls == [run_dir]
    assert f"report: {run_dir / 'report.md'}" in result.stdout
    assert (run_dir / "report.md").is_file()

    # nothing left to do: resume writes nothing new and does not need Ray
    again = invoke("submit", "--resume", str(run_dir))
    assert again.exit_code == 0, again.output
    assert f"0 of {cells} shards to run" in again.stderr
    assert result_files(run_dir) == files

    # a lost shard is rerun, and only that one
    lost = files[3]
    kept = {p: p.stat().st_mtime_ns for p in files if p != lost}
    lost.unlink()
    again = invoke("submit", "--resume", str(run_dir), "--local")
    assert again.exit_code == 0, again.output
    assert f"1 of {cells} shards to run" in again.stderr
    assert lost.is_file()
    assert {p: p.stat().st_mtime_ns for p in files if p != lost} == kept
    assert len(completed_shards(run_dir)) == cells
    assert report_calls[-1] == run_dir

    # the report command prints the markdown
    shown = invoke("report", str(run_dir))
    assert shown.exit_code == 0
    assert shown.stdout.strip() == (run_dir / "report.md").read_text().strip()


def test_resume_refuses_another_grid(tmp_path: Path, no_ray: None) -> None:
    from mmspec.orchestrator.grid import load_grid
    from mmspec.orchestrator.manifest import build_manifest
    from mmspec.orchestrator.store import create_run_dir, write_manifest

    grid = load_grid(small_grid(tmp_path))
    run_dir = create_run_dir(tmp_path / "runs", grid.name)
    write_manifest(run_dir, build_manifest(run_dir.name, grid, {"synthetic": []}))
    other = small_grid(tmp_path, batch_sizes=[2])
    result = invoke("submit", str(other), "--resume", str(run_dir))
    assert result.exit_code == 2
    assert "differs from the grid of" in result.stderr
    # same grid, but the workload hash of an empty workload does not match the loaded one
    result = invoke("submit", "--resume", str(run_dir))
    assert result.exit_code == 2
    assert "workloads changed" in result.stderr


def test_a_cluster_that_cannot_hold_a_worker_exits_2_and_keeps_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextlib import contextmanager

    @contextmanager
    def two_one_gpu_nodes(**kwargs: Any) -> Iterator[ray_session_module.RaySession]:
        nodes = ({"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0})
        yield ray_session_module.RaySession("existing", {"CPU": 16.0, "GPU": 2.0}, nodes)

    monkeypatch.setattr(ray_session_module, "ray_session", two_one_gpu_nodes)
    result = invoke("submit", str(small_grid(tmp_path, gpus_per_worker=2)), "--local")
    assert result.exit_code == 2, result.output
    assert "gpus_per_worker is 2" in result.stderr and "--resume" in result.stderr
    [run_dir] = (tmp_path / "runs").iterdir()
    assert read_manifest(run_dir)["run_id"] == run_dir.name
    assert result_files(run_dir) == []


def test_the_cli_starts_without_torch() -> None:
    """`status`, `logs`, `cancel` and `--help` must not wait for torch and every drafter."""
    import subprocess
    import sys

    code = "import sys, mmspec.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------- the output folder and the disk


def one_line_exit(result: Any, code: int) -> str:
    """The one stderr line of a failure that ended with `code` on purpose, not by a traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    [line] = [x for x in result.stderr.splitlines() if x.strip()]
    return line


@pytest.mark.parametrize("where", ["file", "below a file", "read-only", "no permission"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_an_unwritable_out_exits_2_before_anything_starts(
    tmp_path: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch, where: str, dry_run: bool
) -> None:
    from mmspec.orchestrator import store

    taken = tmp_path / "taken"
    taken.write_text("a file")
    parent = tmp_path / "parent"
    parent.mkdir()
    out, reason = {
        "file": (taken, f"{taken} is not a folder"),
        "below a file": (taken / "runs", f"{taken} is not a folder"),
        "read-only": (parent / "runs", f"{parent} is on a read-only file system"),
        "no permission": (parent / "runs", f"{parent}: permission denied"),
    }[where]
    # Tests may run as root, whom modes do not stop, and cannot mount: those two are faked.
    if where == "read-only":
        real = os.statvfs

        def statvfs(path: Any) -> Any:
            found = real(path)
            flags = found.f_flag | (os.ST_RDONLY if Path(path) == parent else 0)
            return os.statvfs_result((*found[:8], flags, found.f_namemax))

        monkeypatch.setattr(store.os, "statvfs", statvfs)
    if where == "no permission":
        real_access = os.access
        monkeypatch.setattr(
            store.os, "access", lambda path, mode: Path(path) != parent and real_access(path, mode)
        )
    args = ["submit", str(small_grid(tmp_path, out=str(out)))]
    line = one_line_exit(invoke(*args, "--dry-run" if dry_run else "--local"), 2)
    assert line == f"cannot write results in {out}: {reason}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml", "parent", "taken"]
    assert list(parent.iterdir()) == []


def rows_per_key(run_dir: Path) -> Counter[tuple[str, str, int]]:
    """How often each (cell, sample, turn) appears in the run's result files."""
    found: Counter[tuple[str, str, int]] = Counter()
    for path in result_files(run_dir):
        table = pa.ipc.open_file(str(path)).read_all()
        keys = zip(*(table.column(c).to_pylist() for c in ("cell_id", "sample_id", "turn")))
        found.update(keys)
    return found


def expected_keys(grid_file: Path) -> set[tuple[str, str, int]]:
    from mmspec.orchestrator.workload_config import load_samples

    grid = load_grid(grid_file)
    samples = {w.name: load_samples(w) for w in grid.workloads}
    return {
        (cell.cell_id, sample.id, turn)
        for cell in expand(grid)
        for sample in samples[cell.workload]
        for turn in range(len(sample.turns))
    }


def test_a_disk_that_fills_mid_run_exits_1_and_resume_finishes_the_run(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmspec.orchestrator import store

    grid = small_grid(tmp_path)
    real_write = store._write_atomic
    writes: list[Path] = []

    def disk_fills(path: Path, write: Any) -> None:
        # the manifest and two shards fit; from then on the disk is full, mid-file
        writes.append(path)
        if len(writes) <= 3:
            return real_write(path, write)

        def no_space(f: Any) -> None:
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real_write(path, no_space)

    monkeypatch.setattr(store, "_write_atomic", disk_fills)
    result = invoke("submit", str(grid), "--local")
    [run_dir] = (tmp_path / "runs").iterdir()
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    [line] = [x for x in result.stderr.splitlines() if "No space left on device" in x]
    assert line.startswith(f"cannot write results in {run_dir}: No space left on device (ENOSPC)")
    assert line.endswith(f"`mmspec-orch submit --resume {run_dir}`")
    assert "Traceback" not in result.output
    written = result_files(run_dir)
    assert len(written) == 2 and not list(run_dir.rglob("*.tmp"))
    for path in written:
        check_result_file(path)  # whole files only

    monkeypatch.undo()  # room again
    again = invoke("submit", "--resume", str(run_dir))
    assert again.exit_code == 0, again.output
    found = rows_per_key(run_dir)
    assert set(found) == expected_keys(grid) and set(found.values()) == {1}


# ----------------------------------------------------------------- one writer per run directory


def test_two_resumes_at_once_one_runs_the_other_refuses(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    grid = small_grid(tmp_path)
    assert invoke("submit", str(grid), "--local").exit_code == 0
    [run_dir] = (tmp_path / "runs").iterdir()
    for lost in result_files(run_dir)[:2]:
        lost.unlink()

    # the first resume: a real process, running the fake runner on this module's Ray node
    log = tmp_path / "first.log"
    address = ray.get_runtime_context().gcs_address
    args = ["-m", "tests.fake_cli", "submit", "--resume", str(run_dir), "--address", address]
    with open(log, "wb") as out:
        first = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    lock = lock_path(run_dir)
    try:
        # Once it holds the lock, freeze it there: the second resume surely meets it running.
        deadline = time.monotonic() + 120
        holder = f'"pid": {first.pid}'
        while first.poll() is None and time.monotonic() < deadline:
            if lock.exists() and holder in lock.read_text():
                break
            time.sleep(0.02)
        assert first.poll() is None, log.read_text(errors="replace")
        first.send_signal(signal.SIGSTOP)
        before = sorted(result_files(run_dir))

        def refuse(**kwargs: Any) -> None:
            raise AssertionError("the refused resume must not start Ray")

        monkeypatch.setattr(ray_session_module, "ray_session", refuse)
        second = invoke("submit", "--resume", str(run_dir))
        line = one_line_exit(second, 2)
        assert line.startswith(f"{run_dir} is in use by pid {first.pid} on {socket.gethostname()}")
        assert sorted(result_files(run_dir)) == before
        assert holder in lock.read_text()
        monkeypatch.undo()
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, log.read_text(errors="replace")
    found = rows_per_key(run_dir)
    assert set(found) == expected_keys(grid) and set(found.values()) == {1}
    assert lock.read_text() == ""  # released
