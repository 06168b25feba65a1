"""Shards: a cell and a chunk of its samples, the unit the scheduler hands to workers."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmspec.results.cells import Cell
from mmspec.workloads.sample import Sample


@dataclass(frozen=True)
class Shard:
    """A cell and a chunk of its samples: the unit of scheduling, retry and resume."""

    run_id: str
    shard_id: str  # unique in a run; names the result file
    cell: Cell
    samples: tuple[Sample, ...] = field(repr=False)
