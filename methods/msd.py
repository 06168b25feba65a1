"""MSD: an EAGLE head that treats text and visual tokens separately.

Lin et al., "Speculative Decoding Reimagined for Multimodal Large Language Models" (arXiv
2505.14260); reference: Lyn-Lucy/MSD `EAGLE/eagle/model/cnets.py`.

Text positions are EAGLE's: fc(cat(embedding of token t+1, target feature f_t)). At visual
positions (token t+1 an image slot) the head is handed the visual token itself - the
projected image feature the target saw - straight into its layer, with no target feature
mixed in: the reference found that fusing a visual embedding with a language-model feature
through one fc confuses the head. MMSpec (`method/msd/cnets.py`) does the same on both of its
targets, and builds the layer from the target's family: Qwen2-VL's on Qwen (with an input
norm, as visual embeddings and fc outputs live on different scales), EAGLE's first LLaMA
layer on LLaVA (no input norm): our default (`input_norm`, by the head's block; `true` on a
LLaMA block, the zoo's LLaVA head before, stays an option). Training follows a text-to-visual
curriculum (training/train_drafter.py: text-only steps, then a linear ramp of multimodal
batches).

Tree: EAGLE-2's dynamic tree without a threshold (MMSpec's `topK_genrate`, EAGLE's), with its
script's depth 5, top_k 10, total_token 59 (its LLaVA script's -1 is a GPU timing search over
40..60); greedy acceptance of the longest matching path. Where the head places the tree
(`tree_positions`): `mmspec`, the default, as MMSpec's LLaVA path does - one position past the
token it follows when a LLaVA prompt holds image slots (`MSD._tree_gap`), right after it
otherwise; `sequence`: right after it always (EAGLE's). Either way only drafts change.
"""

from __future__ import annotations

from typing import Any

import torch

from mmspec.methods.base import DraftContext, kept_rows
from mmspec.methods.dynamic_tree import DynamicTreeDrafter
from mmspec.methods.eagle import EagleHead
from mmspec.methods.head_config import DraftConfig
from mmspec.methods.registry import register
from mmspec.models.target import Target

# whether MMSpec's MSD layer normalises its input, by the head's block (module doc)
MMSPEC_INPUT_NORM = {"qwen2": True, "llama": False}


class MSDHead(EagleHead):
    def __init__(self, config: DraftConfig) -> None:
        # resolved in place, so config.json records it (a head saved before keeps its own)
        config.extra.setdefault("input_norm", MMSPEC_INPUT_NORM[config.block])
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


TREE_POSITIONS = ("mmspec", "sequence")


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
        tree_positions: str = "mmspec",
    ) -> None:
        if tree_positions not in TREE_POSITIONS:
            raise ValueError(
                f"msd tree_positions must be one of {', '.join(TREE_POSITIONS)}, "
                f"got {tree_positions!r}"
            )
        super().__init__(checkpoint, depth, top_k, total_token)
        self.tree_positions = tree_positions
        self.gap = torch.zeros(0, dtype=torch.long)  # (b,) per row: see `_tree_gap`

    def begin(self, ctx: DraftContext) -> None:
        self.gap = torch.zeros(0, dtype=torch.long, device=self.target.device)
        super().begin(ctx)  # -> `join`

    def join(self, ctx: DraftContext) -> None:
        super().join(ctx)
        self.gap = torch.cat([self.gap, self._tree_gap(ctx)])

    def _tree_gap(self, ctx: DraftContext) -> torch.Tensor:
        """(b,) how far past the sequence each row's draft tree sits. MMSpec's LLaVA path
        (`initialize_tree_hf`) hands its head the ids with the image block as one `-200`
        marker, and embeddings that hold the pending token twice; it counts the block's
        extra positions as their length difference, N for N slots where the marker already
        stands for one, so every tree node sits one position past the token it follows: 1 on
        a LLaVA target whose prompt holds image slots, else 0 (its Qwen path counts right)."""
        device = self.kv.next_pos.device
        if self.tree_positions != "mmspec" or self.target.family != "llava":
            return torch.zeros(len(ctx.tokens), dtype=torch.long, device=device)
        image = self.target.image_token_id
        gap = [int(image in tokens[:n]) for tokens, n in zip(ctx.tokens, ctx.prompt_lens)]
        return torch.tensor(gap, dtype=torch.long, device=device)

    def _follow(self, rows: list[int]) -> None:
        keep = kept_rows(self.rows, rows)
        super()._follow(rows)
        if keep is not None:
            self.gap = self.gap[torch.tensor(keep, device=self.gap.device)]

    def _expand(
        self,
        tokens: torch.Tensor,
        parent_hidden: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super()._expand(tokens, parent_hidden, mask, positions + self.gap[:, None])
