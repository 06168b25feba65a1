"""Continuous batching (issue 19): `ar`'s system throughput against concurrency, and what a
row joining a running batch costs.

1. Throughput. MMSpec testmini first turns as one request stream served by `Engine.serve` at
   concurrency 1 and at 4: a closed loop of that many clients (as the continuous scenario
   runs it, and serving benchmarks' fixed concurrency: each client sends its next request
   when its previous one finished); system throughput = output tokens / stream wall time.
   Rounds alternate the two concurrencies, so drift in the machine's load hits both alike;
   the ratio of the medians is reported. Every output is checked against concurrency 1
   (greedy: joins must not change a token). For context, each round also runs the same
   requests in static batches of 1 and 4 (`generate`). Where each stream's wall went is
   printed: the share the engine spent admitting requests (prefill and join; the encoding
   too where it ran in line, with nothing decoding beside it) and decoding, with a decode
   step's mean cost by the rows it ran (steps beside the frontend's encoding, mostly those
   with a slot free, share the interpreter with it); the ceiling admission leaves: the
   speedup at concurrency 4 if its decoding cost nothing; and, as a bound on what the
   frontend could still win, concurrency 4 with every prompt encoded before the clock,
   against concurrency 1 as measured (which pays its encoding: a closed loop of one has
   nothing to overlap it with).
2. Join cost. In the concurrency-4 streams, each admission of one request into a running
   batch is timed, the engine's part: its prefill forward, first token, the drafter's `join`,
   the merge into the running cache (its encoding ran on the frontend thread beside the
   decoding rows). Reported: the median over joins of each join against the prefill forward
   inside it (what joining adds to the one forward it must run), and against the same
   request's prefill forward on a fresh cache alone right after its stream (`Target.prefill`,
   prompt encoded before the clock; this one also carries how much slower a forward runs
   inside a busy stream: between decode steps, beside the frontend thread).

One warm-up stream per model outside every timed window; one torch thread for the engine. On
a GPU (`--device cuda`) the device is synchronised before every clock read (the engine's own
steps already do), so queued work is charged where it ran.

At a real model's size. `--random-7b real` serves random-weight Qwen2.5-VL-7B and LLaVA-1.5-7B
instead of the tiny zoo (gpu_evidence.py's builders: real configs, the same classes, EOS off;
bf16 on a GPU), and `--lengths reference` caps each request at the length the MMSpec
authors' LLaVA-1.5-7B answered its sample with (their baseline answer file; median 45 tokens
on testmini, one of 1024): the throughput a 7B target's step costs and answer lengths give,
which the tiny models' cannot tell. Random weights have no meaning to keep, so the outputs at
both concurrencies are counted equal or not rather than asserted (in bf16 a batch of 4 may
round a near-tie differently from a batch of 1). `reduced` (2 + 2 layers, real widths) and
`smoke` (toy widths) run the same code on a CPU. On a lent H100, within its budget:

    .venv/bin/python benchmarks/bench_serving.py --device cuda --random-7b real \
        --lengths reference --rounds 1 --no-static

(all 60 first turns: the 1024-token answer is among the first 30, and with fewer requests
its tail would hold most of the concurrency-4 stream).

    .venv/bin/python benchmarks/bench_serving.py [--rounds 3] [--limit 60] [--max-new-tokens 64]
        [--device cuda] [--models tiny-llava] [--split ../shared/data/mmspec/testmini]
        [--random-7b real|reduced|smoke] [--dtype bfloat16] [--lengths model|reference]
        [--reference FILE] [--no-static]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Iterator

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
# the MMSpec authors' LLaVA-1.5-7B answers to testmini, plain decoding (never committed)
REFERENCE = (
    "../shared/data/mmspec-reference-results/LLaVA-1.5-7B/mmspec_testmini/"
    "baseline-temperature-0.jsonl"
)


class Stream:
    """A closed loop of `clients` clients over `requests`: each is sent (arrives) when a client
    is free, in order; results kept by request id."""

    def __init__(self, requests: list[Request], clients: int) -> None:
        self.unsent = list(requests)
        self.free = clients
        self.results: dict[int, Generation] = {}

    def arrivals(self, now_s: float) -> list[Request]:
        sent, self.unsent = self.unsent[: self.free], self.unsent[self.free :]
        self.free -= len(sent)
        return [dataclasses.replace(r, arrival_s=now_s) for r in sent]

    def next_arrival_s(self) -> float | None:
        return 0.0 if self.unsent and self.free else None

    def finished(self, request, result, error, now_s) -> None:
        if error is not None:
            raise RuntimeError(f"request {request.id} failed: {error}")
        self.results[request.id] = result
        self.free += 1


class TimedEngine(Engine):
    """Times each admission of one request into a running batch, the engine's part: `_admit`
    (taking the frontend's prompt, prefill, first token) through `_join`, and the prefill
    forward inside it; and each decode step, by the rows it ran."""

    def __init__(self, target: Target) -> None:
        super().__init__(target, get_drafter("ar")())
        self.steps: dict[int, list[float]] = {}  # rows in a step -> seconds of each such step
        # (join, its own prefill forward, the request), seconds
        self.joins: list[tuple[float, float, Request]] = []
        self.admit_s = 0.0  # seconds spent admitting (prefill, join; encoding done in line)
        self._group: list[Request] = []
        self._t0 = 0.0
        self._forward_s = 0.0  # the latest prefill forward
        prefill = target.prefill

        def timed_prefill(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            out = prefill(*args, **kwargs)
            self._sync()
            self._forward_s = time.perf_counter() - t0
            return out

        target.prefill = timed_prefill  # this benchmark's own target: nothing else uses it

    def _admit(self, group, *args, **kwargs):
        self._sync()
        self._group, self._t0 = group, time.perf_counter()
        live = super()._admit(group, *args, **kwargs)
        if live is None or not live.rows:
            self._sync()
            self.admit_s += time.perf_counter() - self._t0
        return live

    def _step(self, live, *args, **kwargs):
        rows, t0 = len(live.rows), time.perf_counter()  # the previous step ended synced
        done = super()._step(live, *args, **kwargs)
        self.steps.setdefault(rows, []).append(time.perf_counter() - t0)
        return done

    def _join(self, live, new, temperature):
        merged = super()._join(live, new, temperature)
        self._sync()
        took = time.perf_counter() - self._t0
        self.admit_s += took
        if live is not None and len(self._group) == 1:  # a real join, of one row
            self.joins.append((took, self._forward_s, self._group[0]))
        return merged


def prefill_alone(engine: Engine, request: Request) -> float:
    """Seconds of one request's prefill forward on a fresh cache (encoded before the clock)."""
    target = engine.target
    prompt = target.encode([request.messages], [request.image])
    engine._sync()
    t0 = time.perf_counter()
    target.prefill(prompt, DynamicCache(config=target.model.config))
    engine._sync()
    return time.perf_counter() - t0


@dataclasses.dataclass
class Served:
    """One stream: tokens/s, the share of its wall spent admitting requests and decoding,
    the mean seconds of a decode step by the rows it ran, and the outputs."""

    rate: float
    admitting: float
    decoding: float
    step_s: dict[int, float]
    outputs: dict[int, list[int]]


def serve(engine: TimedEngine, requests: list[Request], concurrency: int, max_new: int) -> Served:
    stream = Stream(requests, concurrency)
    engine.admit_s, engine.steps = 0.0, {}
    wall = engine.serve(stream, concurrency, max_new)
    tokens = sum(len(r.tokens) for r in stream.results.values())
    return Served(
        tokens / wall,
        engine.admit_s / wall,
        sum(map(sum, engine.steps.values())) / wall,
        {rows: statistics.mean(v) for rows, v in sorted(engine.steps.items())},
        {k: r.tokens for k, r in stream.results.items()},
    )


def breakdown(runs: list[Served]) -> str:
    """Medians over rounds: where a stream's wall went, and a decode step's cost by rows."""
    steps = sorted({rows for run in runs for rows in run.step_s})
    by_rows = ", ".join(
        f"{rows}: {statistics.median(r.step_s[rows] for r in runs if rows in r.step_s) * 1e3:.2f}"
        for rows in steps
    )
    return (
        f"admitting {statistics.median(r.admitting for r in runs):.0%} of the wall, decoding "
        f"{statistics.median(r.decoding for r in runs):.0%} (ms a step by rows {by_rows})"
    )


def free_encoding(
    engine: TimedEngine, requests: list[Request], concurrency: int, max_new: int
) -> Served:
    """The stream at `concurrency` with every prompt encoded before the clock (the engine's
    encoders hand them out): the most a frontend that cost nothing could give."""
    made = {id(r.messages): engine.target.encode([r.messages], [r.image]) for r in requests}

    def encode(conversations, images, max_new_tokens=None):
        return made[id(conversations[0])]

    encoders = (engine.target, engine._twin)  # in line, beside the decoding rows
    for t in encoders:
        t.encode = encode
    joins = len(engine.joins)
    try:
        return serve(engine, requests, concurrency, max_new)
    finally:
        for t in encoders:
            del t.encode
        del engine.joins[joins:]  # the join cost is measured on the real streams


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


def reference_lengths(path: str, ids: list[str]) -> list[int]:
    """Each sample's first-turn answer length in the authors' answer file, by question id."""
    lengths: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                lengths[row["question_id"]] = int(row["choices"][0]["new_tokens"][0])
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise SystemExit(f"{path}:{n}: not an MMSpec answer row ({exc!r})") from None
    missing = [i for i in ids if i not in lengths]
    if missing:
        raise SystemExit(f"{path}: no answer for samples {', '.join(missing[:5])}")
    return [lengths[i] for i in ids]


def targets(args: argparse.Namespace) -> Iterator[tuple[str, Target]]:
    """(name, target) per model, one at a time: the tiny zoo, or random-weight 7B ones."""
    if args.random_7b is None:
        for m in args.models.split(","):
            yield m, load_target(m, device=args.device)
        return
    import gpu_evidence  # this folder's: its model builders

    scale = {
        "real": gpu_evidence.Scale("real", None, None),
        "reduced": gpu_evidence.Scale("reduced", 2, 2),
        "smoke": gpu_evidence.Scale("smoke", 2, 2, toy_width=True),
    }[args.random_7b]
    device = torch.device(args.device)
    default = "bfloat16" if device.type == "cuda" else "float32"
    dtype = gpu_evidence.DTYPES[args.dtype or default]
    keys = (
        list(gpu_evidence.BUILDERS) if args.models == ",".join(MODELS) else args.models.split(",")
    )
    unknown = [k for k in keys if k not in gpu_evidence.BUILDERS]
    if unknown:
        raise SystemExit(
            f"--random-7b models are {', '.join(gpu_evidence.BUILDERS)}, not {unknown}"
        )
    for key in keys:
        label, build = gpu_evidence.BUILDERS[key]
        yield f"random {label}, {scale.describe()}, {dtype}", build(scale, dtype, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated (with --random-7b: qwen, llava; default both)",
    )
    ap.add_argument("--split", default=TESTMINI, help="an MMSpec split folder")
    ap.add_argument(
        "--random-7b",
        choices=("real", "reduced", "smoke"),
        help="serve random-weight 7B targets (gpu_evidence.py) instead of --models",
    )
    ap.add_argument("--dtype", help="of --random-7b (default: bfloat16 on a GPU, else float32)")
    ap.add_argument(
        "--lengths",
        choices=("model", "reference"),
        default="model",
        help="answer caps: --max-new-tokens for all, or each sample's in --reference",
    )
    ap.add_argument("--reference", default=REFERENCE, help="an MMSpec answer file (jsonl)")
    ap.add_argument(
        "--static",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run static batches (not with --lengths reference: generate has one cap)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    caps_text = (
        "answers capped at each sample's reference length"
        if args.lengths == "reference"
        else f"max_new_tokens {args.max_new_tokens}"
    )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{where}, 1 thread; testmini first turns: {args.limit}, "
        f"{caps_text}, rounds {args.rounds}\n"
    )
    samples = load_mmspec(args.split)[: args.limit]
    caps: list[int | None] = [None] * len(samples)
    if args.lengths == "reference":
        caps = list(reference_lengths(args.reference, [s.id for s in samples]))
        print(f"reference lengths: median {statistics.median(caps)}, max {max(caps)} tokens\n")
    run_static = args.static and args.lengths == "model"
    for model, target in targets(args):
        requests = [
            Request(k, conversation(s, [], True), s.load_image(), 0.0, max_new_tokens=cap)
            for k, (s, cap) in enumerate(zip(samples, caps))
        ]
        engine = TimedEngine(target)
        warm = [dataclasses.replace(r, max_new_tokens=None) for r in requests[:4]]
        serve(engine, warm, args.concurrency, 8)  # warm-up
        engine.joins.clear()
        c = args.concurrency
        runs: dict[int, list[Served]] = {1: [], c: []}
        batches: dict[int, list[float]] = {1: [], c: []}
        # (join, its own prefill forward, the same request's prefill forward alone)
        joins: list[tuple[float, float, float]] = []
        free: list[Served] = []  # concurrency c, encoding free
        for _ in range(args.rounds):
            free.append(free_encoding(engine, requests, c, args.max_new_tokens))
            for k in runs:
                runs[k].append(serve(engine, requests, k, args.max_new_tokens))
                # each round's joins against their prefills alone right after the stream, so
                # the machine's drift over the rounds hits both sides of the ratio alike
                joins += [(s, f, prefill_alone(engine, r)) for s, f, r in engine.joins]
                engine.joins.clear()
                if run_static:
                    batches[k].append(static(engine, requests, k, args.max_new_tokens))
        outputs = {k: v[-1].outputs for k, v in runs.items()}
        same = sum(outputs[1][i] == outputs[c].get(i) for i in outputs[1])
        if args.random_7b is None:
            assert same == len(outputs[1]), f"{model}: joins changed an output"
        med = {k: statistics.median(r.rate for r in v) for k, v in runs.items()}
        print(f"## {model}")
        tokens = sum(map(len, outputs[1].values()))
        print(f"{tokens} output tokens, {tokens / len(requests):.1f} per request")
        for k, v in runs.items():
            print(
                f"concurrency {k}: tokens/s per round {', '.join(f'{r.rate:.0f}' for r in v)}"
                + (
                    f"; static batches of {k}: {statistics.median(batches[k]):.0f} tokens/s"
                    if batches[k]
                    else ""
                )
                + f"\n  {breakdown(v)}"
            )
        print(
            f"throughput concurrency {c} / 1: {med[c] / med[1]:.2f}x (medians {med[c]:.0f} / "
            f"{med[1]:.0f} tokens/s); outputs equal at both: {same}/{len(outputs[1])}"
        )
        # admission does not batch (each row arrives alone once the stream runs): even free
        # decoding at concurrency c would leave the engine's admissions' time
        # seconds per output token: the whole wall at concurrency 1, admission alone at c
        admit_per_token = statistics.median(r.admitting for r in runs[c]) / med[c]
        print(f"ceiling with free decoding at {c}: {(1 / med[1]) / admit_per_token:.2f}x")
        print(
            f"concurrency {c} with encoding free (prompts made before the clock): tokens/s per "
            f"round {', '.join(f'{r.rate:.0f}' for r in free)}; / concurrency 1: "
            f"{statistics.median(r.rate for r in free) / med[1]:.2f}x\n  {breakdown(free)}"
        )
        if not joins:  # a short stream may end before any row joins a running batch
            print("join of one row: no request joined a running batch\n")
            continue
        join_med = statistics.median(s for s, _, _ in joins)
        own_med = statistics.median(s / f for s, f, _ in joins)
        alone_med = statistics.median(p for _, _, p in joins)
        forward_med = statistics.median(f for _, f, _ in joins)
        print(
            f"join of one row: median {join_med * 1e3:.2f} ms over {len(joins)} joins; each "
            f"against its own prefill forward (median {forward_med * 1e3:.2f} ms): median "
            f"ratio {own_med:.3f}; against the same forward alone after the stream (median "
            f"{alone_med * 1e3:.2f} ms): {join_med / alone_med:.2f}\n"
        )


if __name__ == "__main__":
    main()
