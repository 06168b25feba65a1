"""Evidence that the trained tiny zoo behaves like VLMs (issue 5), on the held-out eval split.

1. Exact-match accuracy of greedy answers on general vqa + text vqa, with the sample's own
   image and with another sample's image (same topic), next to the chance level of answering
   from the question alone.
2. Last-layer attention mass on image tokens (head mean; ViSkip's score, `training/grounding.py`)
   at the step that emits a grounded token (a colour, count, word or value read off the
   picture) vs a template token, over all six topics with teacher forcing on the reference
   answers: both means and the ROC AUC.
3. Output lengths per topic (greedy, multi-turn answers fed back as the runner does) against
   the references and MMSpec's averages / 8.

    .venv/bin/python benchmarks/bench_tiny_zoo.py [--per-topic 100] [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import collections
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from mmspec.methods.engine import Engine
from mmspec.methods.registry import get_drafter
from mmspec.models.loader import load_target, resolve_model_source
from mmspec.models.target import Target
from mmspec.models.tiny import BUILDERS, tiny_init_path
from mmspec.orchestrator.runner import conversation
from mmspec.training.evaluation import SHORT_ANSWER_TOPICS, first_answers
from mmspec.training.grounding import answer_token_scores, pooled, roc_auc
from mmspec.workloads.sample import TOPICS
from mmspec.workloads.synthetic import SyntheticItem, synthetic_items, synthetic_scenes

MMSPEC_MEAN_TOKENS = dict(zip(TOPICS, (47, 63, 192, 69, 286, 748)))
SECTION = "tiny model zoo (bench_tiny_zoo.py)"
START, END = f"<!-- {SECTION}: start -->", f"<!-- {SECTION}: end -->"


# ---- 1. accuracy with the own image, another image, and chance --------------------------------


def swapped_images(items: Sequence[SyntheticItem]) -> list:
    """Each sample gets the image of the next sample of its topic whose picture differs."""
    by_topic: dict[str, list[int]] = collections.defaultdict(list)
    for i, it in enumerate(items):
        by_topic[it.scene.topic].append(i)
    out: list = [None] * len(items)
    for idx in by_topic.values():
        for k, i in enumerate(idx):
            for step in range(1, len(idx)):
                j = idx[(k + step) % len(idx)]
                if items[j].sample.image_bytes != items[i].sample.image_bytes:
                    out[i] = items[j].sample.load_image()
                    break
    return out


def chance_level(items: Sequence[SyntheticItem], pool_per_topic: int = 2000) -> float:
    """Expected exact match of answering from the question alone: for each sample, how often
    its reference is the answer to the same question over a large pool of eval scenes."""
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    topics = sorted({it.scene.topic for it in items})
    for _, scene in synthetic_scenes(pool_per_topic, 1, topics, "eval"):
        answers[scene.turns[0]][scene.references[0]] += 1
    probs = []
    for it in items:
        counts = answers[it.scene.turns[0]]
        total = sum(counts.values())
        probs.append(counts[it.scene.references[0]] / total if total else 0.0)
    return sum(probs) / len(probs)


# ---- 2. attention mass on image tokens: grounded vs template tokens ----------------------------


@torch.inference_mode()
# ---- 3. output lengths ----------------------------------------------------------------------


def output_lengths(
    target: Target, items: Sequence[SyntheticItem], max_new_tokens: int, batch_size: int = 8
) -> tuple[dict[str, list[int]], float, int]:
    """Greedy tokens per sample (all turns, own answers fed back), wall seconds, new tokens."""
    engine = Engine(target, get_drafter("ar")())
    lengths: dict[str, list[int]] = collections.defaultdict(list)
    start = time.perf_counter()
    total = 0
    for i in range(0, len(items), batch_size):
        chunk = list(items[i : i + batch_size])
        answers: list[list[str]] = [[] for _ in chunk]
        counts = [0] * len(chunk)
        images = [it.sample.load_image() for it in chunk]
        for turn in range(max(len(it.scene.turns) for it in chunk)):
            live = [k for k, it in enumerate(chunk) if len(it.scene.turns) > turn]
            convs = [conversation(chunk[k].sample, answers[k], True) for k in live]
            results = engine.generate(convs, [images[k] for k in live], max_new_tokens)
            for k, res in zip(live, results, strict=True):
                answers[k].append(target.decode(res.tokens))
                counts[k] += len(res.tokens)
        for it, n in zip(chunk, counts, strict=True):
            lengths[it.scene.topic].append(n)
            total += n
    return lengths, time.perf_counter() - start, total


def reference_lengths(target: Target, items: Sequence[SyntheticItem]) -> dict[str, float]:
    per: dict[str, list[int]] = collections.defaultdict(list)
    for it in items:
        n = sum(
            len(target.tokenizer.encode(r, add_special_tokens=False)) + 1
            for r in it.scene.references
        )
        per[it.scene.topic].append(n)
    return {t: sum(v) / len(v) for t, v in per.items()}


# ---- report ---------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def bench_model(model_id: str, per_topic: int, attn_per_topic: int, len_per_topic: int) -> dict:
    target = load_target(model_id, device="cpu")
    short = synthetic_items(per_topic, 0, list(SHORT_ANSWER_TOPICS), "eval")
    own = [it.sample.load_image() for it in short]
    refs = [it.scene.references[0] for it in short]
    t0 = time.perf_counter()
    answers = first_answers(target, short, own)
    swapped = first_answers(target, short, swapped_images(short))
    acc_s = time.perf_counter() - t0
    hit = [a == r for a, r in zip(answers, refs, strict=True)]
    hit_swapped = [a == r for a, r in zip(swapped, refs, strict=True)]
    by_topic = {
        t: (
            _mean([h for h, it in zip(hit, short, strict=True) if it.scene.topic == t]),
            _mean([h for h, it in zip(hit_swapped, short, strict=True) if it.scene.topic == t]),
            chance_level([it for it in short if it.scene.topic == t]),
        )
        for t in SHORT_ANSWER_TOPICS
    }
    attn_items = synthetic_items(attn_per_topic, 0, None, "eval")
    masses_by_topic = answer_token_scores(target, attn_items)
    masses = pooled(masses_by_topic)
    # control: the same measurement on the untrained build of the architecture
    init = (
        pooled(answer_token_scores(load_target(str(tiny_init_path(model_id))), attn_items))
        if model_id in BUILDERS
        else {}
    )
    len_items = synthetic_items(len_per_topic, 0, None, "eval")
    lengths, len_s, len_tokens = output_lengths(target, len_items, max_new_tokens=256)
    return {
        "model": model_id,
        "accuracy": _mean(hit),
        "accuracy_swapped": _mean(hit_swapped),
        "chance": chance_level(short),
        "by_topic": by_topic,
        "n_short": len(short),
        "acc_s": acc_s,
        "grounded": masses["grounded"],
        "template": masses["template"],
        "auc": roc_auc(masses["grounded"], masses["template"]),
        "auc_init": roc_auc(init["grounded"], init["template"]) if init else float("nan"),
        "attn_by_topic": masses_by_topic,
        "lengths": {t: _mean(v) for t, v in lengths.items()},
        "ref_lengths": reference_lengths(target, len_items),
        "len_tokens_per_s": len_tokens / len_s,
        "zoo_bytes": sum(
            f.stat().st_size for f in Path(resolve_model_source(model_id)[0]).iterdir()
        ),
    }


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"## {SECTION}",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, {args.threads} thread(s), "
        f"torch {torch.__version__}, transformers {transformers.__version__}. Eval split "
        "(disjoint from training), greedy decoding. "
        f"`.venv/bin/python benchmarks/bench_tiny_zoo.py --per-topic {args.per_topic} "
        f"--attn-per-topic {args.attn_per_topic} --len-per-topic {args.len_per_topic}`",
        "",
        "**Exact match on held-out short answers** (general vqa + text vqa, "
        f"{results[0]['n_short']} samples): own image vs another sample's image vs chance "
        "(answering from the question alone: how often the reference is that question's answer "
        "over 2,000 eval scenes per topic).",
        "",
        "| model | own image | swapped image | chance | general vqa own / swapped / chance "
        "| text vqa own / swapped / chance |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        cells = [" / ".join(f"{v:.1%}" for v in r["by_topic"][t]) for t in SHORT_ANSWER_TOPICS]
        lines.append(
            f"| {r['model']} | **{r['accuracy']:.1%}** | {r['accuracy_swapped']:.1%} | "
            f"{r['chance']:.1%} | {cells[0]} | {cells[1]} |"
        )
    lines += [
        "",
        "**Last-layer attention mass on the 16 image tokens** (head mean) at the step that emits "
        "a grounded token (the first token of a colour, count, word, position or value read off "
        "the picture; every digit of a value) vs a template token (no fact from the picture), "
        f"teacher-forced on the references of {args.attn_per_topic} eval samples per topic "
        "(all six topics, every turn).",
        "",
        "| model | grounded: n, mean | template: n, mean | ROC AUC | AUC of the untrained build |",
        "|---|---|---|---:|---:|",
    ]
    for r in results:
        g, t = r["grounded"], r["template"]
        lines.append(
            f"| {r['model']} | {len(g)}, {_mean(g):.3f} | {len(t)}, {_mean(t):.3f} | "
            f"**{r['auc']:.3f}** | {r['auc_init']:.3f} |"
        )
    lines += ["", "Per topic (grounded mean / template mean / AUC):", ""]
    lines += ["| model | " + " | ".join(TOPICS) + " |", "|---|" + "---|" * len(TOPICS)]
    for r in results:
        cells = []
        for topic in TOPICS:
            per = r["attn_by_topic"].get(topic, {"grounded": [], "template": []})
            g, t = per["grounded"], per["template"]
            auc = f"{roc_auc(g, t):.2f}" if g and t else "-"
            cells.append(f"{_mean(g):.3f} / {_mean(t):.3f} / {auc}")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**Output tokens per sample** (greedy, all turns, {args.len_per_topic} eval samples per "
        "topic, max 256 new tokens per turn) vs the references (+1 end token per turn) and "
        "MMSpec's mean / 8:",
        "",
        "| model | " + " | ".join(TOPICS) + " | ar tokens/s (bs 8) |",
        "|---|" + "---|" * (len(TOPICS) + 1),
    ]
    for r in results:
        cells = [
            f"{r['lengths'][t]:.1f} ({r['ref_lengths'][t]:.1f}; {MMSPEC_MEAN_TOKENS[t] / 8:.1f})"
            for t in TOPICS
        ]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['len_tokens_per_s']:.0f} |")
    total = sum(r["zoo_bytes"] for r in results)
    lines += [
        "",
        "Checkpoint sizes: "
        + ", ".join(f"{r['model']} {r['zoo_bytes'] / 2**20:.1f} MiB" for r in results)
        + f" (zoo total {total / 2**20:.1f} MiB).",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (between its markers), or append it."""
    block = f"{START}\n{text}{END}\n"
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END) + r"\n?", re.S)
    new = (
        pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    )
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=sorted(BUILDERS))
    ap.add_argument("--per-topic", type=int, default=100, help="short-answer samples per topic")
    ap.add_argument("--attn-per-topic", type=int, default=20)
    ap.add_argument("--len-per-topic", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", type=Path, help="replace this benchmark's section of this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [
        bench_model(m, args.per_topic, args.attn_per_topic, args.len_per_topic) for m in args.models
    ]
    text = markdown(results, args)
    print(text)
    if args.write:
        write_section(args.write, text)


if __name__ == "__main__":
    main()
