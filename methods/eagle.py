"""EAGLE-1: a one-layer head that extrapolates the target's last hidden state, static tree.

Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty" (ICML 2024);
reference: SafeAILab/EAGLE `eagle/model/cnets1.py`, Spec-Bench `model/eagle`.

At position t the head reads fc(cat(embedding of token t+1, feature f_t)) - f_t being the
target's last hidden state after its final norm, the LM head's input - and one decoder layer
(no input norm: the fc output is its input) predicts f_{t+1}; the target's own LM head turns
that into tokens. Deeper tree levels feed the head's own outputs back as features. Prompt
image slots are embedded with the projected image features the target saw.

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
from mmspec.methods.head_config import DraftConfig, decoder_layer, rotary
from mmspec.methods.head_training import TeacherBatch, eagle_loss
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree
from mmspec.methods.tree_search import TreeSearch
from mmspec.models.feature_taps import FINAL, Feature
from mmspec.models.target import Target, cache_keyword

EAGLE_TREE: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
)  # fmt: skip


class EagleHead(nn.Module):
    """fc(cat(embedding, feature)) -> one decoder layer; the target's LM head reads it.

    State-dict keys as the reference saves them (`fc.*`, `layers.0.*`), minus the frozen
    copy of the target's embedding table. `config.extra["input_norm"]` keeps the layer's
    input norm (MSD's heads have one, EAGLE's do not).
    """

    target_features: tuple[Feature, ...] = (FINAL,)

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=config.extra.get("fc_bias", True))
        self.layers = nn.ModuleList([decoder_layer(config)])
        if not config.extra.get("input_norm", False):
            self.layers[0].input_layernorm = nn.Identity()
        self.rotary = rotary(config)

    def fuse(self, feats: dict[Feature, torch.Tensor]) -> torch.Tensor:
        return feats[FINAL]

    def combine(
        self, embeds: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> torch.Tensor:
        return self.fc(torch.cat([embeds, hidden], dim=-1))

    def block(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: Any
    ) -> torch.Tensor:
        return self.layers[0](
            x,
            attention_mask=mask,
            position_ids=positions,
            use_cache=cache is not None,
            position_embeddings=self.rotary(x, positions),
            **{cache_keyword(self.layers[0]): cache},
        )

    def logp(self, out: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        return torch.log_softmax(lm_head(out).float(), dim=-1)

    def prompt_inputs(
        self, embeds: torch.Tensor, hidden: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        positions = torch.arange(embeds.shape[0], device=embeds.device)
        return self.combine(embeds, hidden, None), positions, None

    def train_loss(
        self, batch: TeacherBatch, embed: nn.Module, lm_head: nn.Module, noise: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return eagle_loss(self, batch, embed, lm_head, noise)

    @classmethod
    def from_reference(
        cls, raw: dict[str, Any], state: dict[str, torch.Tensor], target: Target, where: str
    ) -> tuple[DraftConfig, dict[str, torch.Tensor]]:
        """A reference EAGLE checkpoint (LLaMA-style config.json, `fc` + `layers.0`)."""
        from mmspec.methods.draft_checkpoint import reference_config

        extra = {"fc_bias": "fc.bias" in state}
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
