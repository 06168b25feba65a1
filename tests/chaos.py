"""Fault injection on a multi-node Ray cluster on one machine, shared by tests/test_cluster.py
and benchmarks/bench_chaos.py.

FakeRunner (tests/fake_runner.py) sleeps per sample and, with `trace`, leaves a start marker
(pid, node) per attempt; a `Striker` waits for a shard's marker and strikes mid-shard: kill or
stop the worker process, remove its node. `run_cli` runs the real CLI with FakeRunner in a
subprocess (tests/fake_cli.py), so a driver can be SIGKILLed and resumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from mmspec.orchestrator.grid import expand, make_shards, parse_grid
from mmspec.orchestrator.ray_session import keep_on_loopback, ray_session
from mmspec.orchestrator.shard_rows import expected_keys
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.store import create_run_dir, write_manifest, write_shard
from mmspec.orchestrator.workload_config import load_samples
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.ids import cell_id
from mmspec.results.layout import completed_shards, read_manifest
from tests.fake_cli import CONTROLS_ENV
from tests.fake_runner import FakeRunner, make_samples, ship_to_ray

if TYPE_CHECKING:
    from mmspec.orchestrator.scheduler import ScheduleSummary

REPO = Path(__file__).resolve().parents[1]
# find a lost node in ~1.5 s instead of the default ~30 s
FAST_NODE_FAILURE = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}


@contextmanager
def gpu_cluster(gpu_nodes: int) -> Iterator[Any]:
    """A head without GPUs and `gpu_nodes` nodes of one fake GPU each, all on 127.0.0.1, with
    this process connected as the driver."""
    keep_on_loopback()
    from ray.cluster_utils import Cluster

    ship_to_ray()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 0,
            "include_dashboard": False,
            "_system_config": FAST_NODE_FAILURE,
        },
    )
    try:
        for _ in range(gpu_nodes):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        with ray_session(address=cluster.address) as session:
            assert session.mode == "address" and session.resources["GPU"] == gpu_nodes
            yield cluster
    finally:
        cluster.shutdown()


def make_run(
    tmp_path: Path,
    samples: int = 12,
    methods: Sequence[str] = ("ar", "pld"),
    batch_sizes: Sequence[int] = (1, 2),
    **controls: Any,
) -> tuple[Path, list[Shard]]:
    """A run directory and its shards, 2 samples each; FakeRunner traces every attempt into
    tmp_path and sleeps `delay_s` (default 0.1 s) per sample."""
    run_dir = create_run_dir(tmp_path / "runs", "cluster")
    write_manifest(run_dir, {"run_id": run_dir.name})
    args = {"marker_dir": str(tmp_path), "trace": True, "delay_s": 0.1, **controls}
    cells = [
        Cell(
            cell_id=cell_id("m-a", method, bs, 0.0, 0, "w"),
            model=ModelConfig("m-a"),
            method=method,
            method_args=args,
            batch_size=bs,
            temperature=0.0,
            repeat=0,
            seed=0,
            max_new_tokens=8,
            workload="w",
        )
        for method in methods
        for bs in batch_sizes
    ]
    return run_dir, make_shards(cells, {"w": make_samples(samples)}, run_dir.name, shard_size=2)


def schedule(
    run_dir: Path, shards: list[Shard], runner_cls: type = FakeRunner, **settings: Any
) -> ScheduleSummary:
    """Run the shards on the cluster as the CLI does, writing each result into run_dir; the
    ScheduleSummary. `settings` override SchedulerSettings (fast polling by default)."""
    import ray

    from mmspec.orchestrator.scheduler import Scheduler, SchedulerSettings, live_nodes, plan_slots

    slots, use_gpu = plan_slots(ray.cluster_resources(), None, 1, 1, live_nodes())
    assert use_gpu
    sunk: Counter[str] = Counter()

    def sink(shard: Shard, table: pa.Table, telemetry: pa.Table | None) -> None:
        sunk[shard.shard_id] += 1
        write_shard(run_dir, shard, table, telemetry)

    options = {"max_retries": 2, "poll_s": 0.5, **settings}
    summary = Scheduler(SchedulerSettings(slots, use_gpu, **options), runner_cls).run(shards, sink)
    assert set(sunk.values()) == {1}, "a shard reached the sink twice"
    return summary


def count_rows(run_dir: Path, shards: list[Shard]) -> Counter[tuple[str, str, int]]:
    """How often each expected (cell, sample, turn) is in the run's results (all statuses);
    keys nobody expected count too, under their own key."""
    from mmspec.reports import load_rows  # polars, on use

    rows = load_rows(run_dir).select("cell_id", "sample_id", "turn").collect()
    counts: Counter[tuple[str, str, int]] = Counter(rows.iter_rows())
    for shard in shards:
        for sample_id, turn in expected_keys(shard):
            counts.setdefault((shard.cell.cell_id, sample_id, turn), 0)
    return counts


def check_exactly_once(run_dir: Path, shards: list[Shard]) -> None:
    from mmspec.reports import load_rows

    counts = count_rows(run_dir, shards)
    expected = {(s.cell.cell_id, *k) for s in shards for k in expected_keys(s)}
    assert set(counts) == expected
    assert set(counts.values()) == {1}, "a (cell, sample, turn) is missing or appears twice"
    statuses = load_rows(run_dir).select("status").collect()["status"]
    assert set(statuses) == {"ok"}
    assert completed_shards(run_dir) == {s.shard_id for s in shards}


def run_shards_of(run_dir: Path) -> list[Shard]:
    """The shards a CLI run's manifest describes."""
    parsed = parse_grid(read_manifest(run_dir)["grid"])
    samples = {w.name: load_samples(w) for w in parsed.workloads}
    return make_shards(expand(parsed), samples, run_dir.name, parsed.shard_size)


def markers(marker_dir: Path, shard_id: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(marker_dir.glob(f"start-{shard_id}-*"))]


class Striker(threading.Thread):
    """Waits until an attempt of `shard_id` has started, then calls `strike` with its marker."""

    def __init__(
        self, marker_dir: Path, shard_id: str, strike: Callable[[dict[str, Any]], None]
    ) -> None:
        super().__init__(daemon=True)
        self.marker_dir, self.shard_id, self.strike = marker_dir, shard_id, strike
        self.struck: dict[str, Any] | None = None  # the marker of the attempt struck
        self.struck_at: float | None = None  # time.monotonic() of the strike
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = markers(self.marker_dir, self.shard_id)
            if found:
                try:
                    self.strike(found[0])
                    self.struck, self.struck_at = found[0], time.monotonic()
                except BaseException as exc:  # reported by the caller, not lost in the thread
                    self.error = exc
                return
            time.sleep(0.005)


def run_cli(
    tmp_path: Path, args: Sequence[str], log: str, controls: Mapping[str, Any], **env: str
) -> subprocess.Popen[bytes]:
    """`mmspec-orch submit ARGS` with FakeRunner (`controls` for every shard) in a
    subprocess, its output in tmp_path/log."""
    environ = {**os.environ, CONTROLS_ENV: json.dumps(dict(controls)), **env}
    with open(tmp_path / log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.fake_cli", "submit", *args],
            cwd=REPO,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for_shards(
    runs: Path, pattern: str, at_least: int, driver: subprocess.Popen[bytes]
) -> Path | None:
    """The run folder once it holds `at_least` finished shards (None if the driver ended or
    two minutes passed first)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        found = list(runs.glob(pattern))
        if found and len(completed_shards(found[0])) >= at_least:
            return found[0]
        time.sleep(0.02)
    return None
