"""What a draft head learns from: the target's teacher-forced view of a conversation.

`TeacherBatch` is one batch of distilled conversations as the target saw them (its features
and next-token logits at every position); each head's `train_loss` turns it into a loss. The
EAGLE-family loss (EAGLE-1/2, ViSpec, MSD) is written once here: the head reads the prompt
the way it does at inference (`prompt_inputs`, so ViSpec's compressed image span, MSD's raw
visual slots and what an EAGLE head reads at image slots are trained as they run) and at each
position t predicts the target's feature at t+1 (smooth L1, weight `v_w`) and, through the LM
head, the target's distribution of token t+2 (soft cross-entropy, weight `p_w`), on answer
tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.methods.head_cache import DraftKV, feed, ragged
from mmspec.models.feature_taps import EMBEDS, FINAL, Feature


@dataclass
class TeacherBatch:
    """A left-padded batch of whole conversations, as the target saw it."""

    input_ids: torch.Tensor  # (b, L)
    real: torch.Tensor  # (b, L) bool: a token, not padding
    answer: torch.Tensor  # (b, L) bool: an assistant token (answers and their end tokens)
    image: torch.Tensor  # (b, L) bool: an image slot
    features: dict[Feature, torch.Tensor]  # (b, L, width) each, EMBEDS included
    logits: torch.Tensor  # (b, L, V) the target's next-token logits

    def rows(self) -> list[slice]:
        """The slice of real positions of each row (left padding)."""
        n = self.real.sum(dim=1).tolist()
        width = self.real.shape[1]
        return [slice(width - k, width) for k in n]


def uniform_noise(x: torch.Tensor, scale: float) -> torch.Tensor:
    """EAGLE's feature noise: uniform in [-scale/2, scale/2)."""
    return x + (torch.rand_like(x) - 0.5) * scale if scale else x


def eagle_loss(
    head: nn.Module,
    batch: TeacherBatch,
    embed: nn.Module,
    lm_head: nn.Module,
    noise: float = 0.0,
    v_w: float = 1.0,
    p_w: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """EAGLE's loss for heads with `prompt_inputs` / `block` (see head_drafter.Head); image
    slots read as the drafter reads them (`prepare_features`, `bind_embeddings`)."""
    head.bind_embeddings(embed)
    prepared = head.prepare_features(batch.features, batch.image)
    fused = head.fuse(prepared)
    target_feat = batch.features[FINAL]  # what the target computed: the regression target
    xs, ps, states, picks = [], [], [], []
    for i, rows in enumerate(batch.rows()):
        n = rows.stop - rows.start
        feats = uniform_noise(fused[i, rows][: n - 1], noise)
        embeds = prepared[EMBEDS][i, rows][1:]
        x, positions, state = head.prompt_inputs(embeds, feats, batch.image[i, rows][1:])
        xs.append(x)
        ps.append(positions)
        states.append(state)
        picks.append(rows.start)
    x, counts = ragged(xs)
    positions, _ = ragged(ps)
    kv = DraftKV(x.shape[0], x.device)
    out = feed(kv, lambda a, p, m: head.block(a, p, m, kv.cache), x, positions, counts)
    # position t (row-relative) predicts feature t+1 and token t+2
    m = positions.shape[1]
    width = batch.real.shape[1]
    start = torch.tensor(picks, device=x.device)[:, None]
    t1 = (start + positions + 1).clamp(max=width - 1)
    t2 = (start + positions + 2).clamp(max=width - 1)
    valid = torch.arange(m, device=x.device)[None] < torch.tensor(counts, device=x.device)[:, None]
    valid &= (start + positions + 2) < width
    valid &= torch.gather(batch.answer, 1, t2)
    if not bool(valid.any()):
        zero = out.sum() * 0.0
        return zero, {"v_loss": 0.0, "p_loss": 0.0, "acc": 0.0}
    want_feat = torch.gather(target_feat, 1, t1[..., None].expand(-1, -1, target_feat.shape[-1]))
    want_logits = torch.gather(
        batch.logits, 1, t1[..., None].expand(-1, -1, batch.logits.shape[-1])
    )
    v = F.smooth_l1_loss(out[valid].float(), want_feat[valid].float(), reduction="none").mean(-1)
    logp = head.logp(out[valid], lm_head)
    want = torch.softmax(want_logits[valid].float(), dim=-1)
    p = -(want * logp).sum(-1)
    loss = v_w * v.mean() + p_w * p.mean()
    acc = (logp.argmax(-1) == want.argmax(-1)).float().mean()
    return loss, {
        "v_loss": float(v.mean().detach()),
        "p_loss": float(p.mean().detach()),
        "acc": float(acc),
    }
