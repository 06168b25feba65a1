"""Progress on the terminal: shards done of total, overall and per cell (rich.progress)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from types import TracebackType

import pyarrow as pa
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from mmspec.orchestrator.shards import Shard


class ShardProgress:
    """A context manager; call `advance(shard, table)` as each shard's result is written.

    A cell's bar appears with its first finished shard and disappears when the cell is
    complete, so the screen shows the cells being worked on, not the whole grid.
    """

    def __init__(self, shards: Sequence[Shard], console: Console | None = None) -> None:
        self._total: Counter[str] = Counter(s.cell.cell_id for s in shards)  # shards per cell
        self._done: Counter[str] = Counter()  # shards finished per cell
        self._errors = 0  # shards that came back with error rows
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
        )
        self._overall: TaskID = self._progress.add_task("all shards", total=len(shards))
        self._cells: dict[str, TaskID] = {}  # bars of cells in progress

    def __enter__(self) -> ShardProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def advance(self, shard: Shard, table: pa.Table) -> None:
        cell = shard.cell.cell_id
        self._done[cell] += 1
        if "error" in table.column("status").to_pylist():
            self._errors += 1
        if cell not in self._cells:
            self._cells[cell] = self._progress.add_task(cell, total=self._total[cell])
        finished = self._done[cell] >= self._total[cell]
        self._progress.update(self._cells[cell], advance=1, visible=not finished)
        description = "all shards" + (f" ({self._errors} with errors)" if self._errors else "")
        self._progress.update(self._overall, advance=1, description=description)
