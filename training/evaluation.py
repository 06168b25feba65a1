"""Held-out scoring of a tiny model on the eval split (disjoint from training by construction).

Two measures: teacher-forced token accuracy on a fixed small set, cheap enough to monitor
during training, and exact match of greedy first answers, the zoo's headline accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from mmspec.models.target import Target
from mmspec.training.encoding import GROUNDED, TEMPLATE, Encoder, Example, training_messages
from mmspec.workloads.synthetic import SyntheticItem, synthetic_items


def monitor_batches(encoder: Encoder, per_topic: int = 8) -> list[list[Example]]:
    """A fixed held-out set (eval split, all topics), in small batches."""
    items = synthetic_items(per_topic, 0, None, "eval")
    examples = [encoder.encode(it.scene, it.sample.load_image()) for it in items]
    return [examples[i : i + 8] for i in range(0, len(examples), 8)]


@torch.no_grad()
def token_accuracy(
    model: torch.nn.Module, encoder: Encoder, batches: list[list[Example]]
) -> dict[str, float]:
    """Teacher-forced argmax accuracy of grounded and template answer tokens."""
    model.eval()
    hits = {GROUNDED: [0, 0], TEMPLATE: [0, 0]}
    for batch in batches:
        inputs, kinds = encoder.collate(batch)
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        right = logits.argmax(-1) == inputs["input_ids"][:, 1:]
        for kind, counts in hits.items():
            sel = kinds[:, 1:] == kind
            counts[0] += int(right[sel].sum())
            counts[1] += int(sel.sum())
    return {
        "grounded": round(hits[GROUNDED][0] / max(1, hits[GROUNDED][1]), 4),
        "template": round(hits[TEMPLATE][0] / max(1, hits[TEMPLATE][1]), 4),
    }


SHORT_ANSWER_TOPICS = ("general vqa", "text vqa")


def first_answers(
    target: Target,
    items: Sequence[SyntheticItem],
    images: Sequence[Image.Image],
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers to each item's first turn about `images` (its own, or others)."""
    from mmspec.methods.engine import Engine
    from mmspec.methods.registry import get_drafter

    engine = Engine(target, get_drafter("ar")())
    answers: list[str] = []
    for i in range(0, len(items), batch_size):
        convs = [training_messages(it.scene.turns[:1], []) for it in items[i : i + batch_size]]
        results = engine.generate(convs, list(images[i : i + batch_size]), max_new_tokens)
        answers += [target.decode(r.tokens).strip() for r in results]
    return answers


def eval_accuracy(
    target: Target,
    per_topic: int,
    topics: Sequence[str] = SHORT_ANSWER_TOPICS,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on the eval split, per topic and overall."""
    items = synthetic_items(per_topic, seed, list(topics), "eval")
    answers = first_answers(target, items, [it.sample.load_image() for it in items], batch_size)
    hits: dict[str, list[bool]] = {t: [] for t in topics}
    for it, answer in zip(items, answers, strict=True):
        hits[it.scene.topic].append(answer == it.scene.references[0])
    accuracy = {t: sum(h) / len(h) for t, h in hits.items()}
    accuracy["all"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return accuracy
