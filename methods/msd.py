"""MSD: an EAGLE head that treats text and visual tokens separately.

Lin et al., "Speculative Decoding Reimagined for Multimodal Large Language Models" (arXiv
2505.14260); reference: Lyn-Lucy/MSD `EAGLE/eagle/model/cnets.py`.

Text positions are EAGLE's: fc(cat(embedding of token t+1, target feature f_t)). At visual
positions the head is handed the visual token itself - the projected image feature the
target saw - straight into its layer, with no target feature mixed in: the reference found
that fusing a visual embedding with a language-model feature through one fc confuses the
head. MSD's heads keep the layer's input norm (EAGLE's first layer drops it), since visual
embeddings and fc outputs live on different scales. Training follows a text-to-visual
curriculum (training/train_drafter.py: text-only steps, then a linear ramp of multimodal
batches). Tree: EAGLE-2's dynamic tree, MMSpec's defaults total_token 59, depth 5, top_k 10.
"""

from __future__ import annotations

from typing import Any

import torch

from mmspec.methods.dynamic_tree import DynamicTreeDrafter
from mmspec.methods.eagle import EagleHead
from mmspec.methods.head_config import DraftConfig
from mmspec.methods.registry import register
from mmspec.models.target import Target


class MSDHead(EagleHead):
    def __init__(self, config: DraftConfig) -> None:
        config.extra.setdefault("input_norm", True)
        super().__init__(config)

    def prompt_inputs(
        self, embeds: torch.Tensor, hidden: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = torch.where(image[:, None], embeds, self.combine(embeds, hidden, None))
        return x, torch.arange(embeds.shape[0], device=embeds.device), None

    @classmethod
    def from_reference(
        cls, raw: dict[str, Any], state: dict[str, torch.Tensor], target: Target, where: str
    ) -> tuple[DraftConfig, dict[str, torch.Tensor]]:
        """A reference MSD checkpoint: EAGLE's keys, with or without the input norm."""
        from mmspec.methods.draft_checkpoint import reference_config

        extra = {
            "fc_bias": "fc.bias" in state,
            "input_norm": "layers.0.input_layernorm.weight" in state,
        }
        config = reference_config("msd", raw, target, where, **extra)
        return config, {k: v for k, v in state.items() if k != "embed_tokens.weight"}


@register("msd")
class MSD(DynamicTreeDrafter):
    head_cls = MSDHead
    vision_aware = True

    def __init__(
        self,
        checkpoint: str | None = None,
        depth: int = 5,
        top_k: int = 10,
        total_token: int = 59,
    ) -> None:
        super().__init__(checkpoint, depth, top_k, total_token)
