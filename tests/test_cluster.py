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

import os
import signal
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
import yaml
from polars.testing import assert_frame_equal

from mmspec.orchestrator.shards import Shard
from mmspec.reports import cell_metrics, load_rows
from mmspec.results.ids import cell_id
from mmspec.results.layout import completed_shards, result_files, telemetry_files
from mmspec.results.schema import rows_to_table
from tests.chaos import (
    Striker,
    check_exactly_once,
    gpu_cluster,
    make_run,
    markers,
    run_cli,
    run_shards_of,
    schedule,
    wait_for_shards,
)
from tests.fake_runner import FakeRunner

GPU_NODES = 3
DELAY_S = 0.1  # per sample: a shard of two samples runs 0.2 s
# the shard struck in (a) and (b) runs this much longer, so the strike surely lands mid-shard
# (removing a node takes a moment on a busy machine) while the other shards keep finishing
TARGET, STRIKE_WINDOW_S = cell_id("m-a", "ar", 2, 0.0, 0, "w") + "__s002", 2.0


@pytest.fixture(scope="module")
def cluster() -> Any:
    with gpu_cluster(GPU_NODES) as cluster:
        yield cluster


# ---------------------------------------------------------------- helpers


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


def check_report(run_dir: Path, shards: list[Shard]) -> None:
    got = without_timings(cell_metrics(load_rows(run_dir)))
    assert_frame_equal(got, reference_report(shards))
    assert "errors" in got.columns and got["errors"].sum() == 0


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
    controls = {"delay_s": 2 * DELAY_S}
    driver = run_cli(
        tmp_path, [str(grid_file), "--address", cluster.address], "first.log", controls
    )
    total = 24  # 4 cells x 12 samples / 2 per shard
    try:
        run_dir = wait_for_shards(tmp_path / "runs", "killed-*", 3, driver)
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

    resume = ["--resume", str(run_dir), "--address", cluster.address]
    resumed = run_cli(tmp_path, resume, "resume.log", controls)
    assert resumed.wait(timeout=180) == 0, (tmp_path / "resume.log").read_text(errors="replace")
    log = (tmp_path / "resume.log").read_text(errors="replace")
    assert f"{total - len(done)} of {total} shards to run" in log
    # only what was missing ran: every file present before the resume is untouched
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (run_dir / "report.md").is_file()

    shards = run_shards_of(run_dir)
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
