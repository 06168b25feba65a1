"""Run provenance: what was run, from which code, on what (written before any result)."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mmspec.orchestrator.grid import Grid, grid_sha256, to_dict
from mmspec.results.schema import SCHEMA_VERSION
from mmspec.workloads.fingerprint import workload_sha256
from mmspec.workloads.sample import Sample

MANIFEST_VERSION = 1
PACKAGES = ("torch", "transformers", "ray", "pyarrow", "polars", "mmspec-orch")
_REPO_ROOT = Path(__file__).resolve().parents[1]  # orchestrator/ sits at the repo root


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
    }


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
