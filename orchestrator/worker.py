"""Worker: the body of a Ray actor that holds one loaded (model, method) pair.

Plain Python on purpose: the scheduler wraps it with `ray.remote` and picks its resources,
so this module imports no Ray and the class can be tested directly.
"""

from __future__ import annotations

import json
import traceback
from typing import Any

import pyarrow as pa

from mmspec.orchestrator.shards import Shard
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.schema import rows_to_table

# (model, registered method, method_args as canonical JSON)
PairKey = tuple[ModelConfig, str, str]


def pair_of(cell: Cell) -> PairKey:
    """What a worker must have loaded to run the cell; cells with equal keys share workers.

    A variant's drafter is its registered method built with its arguments, so two variants
    get their own workers unless they are built alike.
    """
    return cell.model, cell.registered_method, json.dumps(cell.method_args, sort_keys=True)


class RunnerInitError(RuntimeError):
    """The runner could not be built (model or drafter failed to load) on this worker."""


def pack_table(table: pa.Table) -> bytes:
    """A table as one Arrow IPC stream, schema and its metadata included."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack_table(data: bytes) -> pa.Table:
    """The table `pack_table` packed."""
    return pa.ipc.open_stream(data).read_all()


class Worker:
    """Builds the runner once, then runs any number of shards of its pair.

    A failing constructor is kept and reported by every `run` as RunnerInitError, so the
    scheduler can tell "this pair cannot load" from "this shard failed".

    Example (in-process, without Ray)::

        worker = Worker(FakeRunner, cell.model, cell.method, cell.method_args, "cpu", 1)
        table, telemetry = worker.run(shard)
    """

    def __init__(
        self,
        runner_cls: type,
        model: ModelConfig,
        method: str,
        method_args: dict[str, Any],
        device: str,
        threads: int,
    ) -> None:
        self._pair: PairKey = (model, method, json.dumps(method_args, sort_keys=True))
        self._runner: Any = None  # the ShardRunner (or a test double) once built
        self._beats = 0  # shards started and finished: progress even without a runner heartbeat
        self._init_error: str | None = None  # what went wrong if building it failed
        try:
            self._runner = runner_cls(
                model, method, dict(method_args), device=device, threads=threads
            )
        except Exception as exc:
            # our own errors (no trained head, a bad model path) say what is wrong in one
            # line, which is what the error rows should show; others keep their traceback
            if type(exc).__module__.startswith("mmspec."):
                self._init_error = f"{type(exc).__name__}: {exc}"
            else:
                self._init_error = traceback.format_exc()

    def pair(self) -> PairKey:
        return self._pair

    def progress(self) -> int:
        """A number that grows while this worker makes progress: shards started and finished,
        plus the runner's `heartbeat()` (forward passes) when it has one.

        The scheduler's watchdog calls it on the actor's own heartbeat thread (a Ray
        concurrency group) while `run` works, so it only reads counters.
        """
        beat = getattr(self._runner, "heartbeat", None)
        return self._beats + (beat() if callable(beat) else 0)

    def run(self, shard: Shard) -> tuple[pa.Table, pa.Table | None]:
        """All rows of the shard as a RESULT_SCHEMA table, and the shard's telemetry series.

        The telemetry is the runner's `last_telemetry` after the run (None for a runner that
        keeps none, e.g. the tests' FakeRunner).
        """
        if self._init_error is not None:
            raise RunnerInitError(self._init_error)
        if pair_of(shard.cell) != self._pair:
            raise ValueError(f"shard {shard.shard_id} is not for this worker's pair")
        if hasattr(self._runner, "last_telemetry"):
            # a runner that skips setting it must not hand over the previous shard's series
            self._runner.last_telemetry = None
        self._beats += 1
        table = rows_to_table(self._runner.run(shard))
        self._beats += 1
        return table, getattr(self._runner, "last_telemetry", None)

    def run_packed(self, shard: Shard) -> tuple[bytes, bytes | None]:
        """`run` with both tables packed (`pack_table`): what the scheduler calls through Ray.

        Pickled, a result table is hundreds of objects, ~2 ms of this worker's CPU per shard
        spent between one shard and the next; one IPC buffer takes ~0.1 ms.
        """
        table, telemetry = self.run(shard)
        return pack_table(table), None if telemetry is None else pack_table(telemetry)
