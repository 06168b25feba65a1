"""DraftTree: what every drafter returns (a chain is a tree whose parents are i-1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    """Draft tokens hanging below the row's pending token (the root, not stored here).

    Nodes are in topological order: a parent always comes before its children, and children
    of one parent are in the order acceptance should try them.
    """

    tokens: list[int]  # (n,) draft token ids
    parents: list[int]  # (n,) index of the parent node, -1 for the root
    # (n, vocab) draft probabilities q(x) per node when the drafter samples its drafts;
    # None for deterministic drafts (lookups, argmax trees).
    probs: torch.Tensor | None = None
    skipped: bool = False  # a wrapper chose not to draft this step (counted, e.g. ViSkip)
    depths: list[int] = field(init=False)  # (n,) 1 for children of the root

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("tokens and parents must have the same length")
        depths: list[int] = []
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede children")
            depths.append(1 if p < 0 else depths[p] + 1)
        self.depths = depths

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int]) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    @classmethod
    def empty(cls, skipped: bool = False) -> DraftTree:
        return cls([], [], skipped=skipped)

    def children(self, node: int) -> list[int]:
        """Children of `node` (-1 = root) in the order they were proposed."""
        return [i for i, p in enumerate(self.parents) if p == node]
