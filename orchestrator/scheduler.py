"""Scheduler: a `ray.wait` work queue of shards over Worker actors, one per device slot.

Placement. A worker asks Ray for `gpus_per_worker` GPUs (Ray puts them on one node and sets
CUDA_VISIBLE_DEVICES) or, on a CPU-only cluster, for `threads_per_worker` CPUs; Ray's own
scheduler spreads the actors over the nodes.

Order. Shards wait in one queue per (model, method) pair, longest expected first
(`expected_cost`). A model is expensive to load, so an actor is pinned to one pair and keeps
taking that pair's shards; when its pair runs dry it is killed, and its slot starts an actor
for the pair with the most expected work per actor already on it - unless that work would be
done before a new actor finished loading (measured as the run goes; see `_Clock`). When no
pair is worth a new actor the slot stays empty: idle actors are released at once, not at the
end of the run. Each actor runs one shard at a time and has the next one already waiting
behind it (`prefetch`), its arguments shipped, so it starts the moment the last one returns
instead of after a round trip through the driver. A shard is queued behind another only while
its pair has more shards left than actors serving it, so near a pair's end no shard waits on a
busy actor while another actor of that pair runs dry. Fast and slow workers alike stay busy.

Faults. A failed attempt (an exception from the runner, the actor's process dying, its node
lost) is retried on a fresh actor up to `max_retries` times, then recorded as error rows (shards
queued behind it on the same actor go back to the queue, not counted as attempts); a pair
whose runner cannot be built fails its remaining shards at once instead of reloading for each.
When the cluster shrinks, slots beyond what the live nodes can hold are parked until it grows
again; if no node can hold a single worker for `capacity_wait_s`, what is left is recorded as
error rows. The run always ends.

Watchdog. A shard whose worker shows no progress is cancelled, not waited on: every
`heartbeat_s` the driver asks each busy actor for `Worker.progress()` (forward passes and shards,
answered on a thread of its own, beside the running shard). A shard that has not moved for the
stall limit - `shard_timeout_s` from the grid, else `stall_factor` times the longest gap seen
between two readings of its pair, at least `stall_floor_s` - is failed like a crash: its actor
is killed and the shard retried on a fresh one, then recorded as error rows naming the
timeout. A frozen process (SIGSTOP, a wedged kernel) and one that answers but never advances
are both caught; a long but healthy shard keeps moving and is never killed. A new actor has
`load_timeout_s` to start and answer its first reading.

Results come back to the driver, which hands each shard's table and telemetry to a sink exactly
once, so no shared file system is needed and nothing is counted twice.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from mmspec.orchestrator.shard_rows import complete_table, error_table, expected_keys
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.worker import PairKey, RunnerInitError, Worker, pair_of, unpack_table

log = logging.getLogger(__name__)

# called in the driver, once per shard: (shard, result table, telemetry table or None)
ResultSink = Callable[[Shard, pa.Table, pa.Table | None], None]

HEARTBEAT = "heartbeat"  # the actors' concurrency group for progress readings
_BILLIONS = re.compile(r"(\d+(?:\.\d+)?)[bB](?![A-Za-z])")  # "7B" in "Qwen2.5-VL-7B-Instruct"


class SchedulingError(ValueError):
    """The cluster cannot hold a single worker as configured (e.g. too many GPUs per worker)."""


class ShardTimeoutError(RuntimeError):
    """A shard's worker showed no progress within the stall limit (or never started)."""


@dataclass(frozen=True)
class SchedulerSettings:
    slots: int  # actors alive at once: see plan_slots
    use_gpu: bool = False  # each actor asks for gpus_per_worker GPUs, else for CPUs
    threads_per_worker: int = 1  # torch threads per actor (the runner sets them)
    gpus_per_worker: int = 1  # GPUs one actor reserves, on one node
    max_retries: int = 2  # extra attempts per shard, each on a fresh actor
    # shards waiting on each actor behind the running one (args already shipped): hides the
    # hand-over between shards; 0 = the next shard is sent only when the last one returns
    prefetch: int = 1
    # relative cost of a method's decoding (default 1.0); only the order of shards uses it
    method_weights: Mapping[str, float] = field(default_factory=dict)
    poll_s: float = 5.0  # how often to look for returning nodes while slots are parked
    capacity_wait_s: float = 600.0  # no room for any worker this long: fail what is left
    # the watchdog (module doc): a fixed stall limit, or None to derive it from the run
    shard_timeout_s: float | None = None
    stall_floor_s: float = 120.0  # the derived stall limit is never shorter
    stall_factor: float = 10.0  # x the longest gap seen between two progress readings
    load_timeout_s: float = 1800.0  # a new actor's process start + model load
    heartbeat_s: float = 10.0  # how often busy actors are asked for progress


