"""`mmspec-orch` through click's CliRunner: validation, dry run, a full local run, resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import mmspec.reports
from mmspec.cli.main import Hooks, main
from mmspec.methods.registry import method_names
from mmspec.orchestrator import ray_session as ray_session_module
from mmspec.orchestrator.grid import expand, load_grid
from mmspec.results.layout import completed_shards, read_manifest, result_files
from tests.fake_runner import FakeRunner, ship_to_ray

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grid.yaml"


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
    # 24 samples in shards of 8 -> 3 per cell
    cells = len(expand(load_grid(EXAMPLE)))
    summary = f"{cells} cells, {3 * cells} shards ({3 * cells} to run), samples per shard: 8"
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
