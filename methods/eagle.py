"""EAGLE-1: a one-layer head that extrapolates the target's last hidden state, static tree.

Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty" (ICML 2024);
reference: SafeAILab/EAGLE `eagle/model/cnets1.py`, Spec-Bench `model/eagle`.

At position t the head reads fc(cat(embedding of token t+1, feature f_t)) - f_t being the
target's last hidden state after its final norm, the LM head's input - and one decoder layer
(no input norm: the fc output is its input) predicts f_{t+1}; the target's own LM head turns
that into tokens. Deeper tree levels feed the head's own outputs back as features.

Image slots of the prompt (`image_slot_token`, methods/head_image_slots.py): MMSpec's rule is
the default for new heads (`draft_config`). Its SpecModel (method/eagle*/spec_model.py) hands
the head the embeddings the target was fed only on Qwen2.5-VL and LLaVA-NeXT, so there the
head reads the projected image features at image slots (null); on LLaVA-1.5 it hands none and
the head embeds the prompt's ids with its copy of the target's table, so every image slot
reads the `<image>` token's own text embedding (the image token id). The features f_t are the
target's as computed, image slots included. A head saved without the option reads the image
features, as the zoo's heads of before were trained.

Which tree it drafts (`tree`):
- `dynamic` (the default; MMSpec's `method/eagle/cnets.py` `topK_genrate`): MMSpec's "EAGLE"
  is EAGLE-2's dynamic tree without a confidence threshold (its check is commented out, and
  the static choice list it defines is never used), with depth 3, top_k 8, total_token 30 as
  its scripts pass them - so results compare with the paper's EAGLE row.
- `static`: the EAGLE-1 paper's fixed tree (`EAGLE_TREE`, the reference's 25-node
  "mc_sim_7b_63"): the node (c1, c2, ...) is the c1-th likeliest token after the root, then
  the c2-th likeliest after that, and so on; or an explicit list of such choice paths.
EAGLE-2 (eagle2.py) runs the same weights with MMSpec's confidence threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmspec.methods.dynamic_tree import DynamicTreeDrafter
from mmspec.methods.head_config import DraftConfig, decoder_layer, rotary, run_layer
from mmspec.methods.head_image_slots import ImageSlotHead
from mmspec.methods.head_training import TeacherBatch, eagle_loss
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree
from mmspec.methods.tree_search import TreeSearch
from mmspec.models.feature_taps import FINAL, Feature
from mmspec.models.target import Target

# the target families on which MMSpec's EAGLE/EAGLE-2 hand the head no input embeddings, so
# it embeds the image token's id at image slots (LLaVA-1.5's; see the module docstring)
IMAGE_TOKEN_AT_SLOTS = frozenset({"llava"})

EAGLE_TREE: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
)  # fmt: skip


def mmspec_image_slot_token(target: Target) -> int | None:
    """What MMSpec's EAGLE/EAGLE-2 head reads at `target`'s image slots, as an
    `image_slot_token`: the image token's id on LLaVA-1.5, None (the image features) else."""
    return target.image_token_id if target.family in IMAGE_TOKEN_AT_SLOTS else None


class EagleHead(ImageSlotHead):
    """fc(cat(embedding, feature)) -> one decoder layer; the target's LM head reads it.

    State-dict keys as the reference saves them (`fc.*`, `layers.0.*`), minus the frozen
    copy of the target's embedding table. `config.extra["input_norm"]` keeps the layer's
    input norm (MSD's heads have one, EAGLE's do not).
    """

    target_features: tuple[Feature, ...] = (FINAL,)

    def __init__(self, config: DraftConfig) -> None:
        super().__init__(config)  # the image-slot rule
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=config.extra.get("fc_bias", True))
        self.layers = nn.ModuleList([decoder_layer(config)])
        if not config.extra.get("input_norm", False):
            self.layers[0].input_layernorm = nn.Identity()
        self.rotary = rotary(config)

    @classmethod
    def draft_config(cls, method: str, target: Target, **extra: Any) -> DraftConfig:
        """A new head's DraftConfig for `target`, with MMSpec's image-slot rule recorded
        unless `extra` names one. The rule acts in EAGLE's `prompt_inputs`: a subclass that
        reads image slots its own way (ViSpec's, MSD's) records none."""
        if cls.prompt_inputs is EagleHead.prompt_inputs:
            extra.setdefault("image_slot_token", mmspec_image_slot_token(target))
        return DraftConfig.for_target(method, target, **extra)

    def fuse(self, feats: dict[Feature, torch.Tensor]) -> torch.Tensor:
        return feats[FINAL]

    def combine(
        self, embeds: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> torch.Tensor:
        return self.fc(torch.cat([embeds, hidden], dim=-1))

    def block(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: Any
    ) -> torch.Tensor:
        return run_layer(self.layers[0], x, self.rotary(x, positions), mask, cache)

    def logp(self, out: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        return torch.log_softmax(lm_head(out).float(), dim=-1)

    def prompt_inputs(
        self, embeds: torch.Tensor, hidden: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        positions = torch.arange(embeds.shape[0], device=embeds.device)
        return self.combine(self.token_embeddings(embeds, image), hidden, None), positions, None

    def train_loss(
        self, batch: TeacherBatch, embed: nn.Module, lm_head: nn.Module, noise: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return eagle_loss(self, batch, embed, lm_head, noise)

    @classmethod
    def from_reference(
        cls, raw: dict[str, Any], state: dict[str, torch.Tensor], target: Target, where: str
    ) -> tuple[DraftConfig, dict[str, torch.Tensor]]:
        """A reference EAGLE checkpoint (LLaMA-style config.json, `fc` + `layers.0`), read
        with MMSpec's image-slot rule for `target` (how MMSpec runs its published heads)."""
        from mmspec.methods.draft_checkpoint import reference_config

        extra = {"fc_bias": "fc.bias" in state, "image_slot_token": mmspec_image_slot_token(target)}
        if "layers.0.input_layernorm.weight" in state:
            extra["input_norm"] = True
        config = reference_config("eagle", raw, target, where, **extra)
        state = {k: v for k, v in state.items() if k != "embed_tokens.weight"}
        return config, state


@register("eagle")
class Eagle(DynamicTreeDrafter):
    head_cls = EagleHead

    def __init__(
        self,
        checkpoint: str | None = None,
        tree: str | Sequence[Sequence[int]] = "dynamic",
        depth: int = 3,
        top_k: int = 8,
        total_token: int = 30,
    ) -> None:
        super().__init__(checkpoint, depth, top_k, total_token)
        # None: the dynamic tree; else the static tree's choice paths
        self.choices: list[tuple[int, ...]] | None
        if isinstance(tree, str):
            if tree not in ("dynamic", "static"):
                raise ValueError(f"eagle tree must be dynamic, static or a list of paths: {tree!r}")
            self.choices = None if tree == "dynamic" else [tuple(p) for p in EAGLE_TREE]
        else:
            self.choices = [tuple(int(c) for c in path) for path in tree]

    def grow(self, search: TreeSearch, logp: torch.Tensor, hidden: torch.Tensor) -> list[DraftTree]:
        if self.choices is None:
            return super().grow(search, logp, hidden)
        return search.static(logp, hidden, self.choices)
