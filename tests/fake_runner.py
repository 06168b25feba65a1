"""Test doubles for the orchestrator: a ShardRunner stand-in and a few samples.

Ray workers cannot import this file (tests/ is not a package), so tests that hand FakeRunner
to Ray call `ship_to_ray()` first: the module then travels by value inside the pickle.

FakeRunner reads its behaviour from the cell's method_args (scheduler tests only):
  fail_always: [shard_id]      raise on these shards, every attempt
  fail_once: [shard_id]        raise on the first attempt only (marker files in marker_dir)
  crash_once: [shard_id]       kill the worker process on the first attempt
  hang_once: [shard_id]        on the first attempt, stop making progress forever (a wedged
                               kernel: the process lives and answers, the shard never ends)
  drop_rows: [shard_id]        return no row for the shard's last (sample, turn)
  init_fail: true              raise in the constructor
  delay_s: float               sleep this long per sample (so a test can strike mid-shard);
                               `heartbeat()` grows after each sample, as ShardRunner's does
                               with every forward pass
  slow: {shard_id: seconds}    sleep this much longer on these shards (a sure target)
  trace: true                  on starting a shard, write marker_dir/start-<shard_id>-<pid>
                               holding {"pid", "node_id", "instance", "at"} (who runs what,
                               where, from when: time.time())
  telemetry: true              keep a small series per shard in `last_telemetry`, as
                               ShardRunner does (otherwise there is no such attribute)

`with_controls(**controls)` gives a FakeRunner subclass with controls for every shard: the way
to set them where method_args must stay a real drafter's (a grid file through the CLI).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from mmspec.orchestrator.shard_rows import base_row
from mmspec.orchestrator.shards import Shard
from mmspec.results.cells import ModelConfig
from mmspec.results.schema import ResultRow
from mmspec.workloads.sample import TOPICS, Sample

CONTROL_KEYS = (
    "fail_always",
    "fail_once",
    "crash_once",
    "hang_once",
    "drop_rows",
    "init_fail",
    "marker_dir",
    "delay_s",
    "trace",
    "telemetry",
    "slow",
)


def ship_to_ray() -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def make_samples(n: int, prefix: str = "s") -> list[Sample]:
    """n samples over the six topics; every sixth is multi-turn (2 turns)."""
    return [
        Sample(
            id=f"{prefix}{i:03d}",
            topic=TOPICS[i % len(TOPICS)],
            category="synthetic",
            turns=("describe", "and then?") if i % len(TOPICS) == 5 else ("describe",),
            image_bytes=f"img{i}".encode(),
        )
        for i in range(n)
    ]


def with_controls(**controls: Any) -> type[FakeRunner]:
    """A FakeRunner subclass that applies `controls` to every shard (method_args still win)."""
    unknown = set(controls) - set(CONTROL_KEYS)
    if unknown:
        raise ValueError(f"unknown FakeRunner controls {sorted(unknown)}")
    return type("FakeRunnerWithControls", (FakeRunner,), {"controls": dict(controls)})


class FakeRunner:
    """Deterministic rows, no model; `device_uuid` names the instance (counts model loads)."""

    controls: ClassVar[dict[str, Any]] = {}  # defaults for every shard; see with_controls

    def __init__(
        self,
        model: ModelConfig,
        method: str,
        method_args: dict[str, Any],
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        if {**self.controls, **method_args}.get("init_fail"):
            raise RuntimeError("fake model failed to load")
        self.model, self.method = model, method
        self.args = {**self.controls, **method_args}
        self.device, self.threads = device, threads
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{id(self)}"
        self.beats = 0

    def heartbeat(self) -> int:
        return self.beats

    def _first_time(self, shard: Shard, what: str) -> bool:
        marker = Path(self.args["marker_dir"]) / f"{what}-{shard.shard_id}"
        if marker.exists():
            return False
        marker.touch()
        return True

    def _trace(self, shard: Shard) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        marker = Path(self.args["marker_dir"]) / f"start-{shard.shard_id}-{os.getpid()}"
        info = {"pid": os.getpid(), "node_id": node, "instance": self.instance, "at": time.time()}
        tmp = marker.with_name("." + marker.name)
        tmp.write_text(json.dumps(info))
        tmp.replace(marker)  # a watcher never reads half a marker

    def run(self, shard: Shard) -> list[ResultRow]:
        sid = shard.shard_id
        if self.args.get("trace"):
            self._trace(shard)
        if sid in self.args.get("fail_always", ()):
            raise RuntimeError(f"fake failure on {sid}")
        if sid in self.args.get("fail_once", ()) and self._first_time(shard, "fail"):
            raise RuntimeError(f"fake first-attempt failure on {sid}")
        if sid in self.args.get("crash_once", ()) and self._first_time(shard, "crash"):
            os._exit(1)
        if sid in self.args.get("hang_once", ()) and self._first_time(shard, "hang"):
            self.beats += 1
            while True:
                time.sleep(1.0)
        for _ in shard.samples:
            time.sleep(float(self.args.get("delay_s", 0.0)))
            self.beats += 1
        time.sleep(float(self.args.get("slow", {}).get(sid, 0.0)))
        rows = [
            base_row(
                shard,
                sample,
                turn,
                new_tokens=8,
                steps=4,
                total_s=0.01,
                batch_index=index // shard.cell.batch_size,
                output_tokens=[1, 2, 3],
                output_sha256=hashlib.sha256(sample.id.encode()).hexdigest(),
                device_name=self.device,
                device_uuid=self.instance,
                host=socket.gethostname(),
            )
            for index, sample in enumerate(shard.samples)
            for turn in range(len(sample.turns))
        ]
        if sid in self.args.get("drop_rows", ()):
            rows = rows[:-1]
        if self.args.get("telemetry"):
            self.last_telemetry = pa.table(
                {"shard_id": [sid, sid], "host": [socket.gethostname()] * 2, "ts": [0.0, 0.05]}
            )
        return rows
