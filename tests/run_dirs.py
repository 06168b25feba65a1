"""Run directories for report tests, laid out by `mmspec.results.layout` as the store lays them."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from mmspec.results.layout import MANIFEST, RESULTS, part_name, partition
from mmspec.results.schema import RESULT_SCHEMA, ResultRow, rows_to_table


def write_run(run_dir: Path, rows: list[ResultRow], manifest: dict[str, Any]) -> Path:
    """manifest.json, then one part file per shard under its cell's folders."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    shards: dict[tuple[Any, ...], list[ResultRow]] = defaultdict(list)
    for r in rows:
        shards[(r.model, r.method, r.batch_size, r.temperature, r.repeat, r.shard_id)].append(r)
    for (model, method, bs, temp, repeat, shard), part in shards.items():
        path = run_dir / RESULTS / partition(model, method, bs, temp, repeat) / part_name(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, RESULT_SCHEMA) as writer:
            writer.write_table(rows_to_table(part))
    return run_dir
