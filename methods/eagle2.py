"""EAGLE-2: EAGLE-1's head and weights with a dynamic draft tree.

Li et al., "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees" (EMNLP
2024); reference: SafeAILab/EAGLE `topK_genrate`. The head's confidence (cumulative
log-probability) picks where the tree grows: each level expands the top_k likeliest nodes,
and the total_token likeliest nodes of all levels (root included) are verified. Defaults are
MMSpec's for Qwen2.5-VL-7B: depth 3, top_k 8, total_token 30, and MMSpec's confidence
`threshold` 0.3 (its EAGLE-2 stops growing a tree once no node of the newest level is
likelier than that, and keeps only the nodes above it; the EAGLE reference stores a threshold
it never reads; 1.0 turns it off).
"""

from __future__ import annotations

import torch

from mmspec.methods.dynamic_tree import DynamicTreeDrafter
from mmspec.methods.eagle import EagleHead
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree
from mmspec.methods.tree_search import TreeSearch


@register("eagle2")
class Eagle2(DynamicTreeDrafter):
    head_cls = EagleHead
    weights = "eagle"

    def __init__(
        self,
        checkpoint: str | None = None,
        depth: int = 3,
        top_k: int = 8,
        total_token: int = 30,
        threshold: float = 0.3,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ValueError(f"eagle2 threshold must be a number, got {threshold!r}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"eagle2 threshold is a probability in (0, 1], got {threshold}")
        super().__init__(checkpoint, depth, top_k, total_token)
        self.threshold = float(threshold)

    def grow(self, search: TreeSearch, logp: torch.Tensor, hidden: torch.Tensor) -> list[DraftTree]:
        return search.dynamic(
            logp, hidden, self.depth, self.top_k, self.total_token, self.threshold
        )
