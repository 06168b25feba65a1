"""The in-place KV cache (`SlotCache`) against transformers' concatenating one, on long answers.

`DynamicLayer.update` concatenates: every forward copies the layer's whole cache, so a step
costs more the longer the rows' caches. `SlotLayer` appends in place. This runs the same
engine both ways - the layers' `update` switched between `SlotLayer`'s and `DynamicLayer`'s,
everything else equal (the commit's in-place gather included) - on the testmini samples
whose `ar` answers are longest (found first, at the cap), in static batches, sides
alternating per round so the host's drift hits both. Outputs must be equal both ways.

    .venv/bin/python benchmarks/bench_slot_cache.py [--rounds 2] [--rows 4]
        [--max-new-tokens 1024] [--methods ar,pld,eagle2,recycling] [--models tiny-llava]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers
from transformers.cache_utils import DynamicLayer

from mmspec.methods import kv_slots
from mmspec.methods.engine import Engine
from mmspec.methods.registry import get_drafter
from mmspec.models.loader import load_target
from mmspec.orchestrator.runner import conversation
from mmspec.workloads import load_mmspec

TESTMINI = "../shared/data/mmspec/testmini"
IN_PLACE = kv_slots.SlotLayer.update


def run(engine: Engine, convs: list, images: list, max_new: int, rows: int) -> tuple[float, list]:
    """tokens/s over static batches of `rows`, and the outputs."""
    t0, out = time.perf_counter(), []
    for i in range(0, len(convs), rows):
        out += [
            g.tokens for g in engine.generate(convs[i : i + rows], images[i : i + rows], max_new)
        ]
    return sum(map(len, out)) / (time.perf_counter() - t0), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4, help="batch size, and how many samples")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--methods", default="ar,pld,eagle2,recycling")
    ap.add_argument("--models", default="tiny-llava,tiny-qwen2.5-vl")
    ap.add_argument("--split", default=TESTMINI)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{platform.machine()}, 1 thread; max_new_tokens {args.max_new_tokens}, "
        f"rounds {args.rounds}\n"
    )
    samples = load_mmspec(args.split)
    convs = [conversation(s, [], True) for s in samples]
    images = [s.load_image() for s in samples]
    print("| model | method | output tokens | concatenating tokens/s | in place tokens/s | ratio |")
    print("|---|---|---|---|---|---|")
    try:
        for model in args.models.split(","):
            target = load_target(model)
            # the longest answers: where a cache grows long enough for its copies to matter
            _, answers = run(
                Engine(target, get_drafter("ar")()), convs, images, args.max_new_tokens, 4
            )
            longest = sorted(range(len(answers)), key=lambda i: -len(answers[i]))[: args.rows]
            picked_c, picked_i = [convs[i] for i in longest], [images[i] for i in longest]
            for method in args.methods.split(","):
                engine = Engine(target, get_drafter(method)())
                engine.generate(picked_c[:2], picked_i[:2], 8)  # warm-up
                rates: dict[str, list[float]] = {"concatenating": [], "in place": []}
                outs = {}
                for _ in range(args.rounds):
                    for side, update in (
                        ("concatenating", DynamicLayer.update),
                        ("in place", IN_PLACE),
                    ):
                        kv_slots.SlotLayer.update = update
                        rate, outs[side] = run(
                            engine, picked_c, picked_i, args.max_new_tokens, args.rows
                        )
                        rates[side].append(rate)
                assert outs["concatenating"] == outs["in place"], (
                    f"{model} {method}: outputs differ"
                )
                cat, slot = (statistics.median(rates[s]) for s in ("concatenating", "in place"))
                tokens = sum(map(len, outs["in place"]))
                ratio = slot / cat
                print(f"| {model} | {method} | {tokens} | {cat:.0f} | {slot:.0f} | {ratio:.2f}x |")
    finally:
        kv_slots.SlotLayer.update = IN_PLACE


if __name__ == "__main__":
    main()
