"""The scheduler on a simulated 8-node cluster: makespan against a lower bound, and the
per-shard scheduling overhead (issue 4).

A `ray.cluster_utils.Cluster` on 127.0.0.1: a head without GPUs and 8 worker nodes with one
fake GPU each, so one Worker actor per node. Each node has a known speed; the runner sleeps
the shard's known cost / its node's speed, and each new actor first "loads its model" (a fixed
sleep per model, whatever the node's speed):

    cost(shard) = ROW_S x model factor x method factor x batch_size ** -BATCH_EXP
                  x rows (one per sample and turn)

The scheduler is told the method factors (`method_weights`); the model and batch terms it must
guess from its own `expected_cost` (model size from the id, 1/sqrt(batch)), which differ on
purpose from the truth above. The shards are made by `grid.expand` + `grid.make_shards`, each
sample carrying IMAGE_KB of image bytes as real MMSpec shards do.

Lower bound. Every node loads a model at least once before its first shard, so node i does at
most speed_i x (T - min load) of work by time T, and the whole run needs
T >= W / sum(speed) + min load (W = total cost at speed 1). No run beats its longest shard on
the fastest node after that shard's model loaded either. The bound is the larger of the two.
It leaves out Ray's own start of each actor's process and every load after a node's first:
those are overhead, and the makespan pays for them.

Per-shard scheduling overhead (the hand-over): on each actor, from the runner returning a shard
to the runner starting that actor's next shard, both stamped with `time.time()` in the worker
process (one machine, one clock). It covers everything between two shards on a device: the
result packed and sent back, and either the next shard already waiting on the actor
(`prefetch`, the default) or the round trip through the driver (`ray.wait`, the sink, the
dispatch, the shard's bytes shipped to the node). Mean over every shard that followed another
on the same actor. The other slot time lost (actor starts, switches, the end of the run) is
broken down beside it, so everything adds up to nodes x makespan.

Size. Eight Ray worker processes start at once when a run begins, and on a real cluster each
node starts its own; here all eight share this machine's CPUs, which costs several seconds
per run that a real cluster would not pay. The default grid (a lower bound of ~240 s) keeps
that fixed cost at a few percent, as the hours of a real grid would; `--samples 96` gives a
~60 s run in which it weighs four times as much.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/bench_scheduler.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from mmspec.orchestrator.grid import Grid, expand, make_shards
from mmspec.orchestrator.ray_session import keep_on_loopback
from mmspec.orchestrator.shard_rows import expected_keys
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.workload_config import WorkloadConfig
from mmspec.results.cells import ModelConfig
from mmspec.results.schema import ResultRow
from mmspec.workloads.sample import TOPICS, Sample

# ---- the simulated workload ---------------------------------------------------------------

SPEEDS = (1.0, 1.0, 0.8, 0.8, 0.6, 0.6, 0.5, 0.5)  # one per GPU node, relative to the fastest
MODELS = {"sim-vlm-3B": 1.0, "sim-vlm-7B": 2.2}  # model -> cost factor
LOAD_S = {"sim-vlm-3B": 0.5, "sim-vlm-7B": 1.0}  # model -> load time of a new actor (s)
METHODS = {"ar": 1.0, "pld": 0.55, "eagle2": 0.4}  # method -> cost factor
BATCH_SIZES = (1, 2, 4, 8)
BATCH_EXP = 0.6  # a batch of b rows costs b ** -0.6 per row (the scheduler guesses b ** -0.5)
ROW_S = 0.21  # seconds per (sample, turn) row: ar, 3B model, batch 1, speed 1.0
SAMPLES = 384  # per cell: 1,152 shards
SHARD_SIZE = 8
IMAGE_KB = 128  # per sample: about the mean image of MMSpec's test split

# one row per shard: when the actor was built and when the shard ran (typed: no inference)
TIMES_SCHEMA = pa.schema(
    [("shard_id", pa.string()), ("node_id", pa.string()), ("instance", pa.string())]
    + [(name, pa.float64()) for name in ("speed", "init_start", "init_end", "start", "end")]
)

TARGET_RATIO = 1.10
TARGET_OVERHEAD_MS = 20.0


def shard_cost(shard: Shard) -> float:
    """Seconds the shard takes on a node of speed 1.0 (the known cost)."""
    cell = shard.cell
    factor = MODELS[cell.model.id] * METHODS[cell.method] * cell.batch_size**-BATCH_EXP
    return ROW_S * factor * len(expected_keys(shard))


class SimRunner:
    """A ShardRunner stand-in: loads for LOAD_S, then sleeps cost / the node's speed per shard.

    `speeds` maps Ray node ids to speeds; the benchmark sets it on a subclass once the nodes
    exist. Defined in the script, so Ray ships it (and `shard_cost`) to the workers by value.
    Each shard's telemetry is one row of timestamps: when this actor was built and when the
    shard started and ended on it.
    """

    speeds: ClassVar[dict[str, float]] = {}

    def __init__(
        self,
        model: ModelConfig,
        method: str,
        method_args: dict[str, Any],
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        import ray

        self.init_start = time.time()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.speed = self.speeds[self.node_id]
        self.instance = f"{os.getpid()}-{id(self)}"
        time.sleep(LOAD_S[model.id])
        self.init_end = time.time()
        self.last_telemetry: pa.Table | None = None

    def run(self, shard: Shard) -> list[ResultRow]:
        start = time.time()
        cell = shard.cell
        rows = [
            ResultRow(
                run_id=shard.run_id,
                cell_id=cell.cell_id,
                shard_id=shard.shard_id,
                model=cell.model.id,
                method=cell.method,
                batch_size=cell.batch_size,
                temperature=cell.temperature,
                seed=cell.seed,
                repeat=cell.repeat,
                workload=cell.workload,
                topic=sample.topic,
                category=sample.category,
                sample_id=sample.id,
                turn=turn,
                new_tokens=8,
                steps=4,
                device_uuid=self.instance,
                host=socket.gethostname(),
            )
            for sample in shard.samples
            for turn in range(len(sample.turns))
        ]
        # building the rows counts as part of the shard's simulated time
        time.sleep(max(0.0, start + shard_cost(shard) / self.speed - time.time()))
        end = time.time()
        self.last_telemetry = pa.table(
            {
                "shard_id": [shard.shard_id],
                "node_id": [self.node_id],
                "instance": [self.instance],
                "speed": [self.speed],
                "init_start": [self.init_start],
                "init_end": [self.init_end],
                "start": [start],
                "end": [end],
            },
            schema=TIMES_SCHEMA,
        )
        return rows


def make_workload(samples: int, shard_size: int, image_kb: int) -> list[Shard]:
    """2 models x 3 methods x 4 batch sizes, `samples` per cell (every sixth two-turn)."""
    grid = Grid(
        name="bench-scheduler",
        workloads=(WorkloadConfig("sim", "synthetic", None, samples, None),),
        models=tuple(ModelConfig(m) for m in MODELS),
        methods=tuple(METHODS),
        method_args={},
        batch_sizes=BATCH_SIZES,
        max_new_tokens=256,
        shard_size=shard_size,
    )
    items = [
        Sample(
            id=f"s{i:03d}",
            topic=TOPICS[i % len(TOPICS)],
            category="synthetic",
            turns=("describe", "and then?") if i % len(TOPICS) == 5 else ("describe",),
            image_bytes=os.urandom(image_kb * 1024),
        )
        for i in range(samples)
    ]
    return make_shards(expand(grid), {"sim": items}, "bench", shard_size)


# ---- the run --------------------------------------------------------------------------------


@dataclass
class Outcome:
    makespan: float  # Scheduler.run wall time
    t0: float  # time.time() when run was called
    summary: Any  # ScheduleSummary
    telemetry: list[dict[str, Any]]  # one row per shard (see SimRunner)
    error_rows: int  # rows with status != "ok"; must be 0


def start_cluster(speeds: tuple[float, ...]) -> tuple[Any, dict[str, float]]:
    keep_on_loopback()
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False},
    )
    by_node = {}
    for speed in speeds:
        node = cluster.add_node(num_cpus=1, num_gpus=1)
        by_node[node.node_id] = speed
    cluster.wait_for_nodes()
    return cluster, by_node


def run_once(shards: list[Shard], speeds_by_node: dict[str, float], prefetch: int) -> Outcome:
    import ray

    from mmspec.orchestrator.scheduler import Scheduler, SchedulerSettings, live_nodes, plan_slots

    if __name__ != "__main__":  # imported, not run: Ray workers cannot import this file
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    slots, use_gpu = plan_slots(ray.cluster_resources(), None, 1, 1, live_nodes())
    assert use_gpu and slots == len(speeds_by_node), (slots, use_gpu)
    runner_cls = type("SimRunnerOnCluster", (SimRunner,), {"speeds": dict(speeds_by_node)})
    telemetry: list[dict[str, Any]] = []
    errors = 0

    def sink(shard: Shard, table: pa.Table, series: pa.Table | None) -> None:
        nonlocal errors
        errors += sum(s != "ok" for s in table.column("status").to_pylist())
        if series is not None:
            telemetry.extend(series.to_pylist())

    settings = SchedulerSettings(slots, use_gpu, method_weights=dict(METHODS), prefetch=prefetch)
    t0 = time.time()
    summary = Scheduler(settings, runner_cls=runner_cls).run(shards, sink)
    makespan = time.time() - t0
    return Outcome(makespan, t0, summary, telemetry, errors)


# ---- analysis -------------------------------------------------------------------------------


def lower_bound(shards: list[Shard], speeds: tuple[float, ...]) -> tuple[float, float, float]:
    """(bound, total work at speed 1, longest shard at speed 1)."""
    costs = {s.shard_id: shard_cost(s) for s in shards}
    work = sum(costs.values())
    longest = max(shards, key=lambda s: costs[s.shard_id])
    by_work = work / sum(speeds) + min(LOAD_S.values())
    by_shard = costs[longest.shard_id] / max(speeds) + LOAD_S[longest.cell.model.id]
    return max(by_work, by_shard), work, costs[longest.shard_id]


def breakdown(outcome: Outcome, costs: dict[str, float]) -> dict[str, Any]:
    """Where each node's time went, from the runners' timestamps."""
    t0, t1 = outcome.t0, outcome.t0 + outcome.makespan
    per_node: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in outcome.telemetry:
        per_node[row["node_id"]].append(row)
    busy = dispatch = loads = startups = head = tail = 0.0
    gaps: list[float] = []  # end of a shard -> start of the next, same actor
    startup_gaps: list[float] = []  # actor gone or none -> next actor's constructor runs
    for rows in per_node.values():
        rows.sort(key=lambda r: r["start"])
        busy += sum(r["end"] - r["start"] for r in rows)
        free_since, instance = t0, None  # when the node last finished something
        for row in rows:
            if row["instance"] == instance:
                gap = row["start"] - free_since
                gaps.append(gap)
                dispatch += gap
            else:  # a new actor: wait for its process, its load, then its first shard
                startup = row["init_start"] - free_since
                startup_gaps.append(startup)
                loads += row["init_end"] - row["init_start"]
                first = row["start"] - row["init_end"]
                if instance is None:
                    head += startup + first
                else:
                    startups += startup + first
            instance, free_since = row["instance"], row["end"]
        tail += t1 - free_since
    slot_s = outcome.makespan * len(per_node)
    nodes = [
        {
            "speed": rows[0]["speed"],
            "shards": len(rows),
            "work": sum(costs[r["shard_id"]] for r in rows),
            "busy": sum(r["end"] - r["start"] for r in rows),
            "last_end": rows[-1]["end"] - t0,
        }
        for rows in sorted(per_node.values(), key=lambda rows: -rows[0]["speed"])
    ]
    return {
        "per_node": nodes,
        "nodes": len(per_node),
        "busy": busy,
        "dispatch": dispatch,
        "gaps": gaps,
        "loads": loads,
        "startups": startups,
        "startup_gaps": startup_gaps,
        "head": head,
        "tail": tail,
        "slot_s": slot_s,
        "unaccounted": slot_s - (busy + dispatch + loads + startups + head + tail),
    }


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(shards: list[Shard], speeds: tuple[float, ...], outcome: Outcome, args: Any) -> bool:
    """Print the markdown tables; True when both targets are met and every shard ran once."""
    bound, work, longest = lower_bound(shards, speeds)
    b = breakdown(outcome, {x.shard_id: shard_cost(x) for x in shards})
    ratio = outcome.makespan / bound
    gaps_ms = [g * 1000 for g in b["gaps"]]
    mean_gap = statistics.fmean(gaps_ms)
    n, s = len(shards), outcome.summary
    complete = outcome.error_rows == 0 and len(outcome.telemetry) == n and s.failed == 0
    print(f"\n#### {time.strftime('%Y-%m-%d %H:%M')}, prefetch={args.prefetch}\n")
    print(
        f"{n} shards of {len({x.cell.cell_id for x in shards})} cells; node speeds "
        f"{', '.join(f'{x:g}' for x in speeds)} (sum {sum(speeds):g}); work {work:.1f} s at "
        f"speed 1, longest shard {longest:.2f} s; {s.actors_started} actors started (model "
        f"loads), {s.retries} retries, {s.failed} failed, {outcome.error_rows} error rows, "
        f"{len(outcome.telemetry)} shards timed.\n"
    )
    ups = b["startup_gaps"]
    print("| measure | value |")
    print("|---|---|")
    print(f"| lower bound: W / sum(speed) + min load | {bound:.2f} s |")
    print(f"| makespan (`Scheduler.run` wall) | {outcome.makespan:.2f} s |")
    print(f"| makespan / lower bound | **{ratio:.3f}** (target <= {TARGET_RATIO:.2f}) |")
    print(
        f"| hand-over per shard (runner done -> next shard starts), mean | **{mean_gap:.1f} ms**"
        f" (target <= {TARGET_OVERHEAD_MS:g} ms; {len(gaps_ms)} hand-overs) |"
    )
    print(
        f"| hand-over p50 / p95 / max | {quantile(gaps_ms, 0.5):.1f} / "
        f"{quantile(gaps_ms, 0.95):.1f} / {max(gaps_ms):.1f} ms |"
    )
    print(
        f"| actor start (node free -> constructor runs), mean / max of {len(ups)} | "
        f"{statistics.fmean(ups):.2f} / {max(ups):.2f} s |"
    )
    print(f"\nWhere the slot time went ({b['nodes']} nodes x makespan):\n")
    print("| part | slot-seconds | share |")
    print("|---|---|---|")
    parts = [
        ("running shards", b["busy"]),
        ("model loads (simulated)", b["loads"]),
        ("hand-overs between shards of one actor", b["dispatch"]),
        (
            "actor switches (last shard of the old actor -> first of the new, less load)",
            b["startups"],
        ),
        ("first actor per node (run start -> its first shard, less load)", b["head"]),
        ("idle at the end (node's last shard -> run end)", b["tail"]),
        ("unaccounted", b["unaccounted"]),
    ]
    for name, value in parts:
        print(f"| {name} | {value:.2f} | {100 * value / b['slot_s']:.1f}% |")
    print(f"| total | {b['slot_s']:.2f} | 100% |")
    print("\n| node speed | shards | work done (s at speed 1) | busy (s) | last shard ends (s) |")
    print("|---|---|---|---|---|")
    for node in b["per_node"]:
        print(
            f"| {node['speed']:g} | {node['shards']} | {node['work']:.1f} | {node['busy']:.1f} |"
            f" {node['last_end']:.1f} |"
        )
    print(
        f"\nMachine: {os.cpu_count()} CPUs, load average {args.load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (1 min); Python {platform.python_version()}, Ray "
        f"{_ray_version()}, pyarrow {pa.__version__}."
    )
    ok = ratio <= TARGET_RATIO and mean_gap <= TARGET_OVERHEAD_MS and complete
    print(f"\nTargets {'met' if ok else 'NOT met'}.")
    return ok


def _ray_version() -> str:
    import ray

    return ray.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples per cell")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="samples per shard")
    parser.add_argument("--image-kb", type=int, default=IMAGE_KB, help="image bytes per sample")
    parser.add_argument("--repeats", type=int, default=1, help="runs on the same cluster")
    parser.add_argument(
        "--prefetch", type=int, default=1, help="SchedulerSettings.prefetch (0: one at a time)"
    )
    parser.add_argument("--dump", help="write every shard's timestamps to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    shards = make_workload(args.samples, args.shard_size, args.image_kb)
    cluster, speeds_by_node = start_cluster(SPEEDS)
    import ray

    ok = True
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        for _ in range(args.repeats):
            args.load_before = os.getloadavg()[0]
            outcome = run_once(shards, speeds_by_node, args.prefetch)
            ok = report(shards, SPEEDS, outcome, args) and ok
            if args.dump:
                costs = {x.shard_id: shard_cost(x) for x in shards}
                rows = [{**r, "cost": costs[r["shard_id"]]} for r in outcome.telemetry]
                with open(args.dump, "w", encoding="utf-8") as f:
                    json.dump({"t0": outcome.t0, "makespan": outcome.makespan, "rows": rows}, f)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
