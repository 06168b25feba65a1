"""ShardRunner: one loaded model + one drafter; turns a shard into result rows."""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import platform
import resource
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from PIL import Image
from transformers.utils import logging as hf_logging

from mmspec.methods.engine import Engine, Generation, Request
from mmspec.methods.registry import get_drafter
from mmspec.methods.verify_cost import DEFAULT_T_VALUES, VerifyCost, measure_verify_costs
from mmspec.models.loader import load_target
from mmspec.models.target import ContextLengthError, Message
from mmspec.orchestrator.arrivals import arrival_times
from mmspec.orchestrator.oom import (
    generate_unless_oom,
    halves,
    reduced_batch_note,
    release_memory,
)
from mmspec.orchestrator.shard_rows import base_row
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.telemetry import (
    DEFAULT_HZ,
    Sampler,
    WindowStats,
    make_sampler,
    shard_table,
)
from mmspec.results.cells import POISSON, Cell, ModelConfig
from mmspec.results.schema import ResultRow
from mmspec.workloads.sample import Sample, SampleError

log = logging.getLogger(__name__)


def conversation(sample: Sample, answers: list[str], has_image: bool) -> list[Message]:
    """Chat messages for the next turn: the image goes with the first user turn only."""
    messages: list[Message] = []
    for t, text in enumerate(sample.turns[: len(answers) + 1]):
        content: list[dict[str, str]] = [{"type": "image"}] if t == 0 and has_image else []
        content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
        if t < len(answers):
            messages.append(
                {"role": "assistant", "content": [{"type": "text", "text": answers[t]}]}
            )
    return messages


def probe_prompt() -> tuple[list[Message], Image.Image]:
    """The fixed prompt of the warm-up and of t(T): a grey image and a word, so every worker
    measures over the same cached context whatever its shards hold."""
    image = Image.new("RGB", (224, 224), (128, 128, 128))
    turn: list[Message] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}
    ]
    return turn, image


