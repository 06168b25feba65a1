"""Scheduler: a `ray.wait` work queue of shards over one Worker actor per device slot.

A model is expensive to load, so an actor is pinned to one (model, method) pair and keeps
taking shards of that pair; only when its pair has no work left is it killed and a new actor
started for the pair with the most samples left. Results come back to the driver, which
hands them to a sink (the store), so no shared file system is needed.

A shard that fails (exception, actor death) is retried on a fresh actor up to `max_retries`
times, then recorded as error rows; a pair whose runner cannot be built at all fails its
remaining shards at once instead of reloading for each.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from mmspec.orchestrator.cells import Shard
from mmspec.orchestrator.runner import ShardRunner
from mmspec.orchestrator.shard_rows import complete_table, error_table
from mmspec.orchestrator.worker import PairKey, RunnerInitError, Worker, pair_of

log = logging.getLogger(__name__)

ResultSink = Callable[[Shard, pa.Table], None]  # called in the driver, once per shard


@dataclass(frozen=True)
class SchedulerSettings:
    slots: int  # actors alive at once: one per GPU, or CPUs // threads_per_worker
    use_gpu: bool = False  # each actor asks for 1 GPU, else for threads_per_worker CPUs
    threads_per_worker: int = 1  # torch threads per actor (the runner sets them)
    max_retries: int = 2  # extra attempts per shard, each on a fresh actor


@dataclass(frozen=True)
class ScheduleSummary:
    shards: int  # shards handed to the sink (= shards given to `run`)
    failed: int  # of those, recorded as error rows after every attempt failed
    retries: int  # attempts beyond the first, over all shards
    actors_started: int  # model loads: the number to keep low


def plan_slots(
    resources: Mapping[str, float], workers: int | None, threads_per_worker: int
) -> tuple[int, bool]:
    """(slots, use_gpu) for a cluster's resources: one actor per GPU if there are GPUs,
    else `workers` if given, else CPUs // threads_per_worker (at least 1)."""
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        return (min(gpus, workers) if workers else gpus), True
    if workers:
        return workers, False
    return max(1, int(resources.get("CPU", 1)) // threads_per_worker), False


def actor_options(settings: SchedulerSettings) -> dict[str, Any]:
    """Ray resources of one Worker actor; the scheduler retries, so Ray must not."""
    options: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0}
    if settings.use_gpu:
        options["num_gpus"] = 1  # Ray sets CUDA_VISIBLE_DEVICES: "cuda" is the actor's GPU
    else:
        options["num_cpus"] = settings.threads_per_worker
    return options


@dataclass
class _Slot:
    """One device slot: at most one live actor, pinned to one pair."""

    actor: Any = None  # Ray actor handle of a Worker, or None when empty
    pair: PairKey | None = None


class Scheduler:
    """Runs shards on Ray actors and feeds every result (or error rows) to a sink.

    Example::

        settings = SchedulerSettings(slots=2, threads_per_worker=1)
        summary = Scheduler(settings, runner_cls=ShardRunner).run(shards, sink=print_table)
    """

    def __init__(self, settings: SchedulerSettings, runner_cls: type = ShardRunner) -> None:
        self._settings = settings  # resources and retry policy
        self._runner_cls = runner_cls  # built inside each actor; tests pass a fake

    def run(self, shards: Sequence[Shard], sink: ResultSink) -> ScheduleSummary:
        """Run every shard once (with retries); returns when all are in the sink."""
        return _Run(self._settings, self._runner_cls, sink).run(shards)


