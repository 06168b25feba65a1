"""ViSpec: an EAGLE head that sees the picture through a few learned queries.

Kang et al., "ViSpec: Accelerating Vision-Language Models with Vision-Aware Speculative
Decoding" (NeurIPS 2025); reference: KangJialiang/ViSpec `vispec/model/cnets_ours.py`.

A one-layer draft head cannot make sense of hundreds of image tokens, so ViSpec compresses
them. `num_q` learnable queries cross-attend over the image span's embeddings (the projected
image features the target saw):
- the first num_q - 1 outputs stand in for the whole image span in the head's sequence
  (they enter the layer directly, at the positions of the span's last num_q - 1 slots, so
  RoPE distances to the text stay as in the target);
- the last output is a global image feature g, joined to the target feature of every text
  position after the image: fc(cat(embedding, img_fc(cat(feature, g)))); img_fc starts as
  [I | 0], so an untrained adaptor changes nothing, and before any image g is 0.
Tree: EAGLE-2's dynamic tree; MMSpec's defaults depth 3, top_k 8, total_token 30, num_q 2.

Training (training/train_drafter.py) keeps the reference's two stages - text-only first (the
adaptor idle), then multimodal - but uses EAGLE's loss in both (feature smooth-L1 + soft
cross-entropy, head_training.eagle_loss). The reference's second stage switches to a
probability-only loss (L1 between the draft's and the target's softmax plus a top-10 ranking
term) with one unrolled multi-token step; that is not reproduced here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.methods.dynamic_tree import DynamicTreeDrafter
from mmspec.methods.eagle import EagleHead
from mmspec.methods.head_config import DraftConfig
from mmspec.methods.registry import register
from mmspec.models.target import Target


class ImageAdaptor(nn.Module):
    """num_q learnable queries attending (non-causally) over the image span's embeddings."""

    def __init__(self, config: DraftConfig, num_q: int) -> None:
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        self.heads, self.head_dim = heads, h // heads
        self.q = nn.Parameter(torch.randn(num_q, heads, self.head_dim) * self.head_dim**-0.5)
        bias = config.block == "qwen2"  # the target's own q/k/v bias convention
        self.k_proj = nn.Linear(h, h, bias=bias)
        self.v_proj = nn.Linear(h, h, bias=bias)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(n, h) image embeddings -> (num_q, h)."""
        n = image.shape[0]
        k = self.k_proj(image).view(n, self.heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(image).view(n, self.heads, self.head_dim).transpose(0, 1)
        q = self.q.to(image.dtype).transpose(0, 1)  # (heads, num_q, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (heads, num_q, d)
        return self.o_proj(out.transpose(0, 1).reshape(q.shape[1], -1))


class ViSpecHead(EagleHead):
    """EAGLE's head plus the image adaptor and the global-feature projection."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__(config)
        h = config.hidden_size
        self.num_q = int(config.extra.get("num_q", 2))
        if self.num_q < 1:
            raise ValueError(f"vispec needs num_q >= 1, got {self.num_q}")
        self.imadpt = ImageAdaptor(config, self.num_q)
        self.img_fc = nn.Linear(2 * h, h, bias=config.extra.get("fc_bias", True))
        with torch.no_grad():  # [I | 0]: the global feature starts with no say
            self.img_fc.weight.zero_()
            self.img_fc.weight[:, :h] = torch.eye(h)
            if self.img_fc.bias is not None:
                self.img_fc.bias.zero_()

    def combine(
        self, embeds: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> torch.Tensor:
        g = torch.zeros_like(hidden) if state is None else state.expand_as(hidden)
        return self.fc(torch.cat([embeds, self.img_fc(torch.cat([hidden, g], dim=-1))], dim=-1))

    def prompt_inputs(
        self, embeds: torch.Tensor, hidden: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n, dev = embeds.shape[0], embeds.device
        g = torch.zeros(embeds.shape[-1], dtype=embeds.dtype, device=dev)
        pieces: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        start = 0
        for lo, hi in _spans(image):
            # text before the span, with the global feature of the image before it (if any)
            pieces.append(self.combine(embeds[start:lo], hidden[start:lo], g))
            positions.append(torch.arange(start, lo, device=dev))
            queries = self.imadpt(embeds[lo:hi])
            keep = min(self.num_q - 1, hi - lo)
            if keep:
                pieces.append(queries[self.num_q - 1 - keep : self.num_q - 1])
                positions.append(torch.arange(hi - keep, hi, device=dev))
            g = queries[-1]
            start = hi
        pieces.append(self.combine(embeds[start:n], hidden[start:n], g))
        positions.append(torch.arange(start, n, device=dev))
        return torch.cat(pieces), torch.cat(positions), g

    @classmethod
    def from_reference(
        cls, raw: dict[str, Any], state: dict[str, torch.Tensor], target: Target, where: str
    ) -> tuple[DraftConfig, dict[str, torch.Tensor]]:
        """A reference ViSpec checkpoint: EAGLE's keys plus `imadpt.*` and `img_fc.*`."""
        from mmspec.methods.draft_checkpoint import CheckpointError, reference_config

        if "imadpt.q" not in state:
            raise CheckpointError(f"{where}: not a ViSpec head (no imadpt.q)")
        extra = {"fc_bias": "fc.bias" in state, "num_q": int(state["imadpt.q"].shape[0])}
        config = reference_config("vispec", raw, target, where, **extra)
        if bool(raw.get("qkv_bias")):
            config.block = "qwen2"
        return config, {k: v for k, v in state.items() if k != "embed_tokens.weight"}


def _spans(image: torch.Tensor) -> list[tuple[int, int]]:
    """[lo, hi) runs of True in a 1D bool tensor."""
    flags = image.tolist()
    spans, lo = [], None
    for i, f in enumerate([*flags, False]):
        if f and lo is None:
            lo = i
        elif not f and lo is not None:
            spans.append((lo, i))
            lo = None
    return spans


@register("vispec")
class ViSpec(DynamicTreeDrafter):
    head_cls = ViSpecHead
    vision_aware = True
