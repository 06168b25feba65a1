"""The manifest's `environment`: probed on the driver (NVML for GPUs, without torch), read back
leniently, shown by the report."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mmspec.orchestrator import manifest as manifest_module
from mmspec.orchestrator.grid import parse_grid
from mmspec.orchestrator.manifest import build_manifest, probe_environment
from mmspec.reports import write_report
from mmspec.results.environment import Environment, Gpu
from tests.test_compare import make_rows, write_run

GRID = {
    "name": "demo",
    "workloads": [{"builtin": "synthetic"}],
    "models": [{"id": "tiny-qwen2.5-vl"}],
    "methods": ["ar", "pld"],
}


class _NVMLError(Exception):
    pass


def fake_nvml(gpus: list[tuple[bytes, int]], fail_init: bool = False) -> SimpleNamespace:
    """The part of pynvml the probe calls, answering as a driver with `gpus` would."""
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if fail_init:
            raise _NVMLError("NVML Shared Library Not Found")

    return SimpleNamespace(
        calls=calls,
        NVMLError=_NVMLError,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda i: gpus[i][0],
        nvmlDeviceGetMemoryInfo=lambda i: SimpleNamespace(total=gpus[i][1]),
        nvmlSystemGetDriverVersion=lambda: "550.54.15",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
    )


def test_manifest_records_the_driver_machine() -> None:
    grid = parse_grid(GRID, "demo.yaml")
    env = build_manifest("run", grid, {"synthetic": []})["environment"]
    assert env["source"] == "probed"
    assert env["cpu_cores"] == os.cpu_count()
    if sys.platform == "linux":
        assert env["memory_bytes"] > 2**28 and env["cpu"]
    assert Environment.from_manifest({"environment": env}) == probe_environment()


def test_probe_reads_gpus_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    h100 = (b"NVIDIA H100 80GB HBM3", 80 * 2**30)
    nvml = fake_nvml([h100, h100])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    env = probe_environment()
    assert env.gpus == (Gpu("NVIDIA H100 80GB HBM3", 80 * 2**30),) * 2
    assert (env.gpu_driver, env.cuda_driver) == ("550.54.15", "12.4")
    assert env.accelerator == "2 × NVIDIA H100 80GB HBM3"
    assert nvml.calls == ["init", "shutdown"]  # NVML is left as it was found


def test_probe_without_nvml_lists_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], fail_init=True))
    monkeypatch.setattr(manifest_module, "_CPUINFO", Path("/nonexistent/cpuinfo"))
    env = probe_environment()
    assert env.gpus == () and env.gpu_driver is None and env.cuda_driver is None
    assert env.cpu is not None  # platform's name when /proc/cpuinfo is unreadable
    assert env.accelerator == env.cpu


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ({}, None),
        ({"environment": "x"}, None),
        ({"environment": {}}, Environment("probed")),
        (
            {
                "environment": {
                    "source": "stated",
                    "cpu": 3,
                    "cpu_cores": True,
                    "gpus": [{"name": "A100", "memory_bytes": "big"}, {"memory_bytes": 1}, "x"],
                    "extra": 1,
                }
            },
            Environment("stated", gpus=(Gpu("A100"),)),
        ),
    ],
)
def test_environment_reads_back_leniently(stored: dict[str, Any], expected: Any) -> None:
    assert Environment.from_manifest(stored) == expected


def test_round_trip_and_report(tmp_path: Path) -> None:
    env = Environment(
        "probed", cpu="Test CPU", cpu_cores=2, memory_bytes=8 * 2**30, gpus=(Gpu("T4", 2**34),)
    )
    assert Environment.from_manifest({"environment": env.to_dict()}) == env
    run = write_run(tmp_path / "run", make_rows(samples=10), environment=env.to_dict())
    report = write_report(run).read_text()
    for line in ("| GPUs | T4 (16.00 GiB) |", "| CPU | Test CPU |", "| Memory | 8.00 GiB |"):
        assert line in report
    assert "Environment: the machine the run ran on." in (run / "report.html").read_text()


def test_compare_warns_when_the_software_differs(tmp_path: Path) -> None:
    """Python, package versions, driver and CPU of two runs: a difference is noted, never a
    failure (an upgrade is often what is being measured); what only one run recorded is not
    compared."""
    from mmspec.reports.compare import compare_runs, render_comparison
    from mmspec.results.environment import software

    def manifest(torch: str, driver: str, python: str = "3.11.9") -> dict[str, Any]:
        env = Environment("probed", cpu="Test CPU", gpus=(Gpu("T4"),), gpu_driver=driver)
        return {
            "python": python,
            "packages": {"torch": torch, "polars": "2.1.0", "ray": None},
            "environment": env.to_dict(),
        }

    assert software(manifest("2.5.1", "550.54.15")) == {
        "Python": "3.11.9",
        "polars": "2.1.0",
        "ray": "not installed",
        "torch": "2.5.1",
        "GPU driver": "550.54.15",
        "CPU": "Test CPU",
    }
    rows = make_rows(samples=12)
    base = write_run(tmp_path / "base", rows, **manifest("2.5.1", "550.54.15"))
    same = write_run(tmp_path / "same", rows, **manifest("2.5.1", "550.54.15"))
    new = write_run(tmp_path / "new", rows, **manifest("2.6.0", "560.35.03", python="3.12.4"))
    assert "environments differ" not in render_comparison(compare_runs(base, same))
    result = compare_runs(base, new)
    text = render_comparison(result)
    assert not result.failed
    assert (
        "> Note: the environments differ (Python 3.11.9 vs 3.12.4; torch 2.5.1 vs 2.6.0; "
        "GPU driver 550.54.15 vs 560.35.03)"
    ) in text
    unrecorded = write_run(tmp_path / "old", rows)  # a manifest from before any of it
    assert "environments differ" not in render_comparison(compare_runs(base, unrecorded))
