"""A grid's workload entries as the grid parser (grid.py, the one place that reads them) leaves
them, and the driver's one doorway into `mmspec.workloads`.

The loaders are looked up at call time, so tests can swap them with a monkeypatch.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmspec.workloads.sample import Sample


@dataclass(frozen=True)
class WorkloadConfig:
    """A workload as the grid names it: exactly one of `builtin` or `path`."""

    name: str  # unique in a grid; appears in cell ids
    builtin: str | None = None  # e.g. "synthetic"
    path: str | None = None  # MMSpec jsonl layout: mmspec.jsonl + images/
    limit: int | None = None  # at most N samples, spread over topics by the loader
    topics: tuple[str, ...] | None = None  # topic filter; None = all


def builtin_workloads() -> list[str]:
    """Names accepted by `builtin:` in a grid."""
    import mmspec.workloads as workloads

    return list(workloads.builtin_workloads())


def load_samples(config: WorkloadConfig) -> list[Sample]:
    """Load a workload's samples in the driver (once per run)."""
    import mmspec.workloads as workloads

    # pass only what the grid set, so the loader's own defaults apply to the rest
    given = {
        "builtin": config.builtin,
        "path": config.path,
        "limit": config.limit,
        "topics": config.topics,
    }
    spec = workloads.WorkloadSpec(**{k: v for k, v in given.items() if v is not None})
    return list(workloads.load_workload(spec))


def workload_error_types() -> tuple[type[BaseException], ...]:
    """Exception types a loader raises for bad data (empty if the package has none yet)."""
    import mmspec.workloads as workloads

    error = getattr(workloads, "WorkloadError", None)
    return (error,) if isinstance(error, type) else ()