class _Run:
    """The state of one `Scheduler.run` call."""

    def __init__(self, settings: SchedulerSettings, runner_cls: type, sink: ResultSink) -> None:
        self.settings = settings
        self.runner_cls = runner_cls
        self.sink = sink
        # queued shards per pair, in first-seen order; a retried shard goes to the front
        self.queues: dict[PairKey, deque[Shard]] = {}
        self.queued_samples: Counter[PairKey] = Counter()  # "remaining work" per pair
        self.attempts: Counter[str] = Counter()  # failed attempts per shard id
        self.init_failures: Counter[PairKey] = Counter()  # runner builds that failed
        self.broken: dict[PairKey, str] = {}  # pairs that cannot load -> the error
        self.in_flight: dict[Any, tuple[_Slot, Shard]] = {}  # ObjectRef -> where/what
        self.failed = self.retries = self.actors_started = 0
        self.actor_cls = ray.remote(Worker).options(**actor_options(settings))
        self.device = "cuda" if settings.use_gpu else "cpu"

    def run(self, shards: Sequence[Shard]) -> ScheduleSummary:
        for shard in shards:
            self.enqueue(shard)
        slots = [_Slot() for _ in range(min(self.settings.slots, len(shards)))]
        try:
            for slot in slots:
                self.dispatch(slot)
            while self.in_flight:
                [ref], _ = ray.wait(list(self.in_flight), num_returns=1)
                slot, shard = self.in_flight.pop(ref)
                try:
                    table = complete_table(shard, ray.get(ref))
                except Exception as exc:  # any failure of the attempt is retried the same way
                    self.failure(slot, shard, exc)
                else:
                    self.finish(shard, table)
                self.dispatch(slot)
        finally:
            for slot in slots:
                self.retire(slot)
        return ScheduleSummary(len(shards), self.failed, self.retries, self.actors_started)

    def enqueue(self, shard: Shard, front: bool = False) -> None:
        pair = pair_of(shard.cell)
        queue = self.queues.setdefault(pair, deque())
        if front:
            queue.appendleft(shard)
        else:
            queue.append(shard)
        self.queued_samples[pair] += len(shard.samples)

    def dispatch(self, slot: _Slot) -> None:
        """Give an idle slot its next shard: same pair if possible, else switch pairs."""
        pair = slot.pair if slot.actor is not None and self.queues.get(slot.pair) else None
        if pair is None:
            self.retire(slot)
            pair = max(self.queues, key=lambda p: self.queued_samples[p], default=None)
            if pair is None:
                return
            model, method, _ = pair
            first = self.queues[pair][0]
            slot.actor = self.actor_cls.remote(
                self.runner_cls,
                model,
                method,
                first.cell.method_args,
                self.device,
                self.settings.threads_per_worker,
            )
            slot.pair = pair
            self.actors_started += 1
        shard = self.queues[pair].popleft()
        if not self.queues[pair]:
            del self.queues[pair]
        self.queued_samples[pair] -= len(shard.samples)
        self.in_flight[slot.actor.run.remote(shard)] = (slot, shard)

    def retire(self, slot: _Slot) -> None:
        if slot.actor is not None:
            ray.kill(slot.actor, no_restart=True)
        slot.actor, slot.pair = None, None

    def finish(self, shard: Shard, table: pa.Table) -> None:
        self.sink(shard, table)

    def failure(self, slot: _Slot, shard: Shard, exc: Exception) -> None:
        """A failed attempt: retry on a fresh actor, or record error rows when out of tries."""
        pair = pair_of(shard.cell)
        error = f"{type(exc).__name__}: {exc}"
        self.retire(slot)  # the actor may be dead or half-broken; never reuse it
        if pair in self.broken:
            self.give_up(shard, self.broken[pair])
            return
        if isinstance(exc, RunnerInitError):
            self.init_failures[pair] += 1
            if self.init_failures[pair] > self.settings.max_retries:
                log.error("%s/%s cannot be loaded; failing its shards", pair[0].id, pair[1])
                self.broken[pair] = error
                self.give_up(shard, error)
                for queued in self.queues.pop(pair, deque()):
                    self.give_up(queued, error)
                self.queued_samples.pop(pair, None)
                return
        else:
            self.attempts[shard.shard_id] += 1
            if self.attempts[shard.shard_id] > self.settings.max_retries:
                self.give_up(shard, error)
                return
        log.warning("shard %s failed, retrying on a fresh actor: %s", shard.shard_id, error[:300])
        self.retries += 1
        self.enqueue(shard, front=True)

    def give_up(self, shard: Shard, error: str) -> None:
        log.error("shard %s failed after all attempts; recording error rows", shard.shard_id)
        self.failed += 1
        self.finish(shard, error_table(shard, error))