@dataclass(frozen=True)
class ScheduleSummary:
    shards: int  # shards handed to the sink (= shards given to `run`)
    failed: int  # of those, recorded as error rows after every attempt failed
    retries: int  # attempts beyond the first, over all shards
    actors_started: int  # model loads: the number to keep low


def worker_fits(
    node: Mapping[str, float], use_gpu: bool, threads_per_worker: int, gpus_per_worker: int
) -> int:
    """How many workers one node's resources hold."""
    if use_gpu:
        return int(node.get("GPU", 0) // gpus_per_worker)
    return int(node.get("CPU", 0) // threads_per_worker)


def plan_slots(
    resources: Mapping[str, float],
    workers: int | None,
    threads_per_worker: int,
    gpus_per_worker: int = 1,
    nodes: Sequence[Mapping[str, float]] | None = None,
) -> tuple[int, bool]:
    """(slots, use_gpu) for a cluster: one actor per `gpus_per_worker` GPUs if there are GPUs,
    else `workers` if given, else one per `threads_per_worker` CPUs (at least 1).

    `resources` are the cluster's totals; `nodes` (each live node's resources) make the count
    exact where workers cannot span nodes, e.g. 2 GPUs per worker on nodes of 3 GPUs.
    Raises SchedulingError when GPUs exist but no node has `gpus_per_worker` of them, or,
    without GPUs, no node has `threads_per_worker` CPUs.
    """
    gpus = resources.get("GPU", 0)
    if gpus > 0:
        if nodes is None:
            fits = int(gpus // gpus_per_worker)
        else:
            fits = sum(worker_fits(n, True, threads_per_worker, gpus_per_worker) for n in nodes)
        if fits == 0:
            raise SchedulingError(
                f"gpus_per_worker is {gpus_per_worker}, but no node of this cluster has that "
                f"many GPUs ({gpus:g} in all); lower gpus_per_worker or add larger nodes"
            )
        return (min(fits, workers) if workers else fits), True
    if nodes is None:
        return workers or max(1, int(resources.get("CPU", 1)) // threads_per_worker), False
    fits = sum(worker_fits(n, False, threads_per_worker, gpus_per_worker) for n in nodes)
    if fits == 0:  # Ray would keep the actors pending until capacity_wait_s gives up
        raise SchedulingError(
            f"threads_per_worker is {threads_per_worker}, but no node of this cluster has that "
            f"many CPUs ({resources.get('CPU', 0):g} in all); lower threads_per_worker"
        )
    return workers or fits, False


def actor_options(settings: SchedulerSettings) -> dict[str, Any]:
    """Ray resources of one Worker actor; the scheduler retries, so Ray must not."""
    options: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0}
    if settings.use_gpu:
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs: "cuda" means them. A resource
        # request is always met on one node, which a model split over several GPUs needs.
        options["num_gpus"] = settings.gpus_per_worker
    else:
        options["num_cpus"] = settings.threads_per_worker
    return options


def model_scale(model_id: str) -> float:
    """A size guess from the id ("...-7B-..." -> 7.0), else 1.0; orders models, nothing more."""
    found = _BILLIONS.findall(model_id)
    return float(found[-1]) if found else 1.0


def expected_cost(shard: Shard, method_weights: Mapping[str, float] | None = None) -> float:
    """Expected run time of a shard, in arbitrary units: only comparisons between shards count.

    Generated tokens at most (one row per sample and turn, x max_new_tokens) x the method's
    weight x the model's size guess, over sqrt(batch_size): decoding is memory-bound, so a batch
    of b rows costs much less than b single rows, but padding and ragged finishes keep it above
    one row's cost.
    """
    cell = shard.cell
    weight = (method_weights or {}).get(cell.registered_method, 1.0)  # variants weigh alike
    rows = len(expected_keys(shard))
    scale = model_scale(cell.model.id)
    return rows * cell.max_new_tokens * weight * scale / math.sqrt(cell.batch_size)


def live_nodes() -> list[dict[str, float]]:
    """The resources of every node Ray currently reports alive."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


@dataclass
class _Slot:
    """One device slot: at most one live actor, pinned to one pair."""

    actor: Any = None  # Ray actor handle of a Worker, or None when empty
    pair: PairKey | None = None
    parked: bool = False  # left empty because the live nodes have no room for it
    fresh: bool = False  # its actor has not been sent a shard yet (the first includes the load)
    # ObjectRefs of the shards sent to its actor and not yet collected, oldest (running) first
    inflight: deque[Any] = field(default_factory=deque)
    returned: float = -math.inf  # time.monotonic() when its actor's last shard was collected
    # watchdog: the actor's last progress reading, when it last moved (or the slot got work),
    # whether the actor has answered at all (it is loaded), the reading not yet answered
    beat: int | None = None
    beat_at: float = 0.0
    answered: bool = False
    probe: Any = None


@dataclass(frozen=True)
class _Attempt:
    """A shard in flight."""

    slot: _Slot
    shard: Shard
    started: float  # time.monotonic() at dispatch (a shard waiting behind another starts later)
    fresh: bool  # the first shard of a new actor: its time includes process start + model load


class _Clock:
    """What the driver has measured: seconds per unit of expected cost, and actor start-up.

    A shard's time on a warm actor gives the pair's rate; a fresh actor's first shard, less
    what the rate says the shard itself took, gives the start-up (process + model load).
    """

    def __init__(self) -> None:
        self.warm: dict[PairKey, tuple[float, float]] = {}  # pair -> (seconds, cost) summed
        self.warm_total = (0.0, 0.0)  # (seconds, cost) over every pair
        self.first: dict[PairKey, list[tuple[float, float]]] = {}  # pair -> first shards

    def record(self, pair: PairKey, seconds: float, cost: float, fresh: bool) -> None:
        if fresh:
            self.first.setdefault(pair, []).append((seconds, cost))
            return
        total_s, total_cost = self.warm.get(pair, (0.0, 0.0))
        self.warm[pair] = (total_s + seconds, total_cost + cost)
        self.warm_total = (self.warm_total[0] + seconds, self.warm_total[1] + cost)

    def rate(self, pair: PairKey) -> float | None:
        """Seconds per cost unit: the pair's own, else over every pair, else unknown."""
        seconds, cost = self.warm.get(pair, self.warm_total)
        return seconds / cost if cost > 0 else None

    def startup(self, pair: PairKey) -> float | None:
        """Seconds to start an actor of the pair: its own measure, else other pairs' mean."""
        own = self._startup(pair)
        if own is not None:
            return own
        others = [x for p in self.first if p != pair and (x := self._startup(p)) is not None]
        return sum(others) / len(others) if others else None

    def _startup(self, pair: PairKey) -> float | None:
        rate, firsts = self.rate(pair), self.first.get(pair)
        if rate is None or not firsts:
            return None
        return max(0.0, sum(s - rate * c for s, c in firsts) / len(firsts))


class Scheduler:
    """Runs shards on Ray actors and feeds every result (or error rows) to a sink.

    Example::

        settings = SchedulerSettings(slots=2, threads_per_worker=1)
        summary = Scheduler(settings, runner_cls=ShardRunner).run(shards, sink=write_tables)
    """

    def __init__(self, settings: SchedulerSettings, runner_cls: type | None = None) -> None:
        if runner_cls is None:
            # Imported here, not at module level: the runner pulls in torch and transformers,
            # which the driver needs only when it really schedules model work.
            from mmspec.orchestrator.runner import ShardRunner

            runner_cls = ShardRunner
        self._settings = settings  # resources, ordering and retry policy
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
        # queued shards per pair, longest first; a retried shard goes to the front
        self.queues: dict[PairKey, deque[Shard]] = {}
        self.queued_cost: dict[PairKey, float] = {}  # expected work left per pair
        self.cost: dict[str, float] = {}  # expected_cost per shard id, computed once
        self.attempts: Counter[str] = Counter()  # failed attempts per shard id
        self.init_failures: Counter[PairKey] = Counter()  # runner builds that failed
        self.broken: dict[PairKey, str] = {}  # pairs that cannot load -> the error
        self.in_flight: dict[Any, _Attempt] = {}  # ObjectRef -> where, what, since when
        self.clock = _Clock()  # measured rates and start-up times
        self.done: set[str] = set()  # shard ids given to the sink: never a second time
        self.slots: list[_Slot] = []
        self.failed = self.retries = self.actors_started = 0
        self.last_poll = time.monotonic()
        self.no_room_since: float | None = None  # when the live nodes last held no worker
        self.last_watch = time.monotonic()
        self.gaps: dict[PairKey, float] = {}  # longest seen between two progress readings
        remote = ray.remote(concurrency_groups={HEARTBEAT: 1})(Worker)
        self.actor_cls = remote.options(**actor_options(settings))
        self.device = "cuda" if settings.use_gpu else "cpu"

    def run(self, shards: Sequence[Shard]) -> ScheduleSummary:
        ids = [s.shard_id for s in shards]
        if len(set(ids)) != len(ids):
            raise ValueError("shard ids must be unique in a run")
        for shard in shards:
            self.cost[shard.shard_id] = expected_cost(shard, self.settings.method_weights)
        for shard in sorted(shards, key=lambda s: self.cost[s.shard_id], reverse=True):
            self.enqueue(shard)
        self.slots = [_Slot() for _ in range(min(self.settings.slots, len(shards)))]
        try:
            for slot in self.slots:  # every slot its first shard before any waits behind one
                self.dispatch(slot, prefetch=False)
            for slot in self.slots:
                self.top_up(slot)
            while self.in_flight or self.queues:
                for ref in self.wait():
                    self.collect(ref)
                self.poll_cluster()
                self.watch()
        finally:
            for slot in self.slots:
                self.retire(slot)
        return ScheduleSummary(len(shards), self.failed, self.retries, self.actors_started)

    # ---- the queue ------------------------------------------------------------------------

    def enqueue(self, shard: Shard, front: bool = False) -> None:
        pair = pair_of(shard.cell)
        queue = self.queues.setdefault(pair, deque())
        if front:
            queue.appendleft(shard)
        else:
            queue.append(shard)
        self.queued_cost[pair] = self.queued_cost.get(pair, 0.0) + self.cost[shard.shard_id]

    def pop(self, pair: PairKey) -> Shard:
        shard = self.queues[pair].popleft()
        if self.queues[pair]:
            self.queued_cost[pair] -= self.cost[shard.shard_id]
        else:  # dropped, not subtracted: float leftovers must not look like work
            del self.queues[pair], self.queued_cost[pair]
        return shard

    def next_pair(self) -> PairKey | None:
        """The pair with the most expected work per actor, counting the one about to start,
        among those worth a new actor."""
        serving = Counter(s.pair for s in self.slots if s.actor is not None)
        worth = [p for p in self.queues if self.worth_an_actor(p, serving[p])]
        return max(worth, key=lambda p: self.queued_cost[p] / (1 + serving[p]), default=None)

    def worth_an_actor(self, pair: PairKey, serving: int) -> bool:
        """Whether one more actor finishes the pair's queue sooner than the `serving` ones.

        n actors with W seconds of work left finish in W/n; one more, starting after L, in
        L + (W - nL)/(n + 1), which is sooner exactly when W/n > L. Until both are measured,
        yes; a pair that nobody serves always gets an actor.
        """
        if serving == 0:
            return True
        rate, startup = self.clock.rate(pair), self.clock.startup(pair)
        if rate is None or startup is None:
            return True
        return self.queued_cost[pair] * rate / serving > startup

    # ---- slots and actors -----------------------------------------------------------------

    def dispatch(self, slot: _Slot, prefetch: bool = True) -> None:
        """Keep a slot busy: an idle one gets its next shard (same pair if possible, else it
        switches pairs), then shards to wait behind it (`top_up`)."""
        if not slot.inflight:
            pair = slot.pair if slot.actor is not None and slot.pair in self.queues else None
            if pair is None:
                self.retire(slot)  # its pair is done: release the actor (and its model) now
                pair = self.next_pair()
                if pair is None:
                    return
                model, method, _ = pair
                slot.actor = self.actor_cls.remote(
                    self.runner_cls,
                    model,
                    method,
                    self.queues[pair][0].cell.method_args,
                    self.device,
                    self.settings.threads_per_worker,
                )
                slot.pair, slot.fresh, slot.returned = pair, True, -math.inf
                slot.beat, slot.answered = None, False
                self.ask(slot)  # answered the moment the model is loaded: then the clock runs
                self.actors_started += 1
            self.send(slot, pair)
        if prefetch:
            self.top_up(slot)

    def top_up(self, slot: _Slot) -> None:
        """Queue shards on a busy actor, up to `prefetch`, while its pair has more shards left
        than actors serving it: each of those still finds one when it frees up."""
        pair = slot.pair
        if slot.actor is None or pair is None:
            return
        serving = sum(s.actor is not None and s.pair == pair for s in self.slots)
        while (
            0 < len(slot.inflight) <= self.settings.prefetch
            and len(self.queues.get(pair, ())) > serving
        ):
            self.send(slot, pair)

    def send(self, slot: _Slot, pair: PairKey) -> None:
        shard = self.pop(pair)
        now = time.monotonic()
        if not slot.inflight:  # idle until now: the stall clock starts with the work
            slot.beat_at = now
        attempt = _Attempt(slot, shard, now, slot.fresh)
        ref = slot.actor.run_packed.remote(shard)
        self.in_flight[ref] = attempt
        slot.inflight.append(ref)
        slot.fresh = False

    def take_back(self, slot: _Slot) -> list[_Attempt]:
        """Forget every shard still sent to the slot's actor (oldest first)."""
        attempts = [self.in_flight.pop(ref) for ref in slot.inflight]
        slot.inflight.clear()
        return attempts

    def retire(self, slot: _Slot) -> None:
        if slot.actor is not None:
            ray.kill(slot.actor, no_restart=True)
        slot.actor, slot.pair, slot.probe = None, None, None

    def wait(self) -> list[Any]:
        """Refs that are ready; none after `poll_s` so the loop can look at the cluster."""
        if not self.in_flight:  # work is queued but every slot is parked
            time.sleep(self.settings.poll_s)
            return []
        ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=self.settings.poll_s)
        return ready

    def collect(self, ref: Any) -> None:
        # An actor runs its shards in order, so its oldest is settled first: if it failed,
        # it is the one to blame, and the ones behind it go back to the queue unblamed.
        slot = self.in_flight[ref].slot
        ref = slot.inflight.popleft()
        attempt = self.in_flight.pop(ref)
        shard = attempt.shard
        try:
            packed, packed_telemetry = ray.get(ref)
            table = complete_table(shard, unpack_table(packed))
            telemetry = None if packed_telemetry is None else unpack_table(packed_telemetry)
        except Exception as exc:  # any failure of the attempt is retried the same way
            self.failure(slot, shard, exc)
        else:
            now = time.monotonic()
            # a shard that waited behind another started when that one returned
            seconds = now - max(attempt.started, slot.returned)
            slot.returned = slot.beat_at = now
            cost = self.cost[shard.shard_id]
            self.clock.record(pair_of(shard.cell), seconds, cost, attempt.fresh)
            self.finish(shard, table, telemetry)
        if not slot.parked:
            self.dispatch(slot)

    # ---- cluster size ---------------------------------------------------------------------

    def capacity(self) -> int:
        """Workers the live nodes hold, at most the planned slots."""
        s = self.settings
        fits = sum(
            worker_fits(n, s.use_gpu, s.threads_per_worker, s.gpus_per_worker) for n in live_nodes()
        )
        return min(fits, len(self.slots))

    def fit_to_cluster(self, slot: _Slot) -> None:
        """After a lost actor: park its (empty) slot if the live nodes are already full."""
        active = sum(s.actor is not None for s in self.slots)
        room = self.capacity()
        if active >= room:
            slot.parked = True
            log.warning("the cluster now holds %d worker(s); parking a slot until it grows", room)

    def poll_cluster(self) -> None:
        """Every `poll_s`: unpark slots the live nodes hold again; give up if none can hold any.

        Nodes can also die between a capacity check and an actor's start, leaving actors
        pending forever, so this looks even when no slot is parked (one GCS call per poll).
        """
        now = time.monotonic()
        if now - self.last_poll < self.settings.poll_s:
            return
        self.last_poll = now
        room = self.capacity()
        if room == 0:
            self.no_room_since = self.no_room_since or now
            if now - self.no_room_since >= self.settings.capacity_wait_s:
                self.abandon(
                    f"no live node could hold a worker for {self.settings.capacity_wait_s:g} s"
                )
            return
        self.no_room_since = None
        active = sum(s.actor is not None for s in self.slots)
        for slot in [s for s in self.slots if s.parked][: max(0, room - active)]:
            log.info("the cluster has room again; unparking a slot")
            slot.parked = False
            self.dispatch(slot)

    def abandon(self, error: str) -> None:
        """Record every shard not yet finished as error rows and stop every actor."""
        for slot in self.slots:
            for attempt in self.take_back(slot):
                self.give_up(attempt.shard, error)
            self.retire(slot)
        for pair in list(self.queues):
            while pair in self.queues:
                self.give_up(self.pop(pair), error)

    # ---- watchdog -------------------------------------------------------------------------

    def watch(self) -> None:
        """Every `heartbeat_s`: read each busy actor's progress, ask again, and fail the shard
        of any actor that has not moved for its limit."""
        now = time.monotonic()
        if now - self.last_watch < self.settings.heartbeat_s:
            return
        self.last_watch = now
        for slot in self.slots:
            if slot.actor is None or not slot.inflight:
                continue
            self.read_progress(slot, now)
            limit = self.stall_limit(slot)
            if now - slot.beat_at > limit:
                self.stalled(slot, now - slot.beat_at, limit)
            elif slot.probe is None:
                self.ask(slot)

    def ask(self, slot: _Slot) -> None:
        slot.probe = slot.actor.progress.options(concurrency_group=HEARTBEAT).remote()

    def read_progress(self, slot: _Slot, now: float) -> None:
        if slot.probe is None or not ray.wait([slot.probe], timeout=0)[0]:
            return  # still unanswered: a frozen process never answers, which is the point
        probe, slot.probe = slot.probe, None
        try:
            beat = ray.get(probe)
        except Exception:  # a dead actor: its shard's own result reports that
            return
        if not slot.answered:  # loaded and answering: the stall clock starts now
            slot.answered, slot.beat_at = True, now
        elif beat != slot.beat:
            assert slot.pair is not None
            self.gaps[slot.pair] = max(self.gaps.get(slot.pair, 0.0), now - slot.beat_at)
            slot.beat_at = now
        slot.beat = beat

    def stall_limit(self, slot: _Slot) -> float:
        s = self.settings
        if not slot.answered:
            return s.load_timeout_s
        if s.shard_timeout_s is not None:
            return s.shard_timeout_s
        assert slot.pair is not None
        return max(s.stall_floor_s, s.stall_factor * self.gaps.get(slot.pair, 0.0))

    def stalled(self, slot: _Slot, idle_s: float, limit: float) -> None:
        """Fail the slot's running shard as if its worker had crashed: kill, retry elsewhere."""
        ref = slot.inflight.popleft()
        shard = self.in_flight.pop(ref).shard
        what = "made no progress" if slot.answered else "did not start"
        error = f"the worker {what} for {idle_s:.0f} s (limit {limit:.0f} s)"
        log.error("shard %s: %s; killing the worker", shard.shard_id, error)
        self.failure(slot, shard, ShardTimeoutError(error))
        if not slot.parked:
            self.dispatch(slot)

    # ---- outcomes -------------------------------------------------------------------------

    def finish(self, shard: Shard, table: pa.Table, telemetry: pa.Table | None) -> None:
        if shard.shard_id in self.done:  # cannot happen by design; never write rows twice
            log.error("shard %s finished twice; keeping the first result", shard.shard_id)
            return
        self.done.add(shard.shard_id)
        self.sink(shard, table, telemetry)

    def failure(self, slot: _Slot, shard: Shard, exc: Exception) -> None:
        """A failed attempt: retry on a fresh actor, or record error rows when out of tries."""
        pair = pair_of(shard.cell)
        cause = getattr(exc, "cause", None)  # Ray's RayTaskError wraps the worker's own
        if isinstance(cause, RunnerInitError):  # without Ray's traceback of the call
            error = f"{type(cause).__name__}: {cause}"
        else:
            error = f"{type(exc).__name__}: {exc}"
        self.retire(slot)  # the actor may be dead or half-broken; never reuse it
        for waiting in reversed(self.take_back(slot)):  # queued behind it: not to blame
            self.enqueue(waiting.shard, front=True)
        if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.ObjectLostError):
            self.fit_to_cluster(slot)  # a dead process may mean a lost node
        if pair in self.broken:
            self.give_up(shard, self.broken[pair])
            return
        if isinstance(exc, RunnerInitError):
            self.init_failures[pair] += 1
            if self.init_failures[pair] > self.settings.max_retries:
                log.error("%s/%s cannot be loaded; failing its shards", pair[0].id, pair[1])
                self.broken[pair] = error
                self.give_up(shard, error)
                while pair in self.queues:
                    self.give_up(self.pop(pair), error)
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
        self.finish(shard, error_table(shard, error), None)
