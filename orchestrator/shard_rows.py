"""The rows a shard owes: one per (sample, turn), no more, no fewer.

The driver checks every table a worker returns against this, and writes error rows for what
could not be measured, so a run's results always cover every (cell, sample, turn) once.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from mmspec.orchestrator.shards import Shard
from mmspec.results.schema import RESULT_SCHEMA, SCHEMA_VERSION, ResultRow, rows_to_table
from mmspec.workloads.sample import Sample

MAX_ERROR_CHARS = 4000  # Ray errors carry whole remote tracebacks; the end says what failed

Key = tuple[str, int]  # (sample_id, turn)


class ShardResultError(ValueError):
    """A worker returned rows that do not belong to the shard (a runner bug)."""


def base_row(shard: Shard, sample: Sample, turn: int, **fields: Any) -> ResultRow:
    """A row of `shard` for (sample, turn) with the cell's identity filled in; `fields` add the
    measurements (or the error)."""
    cell = shard.cell
    return ResultRow(
        run_id=shard.run_id,
        cell_id=cell.cell_id,
        shard_id=shard.shard_id,
        model=cell.model.id,
        method=cell.method,
        base_method=cell.registered_method,
        method_args=cell.resolved_json,
        batch_size=cell.batch_size,
        scenario=cell.scenario,
        rate=cell.rate,
        temperature=cell.temperature,
        seed=cell.seed,
        repeat=cell.repeat,
        workload=cell.workload,
        topic=sample.topic,
        category=sample.category,
        sample_id=sample.id,
        turn=turn,
        **fields,
    )


def expected_keys(shard: Shard) -> list[Key]:
    """(sample_id, turn) of every row the shard must produce, in order."""
    return [(s.id, t) for s in shard.samples for t in range(max(1, len(s.turns)))]


def error_rows(shard: Shard, error: str, keys: list[Key] | None = None) -> list[ResultRow]:
    """status="error" rows for `keys` (default: the whole shard), carrying `error`."""
    wanted = set(expected_keys(shard) if keys is None else keys)
    if len(error) > MAX_ERROR_CHARS:
        error = "..." + error[-MAX_ERROR_CHARS:]
    return [
        base_row(shard, sample, turn, status="error", error=error)
        for sample in shard.samples
        for turn in range(max(1, len(sample.turns)))
        if (sample.id, turn) in wanted
    ]


def error_table(shard: Shard, error: str) -> pa.Table:
    return rows_to_table(error_rows(shard, error))


def complete_table(shard: Shard, table: pa.Table) -> pa.Table:
    """Check a worker's table covers the shard; add error rows for keys it left out.

    Raises ShardResultError for rows of another shard, unknown keys or duplicates, or a table
    of another schema (workers running other code than the driver: the attempt fails and is
    retried, then error rows; a sink must never be handed rows the store would refuse).
    """
    if not table.schema.equals(RESULT_SCHEMA, check_metadata=True):
        raise ShardResultError(
            f"shard {shard.shard_id}: the worker's rows are not this driver's result schema "
            f"(version {SCHEMA_VERSION}); do the workers run other code than the driver?"
        )
    shard_ids = set(table.column("shard_id").to_pylist())
    if shard_ids - {shard.shard_id}:
        raise ShardResultError(f"shard {shard.shard_id}: rows of {sorted(shard_ids)} returned")
    got = list(
        zip(table.column("sample_id").to_pylist(), table.column("turn").to_pylist(), strict=True)
    )
    expected = expected_keys(shard)
    unknown = set(got) - set(expected)
    if unknown:
        raise ShardResultError(f"shard {shard.shard_id}: unexpected rows {sorted(unknown)[:5]}")
    if len(set(got)) != len(got):
        raise ShardResultError(f"shard {shard.shard_id}: duplicate (sample, turn) rows")
    present = set(got)
    missing = [k for k in expected if k not in present]
    if not missing:
        return table
    filler = rows_to_table(error_rows(shard, "the runner returned no row for this turn", missing))
    return pa.concat_tables([table, filler])
