"""ViSkip on the trained tiny zoo (issue 7): does the score separate grounded from template
tokens, and what does skipping do to each method's speed at each threshold?

1. Score separation. Teacher-forced on the eval split's reference answers (all six topics),
   the ViSkip score of every answer token is read exactly as the engine reads it: the
   `VisionProbe` inside the last layer's own attention call (SDPA everywhere else), the mass
   that the position predicting the token puts on image keys, mean over heads. Grounded tokens
   (the first token of a colour, count, word or value read off the picture; every digit of a
   number) against template tokens: both means, ROC AUC, and the share of each above every
   threshold of the sweep (what ViSkip would skip).
2. Threshold sweep, end to end. For each model and each wrapped method, greedy decoding of the
   same eval samples at batch size 1 with the method alone and with `viskip+method` at each
   threshold: skipped steps, MAT, tokens/s, and speed relative to the method alone. Every
   output is checked against plain AR decoding (ViSkip is lossless). One warm-up generation
   per engine outside the timed window; methods alternate sample by sample, so drift in the
   machine's load hits all of them alike.

    .venv/bin/python benchmarks/bench_viskip.py [--per-topic 4] [--methods pld,lookahead]

Batch sizes 1-8, latency CDFs and the latency breakdown come from a grid run with ViSkip cells
(examples/viskip.yaml), whose report has a ViSkip section.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import transformers

from mmspec.methods.engine import Engine, Generation
from mmspec.methods.registry import get_drafter
from mmspec.models.loader import load_target
from mmspec.models.target import Target
from mmspec.orchestrator.runner import conversation
from mmspec.training.grounding import answer_token_scores, pooled, roc_auc
from mmspec.workloads.synthetic import SyntheticItem, synthetic_items

MODELS = ("tiny-qwen2.5-vl", "tiny-llava")
THRESHOLDS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7)
DEFAULT_THRESHOLD = 0.35  # MMSpec's


# ---- 1. score separation --------------------------------------------------------------------


# ---- 2. threshold sweep --------------------------------------------------------------------


@dataclass
class Tally:
    """Sums over the samples one configuration decoded."""

    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0
    skipped: int = 0
    accepted: int = 0
    mismatches: int = 0

    def add(self, seconds: float, result: Generation, reference: list[int]) -> None:
        self.seconds += seconds
        self.tokens += len(result.tokens)
        self.steps += result.steps
        self.skipped += result.skipped_steps
        self.accepted += result.accepted
        self.mismatches += result.tokens != reference


def sweep(
    target: Target,
    items: Sequence[SyntheticItem],
    method: str,
    thresholds: Sequence[float],
    max_new_tokens: int,
) -> dict[str, Tally]:
    """Tallies for `ar`, `method` alone and `viskip+method` at each threshold (batch size 1)."""
    configs = {method: get_drafter(method)()}
    for t in thresholds:
        configs[f"viskip@{t:g}"] = get_drafter(f"viskip+{method}")(viskip_threshold=t)
    engines = {name: Engine(target, drafter) for name, drafter in configs.items()}
    ar = Engine(target, get_drafter("ar")())
    prompts = [([conversation(it.sample, [], True)], [it.sample.load_image()]) for it in items]
    for engine in [ar, *engines.values()]:  # warm-up, outside the window
        engine.generate(*prompts[0], max_new_tokens=max_new_tokens)
    tallies = {name: Tally() for name in ["ar", *engines]}
    for convs, images in prompts:
        start = time.perf_counter()
        [plain] = ar.generate(convs, images, max_new_tokens=max_new_tokens)
        reference = plain.tokens
        tallies["ar"].add(time.perf_counter() - start, plain, reference)
        for name, engine in engines.items():
            start = time.perf_counter()
            [result] = engine.generate(convs, images, max_new_tokens=max_new_tokens)
            tallies[name].add(time.perf_counter() - start, result, reference)
    return tallies


# ---- output -----------------------------------------------------------------------------------


def share_above(values: Sequence[float], threshold: float) -> str:
    return f"{100 * sum(v > threshold for v in values) / len(values):.0f}%"


def score_table(per_model: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = [
        "| model | grounded tokens | template tokens | mean score grounded | "
        "mean score template | ROC AUC | "
        + " | ".join(f"> {t:g}: grounded / template" for t in THRESHOLDS)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(THRESHOLDS),
    ]
    for model, s in per_model.items():
        g, t = s["grounded"], s["template"]
        above = [f"{share_above(g, x)} / {share_above(t, x)}" for x in THRESHOLDS]
        lines.append(
            f"| {model} | {len(g)} | {len(t)} | {statistics.fmean(g):.3f} | "
            f"{statistics.fmean(t):.3f} | **{roc_auc(g, t):.3f}** | " + " | ".join(above) + " |"
        )
    return lines


def sweep_table(model: str, method: str, tallies: dict[str, Tally]) -> list[str]:
    base = tallies[method]
    lines = [
        f"{model} · {method} · batch size 1:",
        "",
        "| configuration | skipped steps | MAT | tokens/s | vs method alone | outputs = AR |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, tally in tallies.items():
        rate = tally.tokens / tally.seconds
        samples = f"{(tally.mismatches == 0 and 'all') or f'{tally.mismatches} differ'}"
        lines.append(
            f"| {name} | {100 * tally.skipped / max(1, tally.steps):.1f}% | "
            f"{tally.accepted / max(1, tally.steps):.2f} | {rate:.1f} | "
            f"{rate / (base.tokens / base.seconds):.3f}× | {samples} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-topic", type=int, default=4, help="eval samples per topic")
    parser.add_argument("--score-per-topic", type=int, default=20)
    parser.add_argument("--methods", default="pld,lookahead,sam,recycling")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M")
    score_items = synthetic_items(args.score_per_topic, 0, None, "eval")
    sweep_items = synthetic_items(args.per_topic, 0, None, "eval")
    scores, out = {}, []
    for model in MODELS:
        target = load_target(model, device="cpu")
        scores[model] = pooled(answer_token_scores(target, score_items))
        for method in args.methods.split(","):
            tallies = sweep(target, sweep_items, method, THRESHOLDS, args.max_new_tokens)
            out += sweep_table(model, method, tallies)
    print(f"\n#### {started}\n")
    print(
        f"Score separation: {args.score_per_topic} eval samples per topic, teacher-forced on "
        "the references; the score is the engine's (`VisionProbe`, last layer, head mean).\n"
    )
    print("\n".join(score_table(scores)))
    print(
        f"\nThreshold sweep: {args.per_topic} eval samples per topic ({6 * args.per_topic} "
        f"prompts, first turns), greedy, max {args.max_new_tokens} new tokens, batch size 1, "
        f"{args.threads} torch threads.\n"
    )
    print("\n".join(out))
    print(
        f"Machine: {platform.machine()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}."
    )


if __name__ == "__main__":
    main()
