"""Workload specs as the grid writes them, and the one entry point that loads them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import WorkloadError
from .mmspec_jsonl import load_mmspec
from .sample import TOPICS, Sample
from .selection import check_limit, spread_limit
from .synthetic import synthetic_suite

SYNTHETIC_PER_TOPIC = 10  # the default suite: 60 samples

BuiltinLoader = Callable[[int | None, tuple[str, ...] | None], list[Sample]]


def _load_synthetic(limit: int | None, topics: tuple[str, ...] | None) -> list[Sample]:
    # Samples do not depend on per_topic (a larger suite only appends), so drawing just enough
    # per topic for the limit gives exactly what spreading the limit over a bigger suite would.
    n_topics = len(set(topics)) if topics else len(TOPICS)
    per_topic = math.ceil(limit / n_topics) if limit else SYNTHETIC_PER_TOPIC
    samples = synthetic_suite(per_topic=per_topic, topics=topics)
    return spread_limit(samples, limit)


# Names, not import paths: a grid is data and may only pick from what is registered here.
_BUILTINS: dict[str, BuiltinLoader] = {"synthetic": _load_synthetic}


def builtin_workloads() -> list[str]:
    """Names a grid may use as `builtin:`."""
    return sorted(_BUILTINS)


@dataclass(frozen=True)
class WorkloadSpec:
    """One `workloads:` entry of a grid: a builtin suite or an MMSpec split on disk."""

    builtin: str | None = None
    path: str | None = None
    limit: int | None = None  # at most N samples, spread evenly over topics
    topics: tuple[str, ...] | None = None  # keep only these topics

    def __post_init__(self) -> None:
        if (self.builtin is None) == (self.path is None):
            raise WorkloadError(
                f"a workload needs exactly one of 'builtin' or 'path', got builtin={self.builtin!r}"
                f", path={self.path!r}"
            )
        if self.builtin is not None and (
            not isinstance(self.builtin, str) or self.builtin not in _BUILTINS
        ):
            raise WorkloadError(
                f"unknown builtin workload {self.builtin!r}; known: {builtin_workloads()}"
            )
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise WorkloadError(f"workload 'path' must be a non-empty string, got {self.path!r}")
        check_limit(self.limit, f"workload {self.name}")
        if self.topics is not None:
            topics = self.topics
            if isinstance(topics, str) or not all(isinstance(t, str) for t in topics):
                raise WorkloadError(
                    f"workload {self.name}: topics must be a list of topic names, got {topics!r}"
                )
            if not topics:
                raise WorkloadError(f"workload {self.name}: topics is empty (omit it for all)")
            # YAML gives lists; a tuple keeps the frozen spec hashable.
            object.__setattr__(self, "topics", tuple(topics))

    @property
    def name(self) -> str:
        """The builtin name, or the split's folder name (`test` for `/data/MMSpec/test`)."""
        if self.builtin is not None:
            return self.builtin
        p = Path(str(self.path)).expanduser()
        if p.suffix == ".jsonl":
            p = p.parent
        if p.name in ("", ".", ".."):
            p = p.resolve()
        return p.name


def load_workload(spec: WorkloadSpec, base_dir: str | Path | None = None) -> list[Sample]:
    """The samples of a workload, with its topic filter and limit applied.

    A relative `path` is taken relative to `base_dir` when given (the grid file's folder), so a
    grid names its data the same way wherever it is run from.
    """
    if spec.builtin is not None:
        return _BUILTINS[spec.builtin](spec.limit, spec.topics)
    path = Path(str(spec.path)).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return load_mmspec(path, limit=spec.limit, topics=spec.topics)
