"""Chaos benchmark (issue 17): N faults of each kind on a simulated 8-node cluster; after each,
every (cell, sample, turn) of the run is in its results exactly once.

A `ray.cluster_utils.Cluster` on 127.0.0.1 (tests/chaos.py): a head without GPUs and 8 nodes
of one fake GPU each. Each run is 2 methods x batch sizes 1, 2 x 24 samples, 2 per shard (48
shards); FakeRunner sleeps 0.1 s per sample and marks every attempt's start (pid, node, time),
so a fault lands mid-shard on a chosen shard, a different one per fault. Kinds:

  worker_kill   the shard's worker process SIGKILLed: Ray reports the actor dead, the
                scheduler retries the shard on a fresh actor
  worker_stop   the worker SIGSTOPped: alive to the OS, silent to Ray; the watchdog at its
                default settings (stall limit 120 s) kills and replaces it
  node_removal  the shard's node removed from the cluster (added back after the run)
  driver_kill   the driver (the real CLI in a subprocess) SIGKILLed mid-run, then
                `submit --resume`
  disk_full     every driver write fails with ENOSPC once the run has some shards (a disk that
                fills): exit 1 naming the resume command, then `submit --resume`

"Recovery" is from the fault to the struck shard's next attempt starting (worker faults), or
the resumed run's wall time (driver faults).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/bench_chaos.py --faults 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test doubles in tests/
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
from tests.fake_cli import DISK_FULL_ENV

NODES = 8
SAMPLES = 24  # x 2 methods x 2 batch sizes / 2 per shard = 48 shards
KINDS = ("worker_kill", "worker_stop", "node_removal", "driver_kill", "disk_full")


@dataclass
class Outcome:
    kind: str
    exactly_once: list[bool] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def worker_fault(
    cluster: Any, tmp: Path, index: int, kind: str, outcome: Outcome, stall_floor_s: float
) -> None:
    """One run through the Scheduler with one worker-side fault on one shard."""
    _, shards = make_run(tmp / "ids", samples=SAMPLES)  # shard ids do not depend on controls
    target = shards[(7 * index + 3) % len(shards)].shard_id
    # the struck shard runs long enough for the strike to land mid-shard; its retry too
    run_dir, shards = make_run(tmp, samples=SAMPLES, slow={target: 3.0})
    stopped: list[int] = []

    def strike(marker: dict[str, Any]) -> None:
        if kind == "worker_kill":
            os.kill(marker["pid"], signal.SIGKILL)
        elif kind == "worker_stop":
            os.kill(marker["pid"], signal.SIGSTOP)
            stopped.append(marker["pid"])
        else:
            [node] = [n for n in cluster.worker_nodes if n.node_id == marker["node_id"]]
            cluster.remove_node(node, allow_graceful=False)

    striker = Striker(tmp, target, strike)
    striker.start()
    t0 = time.monotonic()
    try:
        summary = schedule(run_dir, shards, stall_floor_s=stall_floor_s)
    finally:
        striker.join(timeout=5)
        for pid in stopped:  # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    outcome.wall_s.append(time.monotonic() - t0)
    if striker.error is not None or striker.struck is None:
        raise RuntimeError(f"{kind}: the fault never landed: {striker.error}")
    check_exactly_once(run_dir, shards)
    outcome.exactly_once.append(True)
    outcome.retries.append(summary.retries)
    attempts = markers(tmp, target)
    later = [m["at"] for m in attempts if m["at"] > striker.struck["at"]]
    struck_wall = time.time() - (time.monotonic() - striker.struck_at)
    outcome.recovery_s.append(min(later) - struck_wall)
    if kind == "node_removal":
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()


def driver_fault(cluster: Any, tmp: Path, index: int, kind: str, outcome: Outcome) -> None:
    """One CLI run whose driver dies (or whose disk fills), then `submit --resume`."""
    grid = {
        "name": kind,
        "out": str(tmp / "runs"),
        "workloads": [{"builtin": "synthetic", "limit": SAMPLES}],
        "models": ["tiny-qwen2.5-vl"],
        "methods": ["ar", "pld"],
        "batch_sizes": [1, 2],
        "max_new_tokens": 8,
        "shard_size": 2,
    }
    grid_file = tmp / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    controls = {"delay_s": 0.1}
    first = [str(grid_file), "--address", cluster.address]
    after = 4 + 8 * index  # shards finished when the fault strikes
    t0 = time.monotonic()
    if kind == "driver_kill":
        driver = run_cli(tmp, first, "first.log", controls)
        try:
            run_dir = wait_for_shards(tmp / "runs", f"{kind}-*", after, driver)
            if run_dir is None or driver.poll() is not None:
                raise RuntimeError("the run ended before its driver could be killed")
            driver.send_signal(signal.SIGKILL)
        finally:
            driver.kill()
            driver.wait()
    else:  # the manifest is the first write
        driver = run_cli(tmp, first, "first.log", controls, **{DISK_FULL_ENV: str(1 + after)})
        code = driver.wait(timeout=600)
        log = (tmp / "first.log").read_text(errors="replace")
        [run_dir] = list((tmp / "runs").glob(f"{kind}-*"))
        if code != 1 or f"submit --resume {run_dir}" not in log or "Traceback" in log:
            raise RuntimeError(f"disk_full: exit {code}, no resume command or a traceback:\n{log}")
    outcome.notes.append(f"fault after {after} shards")
    t1 = time.monotonic()
    resumed = run_cli(tmp, ["--resume", str(run_dir), "--address", cluster.address], "r.log", {})
    if resumed.wait(timeout=600) != 0:
        raise RuntimeError((tmp / "r.log").read_text(errors="replace"))
    outcome.recovery_s.append(time.monotonic() - t1)
    outcome.wall_s.append(time.monotonic() - t0)
    check_exactly_once(run_dir, run_shards_of(run_dir))
    outcome.exactly_once.append(True)
    outcome.retries.append(0)


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| fault | faults | rows exactly once | recovery mean / max (s) | retries "
        "| run wall mean (s) |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        n = len(o.wall_s)
        lines.append(
            f"| {o.kind} | {n} | {sum(o.exactly_once)}/{n} | "
            f"{statistics.mean(o.recovery_s):.1f} / {max(o.recovery_s):.1f} | "
            f"{sum(o.retries)} | {statistics.mean(o.wall_s):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", type=int, default=3, help="faults of each kind")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument(
        "--stall-floor", type=float, default=120.0, help="the watchdog's floor (default: its own)"
    )
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    with gpu_cluster(NODES) as cluster:
        for kind in kinds:
            outcome = Outcome(kind)
            for i in range(args.faults):
                with tempfile.TemporaryDirectory(prefix=f"chaos-{kind}-") as tmp:
                    if kind in ("driver_kill", "disk_full"):
                        driver_fault(cluster, Path(tmp), i, kind, outcome)
                    else:
                        worker_fault(cluster, Path(tmp), i, kind, outcome, args.stall_floor)
                print(f"{kind} {i + 1}/{args.faults}: recovery {outcome.recovery_s[-1]:.1f} s")
            outcomes.append(outcome)
    print()
    print(table(outcomes))
    print()
    load = os.getloadavg()[0]
    print(
        f"{NODES} GPU nodes + head on one machine ({os.cpu_count()} CPUs, load {load:.1f}); "
        f"Python {platform.python_version()}; total {time.monotonic() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
