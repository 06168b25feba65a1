"""Engine `ar` / `pld` against HF `generate()` on the same tiny model and prompts.

Batch size 1, greedy, same prompts for both sides; warm-up outside the timed window; the
outputs are checked token for token (a benchmark of a wrong engine would be meaningless).
Also reports overhead: wall time minus the time spent inside the target's forward (HF:
`model.forward`; the engine: `Target.prefill` and `Target.verify`, which run the model's
forward, or for text steps its embedding, layers, norm and LM head without the wrappers
around them); and the share of it spent in the processor (`Target.encode`: chat template,
image preprocessing, tokenizer; the same call for both sides), which is per prompt, not per
decoding step.

    .venv/bin/python benchmarks/bench_engine_vs_hf.py [--split ../shared/data/mmspec/testmini]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mmspec.methods.engine import Engine
from mmspec.methods.registry import get_drafter
from mmspec.models.loader import load_target
from mmspec.models.target import Target
from mmspec.orchestrator.runner import conversation
from mmspec.workloads import Sample, load_mmspec, synthetic_suite

DEFAULT_SPLIT = Path(__file__).resolve().parents[1].parent / "shared/data/mmspec/testmini"


class CallTimer:
    """Sums wall time spent inside `owner.<name>` (by default model.forward: the target's
    own compute, HF's Python inside forward included)."""

    def __init__(self, owner: object, name: str = "forward") -> None:
        self.total = 0.0
        orig = getattr(owner, name)

        # wraps keeps forward's signature: generate() inspects it to route model kwargs
        @functools.wraps(orig)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0

        setattr(owner, name, timed)  # instance attribute shadows the bound method


def _prompts(target: Target, samples: list[Sample]) -> list[tuple[list, list]]:
    out = []
    for s in samples:
        image = s.load_image()
        out.append(([conversation(s, [], image is not None)], [image]))
    return out


def _time(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    outs = fn()
    return time.perf_counter() - t0, outs


def bench_model(model_id: str, samples: list[Sample], max_new: int, repeats: int) -> list[str]:
    target = load_target(model_id)
    prompts = _prompts(target, samples)
    hf_forward = CallTimer(target.model)
    # the engine's forwards: prefill (through model.forward) and verify (the model's parts)
    prefill, verify = CallTimer(target, "prefill"), CallTimer(target, "verify")
    processor = CallTimer(target, "encode")  # both sides encode through it
    engines = {m: Engine(target, get_drafter(m)()) for m in ("ar", "pld")}

    def run_engine(method: str) -> list[list[int]]:
        return [engines[method].generate(c, i, max_new)[0].tokens for c, i in prompts]

    def run_hf(**kwargs) -> list[list[int]]:
        outs = []
        for c, i in prompts:
            p = target.encode(c, i)
            g = target.model.generate(**p.inputs, max_new_tokens=max_new, do_sample=False, **kwargs)
            outs.append(g[0, p.input_ids.shape[1] :].tolist())
        return outs

    cases = {
        "engine ar": lambda: run_engine("ar"),
        "HF generate": run_hf,
        "engine pld": lambda: run_engine("pld"),
        "HF prompt lookup": lambda: run_hf(prompt_lookup_num_tokens=10, max_matching_ngram_size=4),
    }
    failed: dict[str, str] = {}
    for name, fn in list(cases.items()):  # warm-up: allocator, kernels, lazy imports
        try:
            fn()
        except Exception as exc:  # a peer that cannot run this model is reported, not hidden
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            del cases[name]
    best: dict[str, tuple[float, float, float, int]] = {}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for name, fn in cases.items():
            hf_forward.total = prefill.total = verify.total = processor.total = 0.0
            wall, outs = _time(fn)
            forward = (
                prefill.total + verify.total if name.startswith("engine") else hf_forward.total
            )
            if name not in best or wall < best[name][0]:
                best[name] = (wall, forward, processor.total, sum(len(o) for o in outs))
            outputs[name] = outs
    for name, outs in outputs.items():
        # HF may stop one token later/earlier only by EOS handling; compare the common prefix
        same = all(
            o == r[: len(o)] or r == o[: len(r)] for o, r in zip(outs, outputs["HF generate"])
        )
        assert same, f"{model_id}: {name} output differs from HF greedy"
    lines = []
    for name, (wall, fwd, proc, toks) in best.items():
        lines.append(
            f"| {model_id} | {name} | {toks} | {wall:.2f} | {toks / wall:.1f} | "
            f"{(wall - fwd) / wall:.1%} | {proc / wall:.1%} | {(wall - fwd - proc) / wall:.1%} |"
        )
    lines += [f"| {model_id} | {name} | failed: {why} | | | | | |" for name, why in failed.items()]
    ar_tps = best["engine ar"][3] / best["engine ar"][0]
    hf_tps = best["HF generate"][3] / best["HF generate"][0]
    pld_speed = best["engine ar"][0] / best["engine pld"][0]
    hf_pld = "failed"
    if "HF prompt lookup" in best:
        hf_pld = f"{best['HF generate'][0] / best['HF prompt lookup'][0]:.2f}x"
    lines.append(
        f"| {model_id} | **ratios** | engine ar / HF tokens/s = **{ar_tps / hf_tps:.2f}x**; "
        f"pld speedup: engine {pld_speed:.2f}x, HF prompt lookup {hf_pld} | | | | | |"
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default=str(DEFAULT_SPLIT), help="MMSpec split folder")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is kept")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = Path(args.split)
    if (split / "mmspec.jsonl").is_file():
        samples, source = load_mmspec(split), f"MMSpec {split.name} (first turns)"
    else:
        samples, source = synthetic_suite(per_topic=10), "synthetic suite"
    print(f"# {source}, {len(samples)} prompts, bs 1, greedy, max_new_tokens {args.max_new_tokens}")
    print(
        f"# {platform.processor() or platform.machine()}, torch threads {args.threads}, "
        f"cpu count {os.cpu_count()}, torch {torch.__version__}"
    )
    print(
        "| model | decoder | tokens | wall s | tokens/s | overhead (wall - forward) "
        "| processor | overhead - processor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model_id in ("tiny-qwen2.5-vl", "tiny-llava"):
        for line in bench_model(model_id, samples, args.max_new_tokens, args.repeats):
            print(line, flush=True)


if __name__ == "__main__":
    main()