def row_seed(seed: int, repeat: int, sample_id: str, turn: int) -> int:
    """Per-(sample, turn) sampling seed: independent of batch composition, so runs reproduce."""
    digest = hashlib.sha256(f"{seed}/{repeat}/{sample_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tokens_sha256(tokens: list[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()


@dataclass
class _Conversation:
    sample: Sample
    image: Image.Image | None
    answers: list[str] = field(default_factory=list)


Key = tuple[str, int]  # (sample_id, turn)


@dataclass
class _Outcome:
    """How one (sample, turn) of a stream ended."""

    result: Generation | None = None
    error: str | None = None


class StreamSource:
    """The RequestSource of a serving shard (methods/engine.py): each conversation's first turn
    arrives at its given time; a finished turn queues the conversation's next one, arriving when
    it finished; a failed turn fails every later turn of its conversation.

    With `clients` (a closed loop, as a serving benchmark at fixed concurrency runs it), at
    most that many conversations are in flight: a first turn is sent no earlier than its
    given time and only once a client is free - when another conversation's last turn ended -
    and it arrives then (its latencies count from being sent, not from the stream's start).
    Without, the loop is open: every first turn arrives at its time (Poisson arrivals).

    `outcomes` holds every (sample, turn) that ended, in the order they ended.
    """

    def __init__(
        self,
        convs: Sequence[_Conversation],
        first_arrivals: Sequence[float],
        seed: Callable[[Sample, int], int],
        decode: Callable[[list[int]], str],
        clients: int | None = None,
    ) -> None:
        self._seed = seed  # the sampling seed of (sample, turn)
        self._decode = decode  # a finished turn's tokens -> the answer later turns quote
        self._heap: list[tuple[float, int]] = []  # (arrival_s, request id), not yet returned
        self._requests: dict[int, Request] = {}
        self._turn_of: dict[int, tuple[_Conversation, int]] = {}
        self.outcomes: dict[Key, _Outcome] = {}
        self._next_id = 0  # request ids are unique in the stream: the drafter's row ids
        if clients is not None and clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        self._clients = clients
        self._in_flight = 0  # conversations sent whose last turn has not ended (closed loop)
        # first turns not sent yet, by given arrival (closed loop); the open loop queues all
        self._unsent: deque[tuple[float, _Conversation]] = deque()
        pairs = list(zip(first_arrivals, convs, strict=True))
        if clients is None:
            for arrival, conv in pairs:
                self._queue(conv, 0, arrival)
        else:  # sent in order of their times (the shard's order among equal ones)
            self._unsent.extend(sorted(pairs, key=lambda p: p[0]))

    def arrivals(self, now_s: float) -> list[Request]:
        self._send(now_s)
        arrived = []
        while self._heap and self._heap[0][0] <= now_s:
            arrived.append(self._requests.pop(heapq.heappop(self._heap)[1]))
        return arrived

    def next_arrival_s(self) -> float | None:
        times = [self._heap[0][0]] if self._heap else []
        if self._sendable():
            times.append(self._unsent[0][0])
        return min(times, default=None)

    def finished(
        self, request: Request, result: Generation | None, error: str | None, now_s: float
    ) -> None:
        conv, turn = self._turn_of.pop(request.id)
        if result is None:
            failed = error or "the engine returned no result"
            for t in _turns(conv.sample)[turn:]:
                self.outcomes[(conv.sample.id, t)] = _Outcome(error=failed)
        else:
            self.outcomes[(conv.sample.id, turn)] = _Outcome(result=result)
            if turn + 1 < len(conv.sample.turns):
                # only a turn with a successor is decoded here, inside the stream's time
                conv.answers.append(self._decode(result.tokens))
                self._queue(conv, turn + 1, now_s)
                return
        self._in_flight -= 1  # its conversation is over: its client sends the next one now
        self._send(now_s)

    def _sendable(self) -> bool:
        """A first turn is unsent and a client is free (an open loop has nothing unsent)."""
        return bool(self._unsent) and self._in_flight < (self._clients or 0)

    def _send(self, now_s: float) -> None:
        """Closed loop: free clients send the next first turns due by `now_s`."""
        while self._sendable() and self._unsent[0][0] <= now_s:
            arrival, conv = self._unsent.popleft()
            self._in_flight += 1
            self._queue(conv, 0, max(arrival, now_s))

    def _queue(self, conv: _Conversation, turn: int, arrival_s: float) -> None:
        request = Request(
            id=self._next_id,
            messages=conversation(conv.sample, conv.answers, conv.image is not None),
            image=conv.image,
            arrival_s=arrival_s,
            seed=self._seed(conv.sample, turn),
        )
        self._next_id += 1
        self._requests[request.id] = request
        self._turn_of[request.id] = (conv, turn)
        heapq.heappush(self._heap, (arrival_s, request.id))


class ShardRunner:
    """Loads the target and drafter once; `run` may be called for many shards of that pair.

    Every (sample, turn) of the shard yields exactly one row; a sample that fails (bad image,
    generation error) yields error rows and never raises. A static cell's shard runs in batches
    of its batch size (`Engine.generate`); a serving cell's is one request stream through
    `Engine.serve` (`_run_stream`).

    A telemetry sampler (NVML on a GPU, the host otherwise) runs from construction to `close()`;
    after each `run`, `last_telemetry` holds the shard's time series (SHARD_TELEMETRY_SCHEMA)
    and `last_stats` its energy, mean/peak power and peak memory.

    The first shard at each batch size first measures the target's verification cost t(T) at
    that batch size for `verify_t` (methods/verify_cost.py; empty: not measured), outside the
    shard's timed and telemetry windows; every row of that batch size then carries it.
    """

    def __init__(
        self,
        model: ModelConfig,
        method: str,
        method_args: dict[str, Any],
        device: str = "auto",
        threads: int | None = None,
        telemetry_hz: float = DEFAULT_HZ,
        verify_t: Sequence[int] = DEFAULT_T_VALUES,
    ) -> None:
        hf_logging.disable_progress_bar()  # per-worker bars would interleave in the driver log
        hf_logging.set_verbosity_error()
        if threads:
            # one thread per CPU slot, or co-located workers fight over cores and time noise
            torch.set_num_threads(threads)
        self.model_config = model
        self.method = method
        self.target = load_target(
            model.id,
            model.dtype,
            device,
            model.revision,
            model.trust_remote_code,
            prompt_style=model.prompt_style,
        )
        self.engine = Engine(self.target, get_drafter(method)(**method_args))
        self._warm_up()
        self.device = self._describe_device()
        # one sampler for the runner's life: a model serves many shards, each a window of it
        self._sampler = make_sampler(self.target.device, telemetry_hz)
        self._sampler.start()
        self.last_telemetry: pa.Table | None = None  # the last shard's series, for the store
        self.last_stats: WindowStats | None = None  # the last shard's totals
        self._verify_t = tuple(verify_t)  # the T of t(T); empty: t(T) is not measured
        # t(T) per batch size, measured at its first shard; None where that failed
        self._verify_costs: dict[int, VerifyCost | None] = {}

    def _warm_up(self) -> None:
        """One short generation before any shard, outside every timed window: the first calls
        of a fresh process (kernel selection, allocator growth, lazy imports) would otherwise
        be charged to whichever cell this worker happens to run first."""
        turn, image = probe_prompt()
        self.engine.generate([turn], [image], max_new_tokens=4)

    def verify_cost(self, batch_size: int) -> VerifyCost | None:
        """t(T) at `batch_size`: measured on the first call, then kept; None when `verify_t` is
        empty or the measurement failed."""
        if batch_size not in self._verify_costs:
            self._verify_costs[batch_size] = self._measure_verify_cost(batch_size)
        return self._verify_costs[batch_size]

    def _measure_verify_cost(self, batch_size: int) -> VerifyCost | None:
        if not self._verify_t:
            return None
        turn, image = probe_prompt()
        try:
            [cost] = measure_verify_costs(self.target, turn, image, [batch_size], self._verify_t)
        except Exception:  # a calibration out of memory must not fail the shards: no t(T) then
            log.warning("t(T) at batch size %d not measured", batch_size, exc_info=True)
            release_memory(self.target.device)
            return None
        return cost

    def heartbeat(self) -> int:
        """Forward passes so far: grows while a shard makes progress (the watchdog reads it
        from another thread while `run` works)."""
        return self.engine.heartbeat

    def close(self) -> None:
        """Stop the telemetry thread; call when the runner is done (also done on collection)."""
        sampler = getattr(self, "_sampler", None)  # absent when __init__ failed early
        if sampler is not None:
            sampler.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit NVML may be gone already
            self.close()

    def run(self, shard: Shard) -> list[ResultRow]:
        """The shard's rows: static batches, or (a serving cell) one request stream."""
        self.verify_cost(shard.cell.batch_size)  # before the shard's windows open
        shard_t0 = self._sampler.mark()
        rows = self._run_stream(shard) if shard.cell.serving else self._run_batches(shard)
        self._record_telemetry(shard, shard_t0, self._sampler.mark())
        return rows

    def _run_batches(self, shard: Shard) -> list[ResultRow]:
        cell = shard.cell
        rows: list[ResultRow] = []
        batch_index = 0
        for start in range(0, len(shard.samples), cell.batch_size):
            convs: list[_Conversation] = []
            for sample in shard.samples[start : start + cell.batch_size]:
                try:
                    convs.append(_Conversation(sample, sample.load_image()))
                except SampleError as exc:
                    rows += [self._error_row(shard, sample, t, str(exc)) for t in _turns(sample)]
            turn = 0
            while convs:
                rows += self._run_turn(shard, convs, turn, batch_index)
                batch_index += 1
                turn += 1
                convs = [c for c in convs if len(c.sample.turns) > turn and c.answers]
        return rows

    def _run_stream(self, shard: Shard) -> list[ResultRow]:
        """A serving cell: the shard's samples as one request stream through `Engine.serve`,
        at most `batch_size` rows decoding together. Continuous: a closed loop of
        `batch_size` clients (a conversation's first turn is sent when a client is free, in
        the shard's order); poisson: at its arrival time (orchestrator/arrivals.py, one per
        sample of the shard in order, so a sample whose image fails leaves the others' times
        as they were). A row per (sample, turn) as static cells give, in the shard's order;
        if serve raises, the turns that finished keep their rows and the rest become error
        rows naming why."""
        cell = shard.cell
        rows: dict[Key, ResultRow] = {}
        convs: list[_Conversation] = []
        arrivals: list[float] = []
        for sample, arrival in zip(shard.samples, _first_arrivals(cell, len(shard.samples))):
            try:
                convs.append(_Conversation(sample, sample.load_image()))
                arrivals.append(arrival)
            except SampleError as exc:
                for t in _turns(sample):
                    rows[(sample.id, t)] = self._error_row(shard, sample, t, str(exc))
        source = StreamSource(
            convs,
            arrivals,
            lambda sample, turn: row_seed(cell.seed, cell.repeat, sample.id, turn),
            self.target.decode,
            clients=None if cell.scenario == POISSON else cell.batch_size,
        )
        if self.target.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.target.device)
        failure = None
        t0 = time.perf_counter()
        try:
            stream_s = self.engine.serve(
                source, cell.batch_size, cell.max_new_tokens, cell.temperature
            )
        except Exception as exc:  # an OOM mid-stream must not lose the rows already measured
            log.exception("the request stream of %s failed", shard.shard_id)
            failure = f"{type(exc).__name__}: {exc}"
            stream_s = time.perf_counter() - t0
        peak = self._peak_memory(t0)
        done = [(k, o.result) for k, o in source.outcomes.items() if o.result is not None]
        energy = split_stream_energy(self._sampler, t0, [r for _, r in done])
        by_id = {s.id: s for s in shard.samples}
        for ((sample_id, turn), res), e in zip(done, energy, strict=True):
            sample = by_id[sample_id]
            text = self.target.decode(res.tokens)
            rows[(sample_id, turn)] = self._ok_row(
                shard, sample, turn, res, text, 0, stream_s, peak, e
            )
        for (sample_id, turn), outcome in source.outcomes.items():
            if outcome.error is not None:
                rows[(sample_id, turn)] = self._error_row(
                    shard, by_id[sample_id], turn, outcome.error
                )
        unfinished = failure or "the request stream ended before this turn ran"
        return [
            rows.get((s.id, t)) or self._error_row(shard, s, t, unfinished)
            for s in shard.samples
            for t in _turns(s)
        ]

    def _record_telemetry(self, shard: Shard, t0: float, t1: float) -> None:
        self.last_stats = self._sampler.stats(t0, t1)
        series = self._sampler.table(t0, t1)
        host, uuid = self.device["host"], self.device["device_uuid"]
        self.last_telemetry = shard_table(series, shard.shard_id, shard.cell.cell_id, host, uuid)
        self._sampler.discard_before(t1)  # the series lives on in last_telemetry, not here

    def _run_turn(
        self,
        shard: Shard,
        convs: list[_Conversation],
        turn: int,
        batch_index: int,
        oom_at: int | None = None,  # the batch size that ran out of memory, on its halves
    ) -> list[ResultRow]:
        cell = shard.cell
        messages = [conversation(c.sample, c.answers, c.image is not None) for c in convs]
        images = [c.image for c in convs]
        seeds = [row_seed(cell.seed, cell.repeat, c.sample.id, turn) for c in convs]
        if self.target.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.target.device)
        t0 = time.perf_counter()
        try:
            results = generate_unless_oom(
                lambda: self.engine.generate(
                    messages, images, cell.max_new_tokens, cell.temperature, seeds
                ),
                can_split=len(convs) > 1,
            )
        except ContextLengthError as exc:  # only the rows that do not fit fail; the rest run
            err = f"{type(exc).__name__}: {exc}"
            too_long = [c for i, c in enumerate(convs) if i in exc.rows]
            rest = [c for i, c in enumerate(convs) if i not in exc.rows]
            rows = self._fail(shard, too_long, turn, err)
            return rows + (self._run_turn(shard, rest, turn, batch_index, oom_at) if rest else [])
        except Exception as exc:  # an OOM or a bad input must not lose the rest of the shard
            log.exception("batch %d of %s failed", batch_index, shard.shard_id)
            return self._fail(shard, convs, turn, f"{type(exc).__name__}: {exc}")
        if results is None:  # out of memory: run each half on its own (see oom.py)
            release_memory(self.target.device)
            failed = oom_at or len(convs)
            return [
                row
                for half in halves(convs)
                for row in self._run_turn(shard, half, turn, batch_index, failed)
            ]
        batch_s = time.perf_counter() - t0
        peak = self._peak_memory(t0)
        energy = self._sampler.split_energy(t0, [res.total_s for res in results])
        rows = []
        for c, res, e in zip(convs, results, energy):
            text = self.target.decode(res.tokens)
            c.answers.append(text)
            rows.append(
                self._ok_row(shard, c.sample, turn, res, text, batch_index, batch_s, peak, e)
            )
        if oom_at is not None:
            for row in rows:
                row.error = reduced_batch_note(oom_at, len(convs))
        return rows

    def _fail(
        self, shard: Shard, convs: list[_Conversation], turn: int, error: str
    ) -> list[ResultRow]:
        """Error rows for this and every later turn of each conversation, which then ends."""
        rows = []
        for c in convs:
            rows += [self._error_row(shard, c.sample, t, error) for t in _turns(c.sample)[turn:]]
            c.answers.clear()  # drops the sample from later turns
        return rows

    # ---- rows ----------------------------------------------------------------------------
    def _base_row(self, shard: Shard, sample: Sample, turn: int) -> ResultRow:
        row = base_row(shard, sample, turn, **self.device)
        cost = self._verify_costs.get(shard.cell.batch_size)
        if cost is not None:
            row.verify_cost_tokens, row.verify_cost_s = list(cost.tokens), list(cost.seconds)
        return row

    def _error_row(self, shard: Shard, sample: Sample, turn: int, error: str) -> ResultRow:
        row = self._base_row(shard, sample, turn)
        row.status, row.error = "error", error
        return row

    def _ok_row(
        self,
        shard: Shard,
        sample: Sample,
        turn: int,
        res: Generation,
        text: str,
        batch_index: int,
        batch_s: float,
        peak_mem: int,
        energy_j: float | None,
    ) -> ResultRow:
        row = self._base_row(shard, sample, turn)
        row.prompt_tokens = res.prompt_tokens
        row.new_tokens = len(res.tokens)
        row.steps = res.steps
        row.skipped_steps = res.skipped_steps
        row.drafted_tokens = res.drafted
        row.accepted_tokens = res.accepted
        row.accept_lengths = res.accept_lengths
        row.prefill_s, row.draft_s, row.verify_s = res.prefill_s, res.draft_s, res.verify_s
        row.commit_s, row.total_s = res.commit_s, res.total_s
        row.arrival_s, row.queue_s = res.arrival_s, res.queue_s
        row.ttft_s, row.token_times_s = res.ttft_s, list(res.token_times_s)
        row.batch_index, row.batch_s = batch_index, batch_s
        row.output_tokens = res.tokens
        row.output_sha256 = tokens_sha256(res.tokens)
        row.output_text = text
        row.peak_mem_bytes = peak_mem
        # the row's share of its batch's energy (see Sampler.split_energy): rows that run
        # together split each stretch equally, so a batch's rows add up to its energy
        row.energy_j = energy_j
        return row

    # ---- device facts --------------------------------------------------------------------
    def _describe_device(self) -> dict[str, str | None]:
        dev = self.target.device
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            name, uuid = props.name, str(getattr(props, "uuid", "")) or None
        else:
            name, uuid = platform.processor() or platform.machine() or "cpu", None
        return {"device_name": name, "device_uuid": uuid, "host": socket.gethostname()}

    def _peak_memory(self, since: float) -> int:
        """Peak memory of the batch that started at `since` (perf_counter seconds)."""
        if self.target.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.target.device))
        # CPU: the sampled peak RSS over the batch (the whole process: a CPU worker's footprint)
        peak = self._sampler.peak_memory_bytes(since, time.perf_counter())
        if peak:
            return int(peak)
        # the process's lifetime peak resident set (KiB on Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _turns(sample: Sample) -> list[int]:
    return list(range(max(1, len(sample.turns))))


