"""Continuous batching (issue 19): `ar`'s system throughput against concurrency, and what a
row joining a running batch costs.

1. Throughput. MMSpec testmini first turns as one request stream, all arrived at once (a
   closed loop: a new request joins whenever a row finishes), served by `Engine.serve` at
   concurrency 1 and at 4; system throughput = output tokens / stream wall time. Rounds
   alternate the two concurrencies, so drift in the machine's load hits both alike; the
   ratio of the medians is reported. Every output is checked against concurrency 1 (greedy:
   joins must not change a token). For context, each round also runs the same requests in
   static batches of 1 and 4 (`generate`). The share of each stream's wall spent admitting
   requests (encode, prefill, join) is printed, and the ceiling it leaves: the speedup at
   concurrency 4 if its decoding cost nothing (admission does not batch: once the stream runs,
   rows join one at a time as others finish).
2. Join cost. In the concurrency-4 streams, each admission of one request into a running
   batch (its encode and prefill, the drafter's `join`, the merge into the running cache) is
   timed; right after each stream, the same request's encode + prefill on a fresh cache
   alone: the ratio of the medians over all joins.

One warm-up stream per model outside every timed window; one torch thread. On a GPU
(`--device cuda`) the device is synchronised before every clock read (the engine's own steps
already do), so queued work is charged where it ran.

    .venv/bin/python benchmarks/bench_serving.py [--rounds 3] [--limit 60] [--max-new-tokens 64]
        [--device cuda] [--models tiny-llava] [--split ../shared/data/mmspec/testmini]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers
from transformers import DynamicCache

from mmspec.methods.engine import Engine, Generation, Request
from mmspec.methods.registry import get_drafter
from mmspec.models.loader import load_target
from mmspec.models.target import Target
from mmspec.orchestrator.runner import conversation
from mmspec.workloads import load_mmspec

MODELS = ("tiny-qwen2.5-vl", "tiny-llava")
TESTMINI = "../shared/data/mmspec/testmini"


class Stream:
    """All requests arrived at time 0; results kept by request id."""

    def __init__(self, requests: list[Request]) -> None:
        self.pending = list(requests)
        self.results: dict[int, Generation] = {}

    def arrivals(self, now_s: float) -> list[Request]:
        out, self.pending = self.pending, []
        return out

    def next_arrival_s(self) -> float | None:
        return None

    def finished(self, request, result, error, now_s) -> None:
        if error is not None:
            raise RuntimeError(f"request {request.id} failed: {error}")
        self.results[request.id] = result


class TimedEngine(Engine):
    """Times each admission of one request: `_admit` (encode + prefill) through `_join`."""

    def __init__(self, target: Target) -> None:
        super().__init__(target, get_drafter("ar")())
        self.joins: list[tuple[float, Request]] = []
        self.admit_s = 0.0  # seconds spent admitting (encode, prefill, join, merge)
        self._group: list[Request] = []
        self._t0 = 0.0

    def _admit(self, group, *args, **kwargs):
        self._sync()
        self._group, self._t0 = group, time.perf_counter()
        live = super()._admit(group, *args, **kwargs)
        if live is None or not live.rows:
            self._sync()
            self.admit_s += time.perf_counter() - self._t0
        return live

    def _join(self, live, new, temperature):
        merged = super()._join(live, new, temperature)
        self._sync()
        took = time.perf_counter() - self._t0
        self.admit_s += took
        if live is not None and len(self._group) == 1:  # a real join, of one row
            self.joins.append((took, self._group[0]))
        return merged


def prefill_alone(engine: Engine, request: Request) -> float:
    """Seconds of encode + prefill of one request on a fresh cache."""
    target = engine.target
    engine._sync()
    t0 = time.perf_counter()
    prompt = target.encode([request.messages], [request.image])
    target.prefill(prompt, DynamicCache(config=target.model.config))
    engine._sync()
    return time.perf_counter() - t0


def serve(engine: TimedEngine, requests: list[Request], concurrency: int, max_new: int):
    """tokens/s, the share of the wall spent admitting requests, and the outputs."""
    stream = Stream(requests)
    engine.admit_s = 0.0
    wall = engine.serve(stream, concurrency, max_new)
    tokens = sum(len(r.tokens) for r in stream.results.values())
    return tokens / wall, engine.admit_s / wall, {k: r.tokens for k, r in stream.results.items()}


def static(engine: Engine, requests: list[Request], batch_size: int, max_new: int) -> float:
    """tokens/s of the same requests in static batches (`generate`): none join until all of a
    batch have left."""
    engine._sync()
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        out = engine.generate([r.messages for r in batch], [r.image for r in batch], max_new)
        tokens += sum(len(g.tokens) for g in out)
    engine._sync()
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    ap.add_argument("--split", default=TESTMINI, help="an MMSpec split folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{where}, 1 thread; testmini first turns: {args.limit}, "
        f"max_new_tokens {args.max_new_tokens}, rounds {args.rounds}\n"
    )
    samples = load_mmspec(args.split)[: args.limit]
    for model in args.models.split(","):
        target = load_target(model, device=args.device)
        requests = [
            Request(k, conversation(s, [], True), s.load_image(), 0.0)
            for k, s in enumerate(samples)
        ]
        engine = TimedEngine(target)
        serve(engine, requests[:4], args.concurrency, 8)  # warm-up
        engine.joins.clear()
        rates: dict[int, list[float]] = {1: [], args.concurrency: []}
        admitting: dict[int, list[float]] = {1: [], args.concurrency: []}
        batches: dict[int, list[float]] = {1: [], args.concurrency: []}
        outputs: dict[int, dict[int, list[int]]] = {}
        joins: list[tuple[float, float]] = []  # (join, the same request's prefill alone)
        for _ in range(args.rounds):
            for c in rates:
                rate, share, outputs[c] = serve(engine, requests, c, args.max_new_tokens)
                rates[c].append(rate)
                admitting[c].append(share)
                # each round's joins against their prefills alone right after the stream, so
                # the machine's drift over the rounds hits both sides of the ratio alike
                joins += [(s, prefill_alone(engine, r)) for s, r in engine.joins]
                engine.joins.clear()
                batches[c].append(static(engine, requests, c, args.max_new_tokens))
        assert outputs[1] == outputs[args.concurrency], f"{model}: joins changed an output"
        join_med = statistics.median(s for s, _ in joins)
        alone_med = statistics.median(p for _, p in joins)
        med = {c: statistics.median(v) for c, v in rates.items()}
        print(f"## {model}")
        tokens = sum(map(len, outputs[1].values()))
        print(f"{tokens} output tokens, {tokens / len(requests):.1f} per request")
        for c, v in rates.items():
            print(
                f"concurrency {c}: tokens/s per round {', '.join(f'{x:.0f}' for x in v)}; "
                f"admitting (encode, prefill, join) {statistics.median(admitting[c]):.0%} "
                f"of the wall; static batches of {c}: {statistics.median(batches[c]):.0f} tokens/s"
            )
        print(
            f"throughput concurrency {args.concurrency} / 1: "
            f"{med[args.concurrency] / med[1]:.2f}x (medians {med[args.concurrency]:.0f} / "
            f"{med[1]:.0f} tokens/s); outputs equal at both: yes"
        )
        c = args.concurrency
        # admission does not batch (each row arrives alone once the stream runs): even free
        # decoding at concurrency c would leave the admissions' time
        # seconds per output token: the whole wall at concurrency 1, admission alone at c
        admit_per_token = statistics.median(admitting[c]) / med[c]
        print(f"ceiling with free decoding at {c}: {(1 / med[1]) / admit_per_token:.2f}x")
        print(
            f"join of one row: median {join_med * 1e3:.1f} ms over {len(joins)} joins; its "
            f"prefill alone {alone_med * 1e3:.1f} ms; ratio {join_med / alone_med:.2f}\n"
        )


if __name__ == "__main__":
    main()
