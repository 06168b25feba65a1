"""Trained draft heads on the tiny zoo (issue 6): MAT per topic, and where the drafts land.

For each tiny target and method, greedy decoding (batch size 1) of the synthetic suite's eval
split - the heads were trained on the target's own answers to the disjoint training split:

1. MAT per topic, as the report defines it (MMSpec's acceptance length): accepted draft
   tokens per verification step, the bonus token excluded (add 1 for Spec-Bench's tokens per
   step), pooled over the topic's samples and turns; every output is checked against AR.
2. Where the drafts land: on first-turn answers that equal the reference exactly (so each
   token's role is known from the scene), the share of grounded tokens (the first token of a
   colour, count, word or value read off the picture; every digit of a number) and of template
   tokens that arrived as accepted drafts rather than as the target's own bonus token. A
   vision-aware head should win on the grounded ones - the paper's claim, checked directly.

    .venv/bin/python benchmarks/bench_drafters.py [--per-topic 10] [--methods eagle2,vispec]
        [--tree 5,10,59]   # one depth,top_k,total_token for every dynamic-tree method

Each method runs with its defaults (MMSpec's: EAGLE-2/3 and ViSpec depth 3, top_k 8,
total_token 30, EAGLE-2 with its confidence threshold 0.3; MSD 5, 10, 59) unless `--tree`
sets one tree for all dynamic-tree methods (EAGLE-2's threshold off): the like-for-like
comparison of the heads themselves.

Timings are not measured here: the grid's report has speedups, latency CDFs and the
draft/verify breakdown (examples/drafters.yaml).
"""

from __future__ import annotations

import argparse
import collections
import platform
from collections.abc import Sequence

import torch
import transformers

from mmspec.methods.engine import Engine, Generation
from mmspec.methods.registry import get_drafter
from mmspec.models.loader import load_target
from mmspec.models.target import Target
from mmspec.orchestrator.runner import conversation
from mmspec.training.encoding import GROUNDED, TEMPLATE, answer_token_spans, token_kind
from mmspec.workloads.sample import TOPICS
from mmspec.workloads.synthetic import SyntheticItem, synthetic_items

MODELS = ("tiny-qwen2.5-vl", "tiny-llava")
METHODS = ("pld", "sam", "lookahead", "recycling", "medusa", "eagle", "eagle2", "eagle3",
           "vispec", "msd")  # fmt: skip


def drafted_flags(result: Generation) -> list[bool]:
    """Per output token: did it arrive as an accepted draft (not prefill's, not a bonus)?"""
    flags = [False]  # the first token comes from prefill
    for accepted in result.accept_lengths:
        flags += [True] * accepted + [False]
    return flags[: len(result.tokens)]


def token_roles(target: Target, item: SyntheticItem, tokens: list[int]) -> list[int] | None:
    """GROUNDED / TEMPLATE / other per token of a first-turn answer equal to the reference."""
    answer = item.scene.references[0]
    body = [t for t in tokens if t not in target.eos_token_ids]
    if target.decode(body).strip() != answer:
        return None
    try:
        spans = answer_token_spans(target, answer, body)
    except ValueError:
        return None
    grounded = item.scene.grounded[0] if item.scene.grounded else ()
    return [token_kind(s, target.tokenizer.decode([t]), grounded) for s, t in zip(spans, body)]


DYNAMIC_TREE = ("eagle", "eagle2", "eagle3", "vispec", "msd")


def run(
    target: Target,
    items: Sequence[SyntheticItem],
    methods: Sequence[str],
    max_new_tokens: int,
    tree: dict[str, int] | None = None,
) -> dict[str, dict]:
    """Per method: accepted drafts and steps per topic, drafted grounded/template tokens."""

    def args(m: str) -> dict:
        if not tree or m not in DYNAMIC_TREE:
            return {}
        # the shared tree only: EAGLE-2's confidence threshold off
        return {**tree, "threshold": 1.0} if m == "eagle2" else dict(tree)

    engines = {m: Engine(target, get_drafter(m)(**args(m))) for m in ("ar", *methods)}
    stats: dict[str, dict] = {
        m: {"accepted": collections.Counter(), "steps": collections.Counter(),
            "roles": collections.Counter(), "mismatch": 0}
        for m in methods
    }  # fmt: skip
    for engine in engines.values():  # warm-up outside the measurements
        engine.generate(
            [conversation(items[0].sample, [], True)], [items[0].sample.load_image()], 8
        )
    for item in items:
        image = item.sample.load_image()
        answers: list[str] = []  # AR's (every method's, as they are lossless)
        for turn in range(len(item.sample.turns)):
            ref: Generation | None = None
            for m, engine in engines.items():
                conv = conversation(item.sample, answers, True)
                (r,) = engine.generate([conv], [image], max_new_tokens)
                if m == "ar":
                    ref = r
                    continue
                s = stats[m]
                s["mismatch"] += r.tokens != ref.tokens
                s["accepted"][item.scene.topic] += r.accepted
                s["steps"][item.scene.topic] += r.steps
                if turn == 0:
                    roles = token_roles(target, item, r.tokens)
                    for role, drafted in zip(roles or [], drafted_flags(r)):
                        s["roles"][(role, drafted)] += 1
            answers.append(target.decode(ref.tokens).strip())
    return stats


def _share(roles: collections.Counter, role: int) -> str:
    total = roles[(role, True)] + roles[(role, False)]
    return f"{roles[(role, True)] / total:.0%} of {total}" if total else "-"


def report(model: str, stats: dict[str, dict]) -> list[str]:
    topics = [t for t in TOPICS if any(s["steps"][t] for s in stats.values())]
    lines = [f"**{model}**", "", "| method | " + " | ".join(topics) + " | all | grounded tokens "
             "drafted | template tokens drafted | mismatches vs AR |",
             "|---|" + "---:|" * (len(topics) + 4)]  # fmt: skip
    for m, s in stats.items():
        mats = [f"{s['accepted'][t] / s['steps'][t]:.2f}" if s["steps"][t] else "-" for t in topics]
        total = sum(s["accepted"].values()) / max(1, sum(s["steps"].values()))
        lines.append(
            f"| {m} | " + " | ".join(mats) + f" | **{total:.2f}** | "
            f"{_share(s['roles'], GROUNDED)} | {_share(s['roles'], TEMPLATE)} | {s['mismatch']} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-topic", type=int, default=10)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tree", help="depth,top_k,total_token for every dynamic-tree method")
    parser.add_argument("--device", default="cpu", help="torch device of the target and heads")
    args = parser.parse_args()
    tree = None
    if args.tree:
        depth, top_k, total = (int(x) for x in args.tree.split(","))
        tree = {"depth": depth, "top_k": top_k, "total_token": total}
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    items = synthetic_items(args.per_topic, 0, None, "eval")
    where = f"{platform.machine()} CPU, {args.threads} thread(s)"
    if args.device != "cpu":
        where = f"{torch.cuda.get_device_name(args.device)} ({where})"
    print(
        f"{where}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; eval split, {args.per_topic} per topic, "
        f"greedy, batch size 1, max {args.max_new_tokens} new tokens per turn; "
        + (f"every dynamic tree {tree}" if tree else "each method's default tree")
        + "\n"
    )
    print("MAT per topic (accepted draft tokens per verification step, bonus excluded):\n")
    for model in args.models.split(","):
        target = load_target(model, device=args.device)
        stats = run(target, items, methods, args.max_new_tokens, tree)
        print("\n".join(report(model, stats)))


if __name__ == "__main__":
    main()