def _first_arrivals(cell: Cell, requests: int) -> list[float]:
    """When each conversation's first turn arrives, seconds after the stream starts."""
    if cell.scenario == POISSON:
        if cell.rate is None:
            raise ValueError(f"cell {cell.cell_id}: a poisson cell without a rate")
        return arrival_times(cell.arrival_seed or 0, requests, cell.rate)
    return [0.0] * requests  # continuous: each sent as soon as a client is free


def split_stream_energy(
    sampler: Sampler, t0: float, results: Sequence[Generation]
) -> list[float | None]:
    """Each finished request's share of a stream's energy; `t0` is when the stream started
    (perf_counter seconds), a request's arrival/queue/total seconds count from it.

    A request is charged from its prefill's start (arrival + queue) to its end (arrival +
    total): each stretch between two such events is split equally among the requests decoding
    in it, as `Sampler.split_energy` does for a static batch. Stretches with none decoding (an
    idle wait for the next arrival) are charged to no row. All None without a counter.
    """
    spans = [(r.arrival_s + r.queue_s, r.arrival_s + r.total_s) for r in results]
    events = sorted({t for span in spans for t in span})
    shares = [0.0] * len(spans)
    prev_t, prev_e = 0.0, 0.0
    for t in events:
        cumulative = sampler.energy_j(t0, t0 + t) if t > 0 else 0.0
        if cumulative is None:
            return [None] * len(spans)
        live = [i for i, (a, b) in enumerate(spans) if a <= prev_t and b >= t]
        for i in live:
            shares[i] += max(0.0, cumulative - prev_e) / len(live)
        prev_t, prev_e = t, cumulative
    return list(shares)
