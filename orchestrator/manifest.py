"""Run provenance: what was run, from which code, on what (written before any result)."""

from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mmspec.orchestrator.grid import BASELINE, Grid, expand, grid_sha256, to_dict
from mmspec.results.cells import Cell
from mmspec.results.environment import ENVIRONMENT, Environment, Gpu
from mmspec.results.schema import SCHEMA_VERSION
from mmspec.results.taxonomy import TAXONOMY
from mmspec.results.variants import METHOD_VARIANTS
from mmspec.workloads.fingerprint import workload_sha256
from mmspec.workloads.sample import Sample

# 2 (issue 18): `method_variants` records every variant the grid expands to; `taxonomy` is keyed
# by variant name
MANIFEST_VERSION = 2
PACKAGES = ("torch", "transformers", "ray", "pyarrow", "polars", "mmspec-orch")
_REPO_ROOT = Path(__file__).resolve().parents[1]  # orchestrator/ sits at the repo root
_CPUINFO = Path("/proc/cpuinfo")

log = logging.getLogger(__name__)


def build_manifest(
    run_id: str,
    grid: Grid,
    samples_by_workload: Mapping[str, Sequence[Sample]],
    grid_text: str | None = None,
    started_at: datetime | None = None,
) -> dict[str, Any]:
    """Everything needed to reproduce or resume the run, as JSON-ready data."""
    git_sha, git_dirty = git_state(_REPO_ROOT)
    return {
        "manifest_version": MANIFEST_VERSION,
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "started_at": (started_at or datetime.now(UTC)).isoformat(),
        "grid": to_dict(grid),
        "grid_sha256": grid_sha256(grid),
        "grid_source": grid.source,
        "grid_text": grid_text,  # the file as the user wrote it (comments included)
        "workload_sha256": workload_sha256(samples_by_workload),
        "workloads": {name: len(s) for name, s in sorted(samples_by_workload.items())},
        "git_sha": git_sha,
        "git_dirty": git_dirty,
        "packages": package_versions(),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        ENVIRONMENT: probe_environment().to_dict(),
        TAXONOMY: method_taxonomy(grid),
        # each method and variant the run measures: its registered method, its arguments as
        # given and resolved (defaults included), and which a list swept
        METHOD_VARIANTS: [v.to_dict() for v in grid.variants],
    }


def method_taxonomy(grid: Grid) -> dict[str, dict[str, Any]]:
    """Each method's (and variant's) place in MMSpec's taxonomy, with its options applied
    (`ar`, which drafts nothing, has none): the reports group methods by it and cannot ask the
    registry."""
    from mmspec.methods.registry import get_drafter

    return {
        cell.method: get_drafter(cell.registered_method).family(cell.method_args).to_dict()
        for cell in _one_cell_per_method(grid)
        if cell.registered_method != BASELINE
    }


def _one_cell_per_method(grid: Grid) -> list[Cell]:
    # one cell per method or variant: what each is called and built from
    found: dict[str, Cell] = {}
    for cell in expand(grid):
        found.setdefault(cell.method, cell)
    return list(found.values())


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions, read from metadata (no heavy imports); None if not installed."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def git_state(repo: Path) -> tuple[str | None, bool | None]:
    """(HEAD sha, uncommitted changes?) of `repo`, or (None, None) outside git."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha or None, bool(status.strip())


def probe_environment() -> Environment:
    """The driver machine: CPU model and cores, memory, the GPUs NVML sees and their driver.

    Read without torch (the driver starts without it) and without waking a GPU context; on a
    host without NVML (a CPU machine, a container without the driver) the GPU part is empty.
    """
    gpus, gpu_driver, cuda_driver = _nvml_gpus()
    return Environment(
        source="probed",
        cpu=_cpu_model(),
        cpu_cores=os.cpu_count(),
        memory_bytes=_physical_memory(),
        gpus=gpus,
        gpu_driver=gpu_driver,
        cuda_driver=cuda_driver,
    )


def _cpu_model() -> str | None:
    # platform.processor() is "x86_64" or empty on Linux; /proc/cpuinfo names the part.
    try:
        for line in _CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not every OS names these
        return None


def _nvml_gpus() -> tuple[tuple[Gpu, ...], str | None, str | None]:
    """(GPUs, driver version, CUDA version the driver supports); empty where NVML is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver, no device: a CPU host
        log.debug("no NVML here (%s): the manifest lists no GPU", exc)
        return (), None, None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            gpus.append(Gpu(name.decode() if isinstance(name, bytes) else str(name), memory))
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12040 for 12.4
        return (
            tuple(gpus),
            driver.decode() if isinstance(driver, bytes) else str(driver),
            f"{cuda // 1000}.{cuda % 1000 // 10}",
        )
    except pynvml.NVMLError as exc:
        log.warning("NVML answered in part (%s): the manifest lists no GPU", exc)
        return (), None, None
    finally:
        pynvml.nvmlShutdown()
