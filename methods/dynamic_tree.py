"""The base of the heads that grow EAGLE-2's dynamic tree (EAGLE-2, EAGLE-3, ViSpec, MSD):
`depth` levels, the `top_k` likeliest nodes expanded per level, the `total_token` likeliest
nodes verified (root included)."""

from __future__ import annotations

import torch

from mmspec.methods.head_drafter import HeadDrafter
from mmspec.methods.tree import DraftTree
from mmspec.methods.tree_search import TreeSearch


def check_tree_args(method: str, depth: int, top_k: int, total_token: int) -> None:
    if depth < 1 or top_k < 1 or total_token < 2:
        raise ValueError(
            f"{method} needs depth >= 1, top_k >= 1, total_token >= 2; "
            f"got {depth}, {top_k}, {total_token}"
        )


class DynamicTreeDrafter(HeadDrafter):
    """A head drafter that grows EAGLE-2's dynamic tree (EAGLE-2, EAGLE-3, ViSpec, MSD)."""

    tree_drafting = True  # EAGLE-1's static tree (`tree: static`) is a tree too

    def __init__(
        self, checkpoint: str | None = None, depth: int = 3, top_k: int = 8, total_token: int = 30
    ) -> None:
        check_tree_args(self.name or type(self).__name__, depth, top_k, total_token)
        super().__init__(checkpoint)
        self.depth, self.top_k, self.total_token = depth, top_k, total_token

    def grow(self, search: TreeSearch, logp: torch.Tensor, hidden: torch.Tensor) -> list[DraftTree]:
        return search.dynamic(logp, hidden, self.depth, self.top_k, self.total_token)
