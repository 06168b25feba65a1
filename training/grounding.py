"""How much a target looks at the image when it emits a grounded vs a template token.

The evidence behind the tiny zoo (issue 5) and ViSkip (issue 7) is the same measurement:
teacher-forced on the synthetic suite's reference answers, the attention mass that the position
predicting each answer token puts on the image tokens, read by the engine's own `VisionProbe`
(the last layer by default, mean over heads) - exactly the score ViSkip thresholds. Tokens are
labelled by the training encoder: GROUNDED is the first token of a fact read off the picture
(every digit of a value), TEMPLATE an answer token with no such fact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmspec.models.target import Target
from mmspec.models.vision_probe import VisionProbe
from mmspec.training.encoding import GROUNDED, TEMPLATE, Encoder
from mmspec.workloads.synthetic import SyntheticItem

KINDS = {GROUNDED: "grounded", TEMPLATE: "template"}
Scores = dict[str, list[float]]  # "grounded" / "template" -> one score per token


@torch.no_grad()
def answer_token_scores(
    target: Target, items: Sequence[SyntheticItem], layers: tuple[int, ...] = (-1,)
) -> dict[str, Scores]:
    """Per topic, the image-attention score of every grounded and template answer token."""
    encoder = Encoder(target)
    probe = VisionProbe(target.text_layers(), layers=layers)
    out: dict[str, Scores] = {}
    for item in items:
        inputs, kinds = encoder.collate([encoder.encode(item.scene, item.sample.load_image())])
        probe.arm(inputs["input_ids"] == target.image_token_id, last_only=False)
        target.model(**inputs, use_cache=False)
        mass = probe.take()[0]  # (positions,)
        scores = out.setdefault(item.scene.topic, {"grounded": [], "template": []})
        for p, kind in enumerate(kinds[0].tolist()):
            if kind in KINDS:  # the token at p was predicted by the query at p - 1
                scores[KINDS[kind]].append(float(mass[p - 1]))
    return out


def pooled(per_topic: dict[str, Scores]) -> Scores:
    """All topics' scores together."""
    return {k: [v for s in per_topic.values() for v in s[k]] for k in ("grounded", "template")}


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney)."""
    if not positive or not negative:
        raise ValueError("ROC AUC needs at least one positive and one negative score")
    scored = sorted([(v, 1) for v in positive] + [(v, 0) for v in negative])
    rank_sum, i = 0.0, 0
    while i < len(scored):
        j = i
        while j < len(scored) and scored[j][0] == scored[i][0]:
            j += 1
        mean_rank = (i + j + 1) / 2  # ranks are 1-based
        rank_sum += mean_rank * sum(label for _, label in scored[i:j])
        i = j
    n_pos, n_neg = len(positive), len(negative)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
