"""Faults on a multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`, 127.0.0.1).

A head node without GPUs and three worker nodes with one fake GPU each; FakeRunner sleeps per
sample and leaves a start marker (pid, node) per attempt, so a test can strike mid-shard:
  (a) an actor's process SIGKILLed mid-shard,
  (b) a node removed mid-run,
  (c) the driver (the CLI in a subprocess) SIGKILLed, then `submit --resume`.
In each, the results hold every (cell, sample, turn) exactly once and the report equals an
undisturbed run's on everything but timings. The node test runs last: it shrinks the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
import yaml
from polars.testing import assert_frame_equal

from mmspec.orchestrator.grid import expand, make_shards, parse_grid
from mmspec.orchestrator.ray_session import keep_on_loopback, ray_session
from mmspec.orchestrator.shard_rows import expected_keys
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.store import create_run_dir, write_manifest, write_shard
from mmspec.orchestrator.workload_config import load_samples
from mmspec.reports import cell_metrics, load_rows
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.ids import cell_id
from mmspec.results.layout import completed_shards, read_manifest, result_files, telemetry_files
from mmspec.results.schema import rows_to_table
from tests.fake_cli import CONTROLS_ENV
from tests.fake_runner import FakeRunner, make_samples, ship_to_ray

REPO = Path(__file__).resolve().parents[1]
GPU_NODES = 3
DELAY_S = 0.1  # per sample: a shard of two samples runs 0.2 s
# the shard struck in (a) and (b) runs this much longer, so the strike surely lands mid-shard
# (removing a node takes a moment on a busy machine) while the other shards keep finishing
TARGET, STRIKE_WINDOW_S = cell_id("m-a", "ar", 2, 0.0, 0, "w") + "__s002", 2.0
# find a lost node in ~1.5 s instead of the default ~30 s
FAST_NODE_FAILURE = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
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
        for _ in range(GPU_NODES):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        with ray_session(address=cluster.address) as session:
            assert session.mode == "address" and session.resources["GPU"] == GPU_NODES
            assert len(session.nodes) == GPU_NODES + 1
            yield cluster
    finally:
        cluster.shutdown()


# ---------------------------------------------------------------- helpers


def make_run(tmp_path: Path, **controls: Any) -> tuple[Path, list[Shard]]:
    """A run directory and its shards: ar and pld x batch 1, 2 over 12 samples, 2 per shard."""
    run_dir = create_run_dir(tmp_path / "runs", "cluster")
    write_manifest(run_dir, {"run_id": run_dir.name})
    args = {"marker_dir": str(tmp_path), "trace": True, "delay_s": DELAY_S, **controls}
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
        for method in ("ar", "pld")
        for bs in (1, 2)
    ]
    return run_dir, make_shards(cells, {"w": make_samples(12)}, run_dir.name, shard_size=2)


def schedule(run_dir: Path, shards: list[Shard]) -> Any:
    """Run the shards on the cluster as the CLI does, writing each result into run_dir."""
    import ray

    from mmspec.orchestrator.scheduler import Scheduler, SchedulerSettings, live_nodes, plan_slots

    slots, use_gpu = plan_slots(ray.cluster_resources(), None, 1, 1, live_nodes())
    assert use_gpu
    sunk: Counter[str] = Counter()

    def sink(shard: Shard, table: pa.Table, telemetry: pa.Table | None) -> None:
        sunk[shard.shard_id] += 1
        write_shard(run_dir, shard, table, telemetry)

    settings = SchedulerSettings(slots, use_gpu, max_retries=2, poll_s=0.5)
    summary = Scheduler(settings, runner_cls=FakeRunner).run(shards, sink)
    assert set(sunk.values()) == {1}, "a shard reached the sink twice"
    return summary


def reference_report(shards: list[Shard]) -> pl.DataFrame:
    """The report of an undisturbed run: every shard once, in-process."""
    tables = [rows_to_table(FakeRunner(s.cell.model, s.cell.method, {}).run(s)) for s in shards]
    return without_timings(cell_metrics(pl.from_arrow(pa.concat_tables(tables)).lazy()))


def without_timings(metrics: pl.DataFrame) -> pl.DataFrame:
    timing = [
        c
        for c in metrics.columns
        if c.endswith(("_s", "_s_mean", "_per_s")) or c.startswith(("speedup", "latency"))
    ]
    return metrics.drop(timing)


def check_exactly_once(run_dir: Path, shards: list[Shard]) -> None:
    rows = load_rows(run_dir).select("cell_id", "sample_id", "turn", "status").collect()
    keys = Counter(rows.select("cell_id", "sample_id", "turn").iter_rows())
    expected = {(s.cell.cell_id, *k) for s in shards for k in expected_keys(s)}
    assert set(keys) == expected
    assert set(keys.values()) == {1}, "a (cell, sample, turn) appears twice"
    assert set(rows["status"]) == {"ok"}
    assert completed_shards(run_dir) == {s.shard_id for s in shards}


def check_report(run_dir: Path, shards: list[Shard]) -> None:
    got = without_timings(cell_metrics(load_rows(run_dir)))
    assert_frame_equal(got, reference_report(shards))
    assert "errors" in got.columns and got["errors"].sum() == 0


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
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = markers(self.marker_dir, self.shard_id)
            if found:
                try:
                    self.strike(found[0])
                    self.struck = found[0]
                except BaseException as exc:  # reported by the test, not lost in the thread
                    self.error = exc
                return
            time.sleep(0.005)


# ---------------------------------------------------------------- tests


def test_undisturbed_run_uses_every_node(cluster: Any, tmp_path: Path) -> None:
    run_dir, shards = make_run(tmp_path, telemetry=True)
    summary = schedule(run_dir, shards)
    assert summary.shards == 24 and summary.failed == 0 and summary.retries == 0
    # one actor per GPU node, model loaded once per (model, method) pair on each at most
    assert summary.actors_started <= 2 * GPU_NODES
    nodes = {m["node_id"] for s in shards for m in markers(tmp_path, s.shard_id)}
    assert len(nodes) == GPU_NODES
    check_exactly_once(run_dir, shards)
    check_report(run_dir, shards)
    # each shard's telemetry beside its result, outside results/ (where reports never look)
    assert [p.relative_to(run_dir / "telemetry") for p in telemetry_files(run_dir)] == [
        p.relative_to(run_dir / "results") for p in result_files(run_dir)
    ]


def test_actor_killed_mid_shard(cluster: Any, tmp_path: Path) -> None:
    run_dir, shards = make_run(tmp_path, slow={TARGET: STRIKE_WINDOW_S})
    [target] = [s for s in shards if s.shard_id == TARGET]
    striker = Striker(tmp_path, target.shard_id, lambda m: os.kill(m["pid"], signal.SIGKILL))
    striker.start()
    summary = schedule(run_dir, shards)
    striker.join(timeout=5)
    assert striker.error is None and striker.struck is not None
    assert summary.failed == 0 and summary.retries >= 1
    # the shard ran again, in another process, and only that attempt's rows were kept
    attempts = markers(tmp_path, target.shard_id)
    assert len(attempts) == 2 and len({a["pid"] for a in attempts}) == 2
    [table] = [pa.ipc.open_file(str(p)).read_all() for p in result_files(run_dir)
               if p.name == f"part-{target.shard_id}.arrow"]  # fmt: skip
    instances = set(table.column("device_uuid").to_pylist())
    assert instances == {next(a for a in attempts if a != striker.struck)["instance"]}
    check_exactly_once(run_dir, shards)
    check_report(run_dir, shards)


def test_driver_killed_then_resumed(cluster: Any, tmp_path: Path) -> None:
    grid = {
        "name": "killed",
        "out": str(tmp_path / "runs"),
        "workloads": [{"builtin": "synthetic", "limit": 12}],
        "models": ["tiny-qwen2.5-vl"],
        "methods": ["ar", "pld"],
        "batch_sizes": [1, 2],
        "max_new_tokens": 8,
        "shard_size": 2,
    }
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    env = {**os.environ, CONTROLS_ENV: json.dumps({"delay_s": 2 * DELAY_S})}

    def cli(*args: str, log: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / log, "wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.fake_cli", "submit", *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    driver = cli(str(grid_file), "--address", cluster.address, log="first.log")
    run_dir, total = None, 24  # 4 cells x 12 samples / 2 per shard
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            runs = list((tmp_path / "runs").glob("killed-*"))
            if runs and len(completed_shards(runs[0])) >= 3:
                run_dir = runs[0]
                break
            time.sleep(0.02)
        assert driver.poll() is None, "the run ended before it could be killed:\n" + (
            tmp_path / "first.log"
        ).read_text(errors="replace")
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    assert run_dir is not None
    done = completed_shards(run_dir)
    assert 3 <= len(done) < total
    kept = {p: p.stat().st_mtime_ns for p in result_files(run_dir)}

    resumed = cli("--resume", str(run_dir), "--address", cluster.address, log="resume.log")
    assert resumed.wait(timeout=180) == 0, (tmp_path / "resume.log").read_text(errors="replace")
    log = (tmp_path / "resume.log").read_text(errors="replace")
    assert f"{total - len(done)} of {total} shards to run" in log
    # only what was missing ran: every file present before the resume is untouched
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (run_dir / "report.md").is_file()

    manifest = read_manifest(run_dir)
    parsed = parse_grid(manifest["grid"])
    samples = {w.name: load_samples(w) for w in parsed.workloads}
    shards = make_shards(expand(parsed), samples, run_dir.name, parsed.shard_size)
    assert len(shards) == total
    check_exactly_once(run_dir, shards)
    check_report(run_dir, shards)


def test_node_lost_mid_run(cluster: Any, tmp_path: Path) -> None:
    run_dir, shards = make_run(tmp_path, slow={TARGET: STRIKE_WINDOW_S})
    [target] = [s for s in shards if s.shard_id == TARGET]

    def remove_node(marker: dict[str, Any]) -> None:
        [node] = [n for n in cluster.worker_nodes if n.node_id == marker["node_id"]]
        cluster.remove_node(node, allow_graceful=False)

    striker = Striker(tmp_path, target.shard_id, remove_node)
    striker.start()
    summary = schedule(run_dir, shards)
    striker.join(timeout=5)
    assert striker.error is None and striker.struck is not None
    assert len(cluster.worker_nodes) == GPU_NODES - 1
    assert summary.failed == 0 and summary.retries >= 1
    # the struck shard finished on a node that is still there
    lost = striker.struck["node_id"]
    last = markers(tmp_path, target.shard_id)
    assert len(last) >= 2 and any(m["node_id"] != lost for m in last)
    check_exactly_once(run_dir, shards)
    check_report(run_dir, shards)
