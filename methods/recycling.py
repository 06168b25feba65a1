"""Token Recycling: draft from a table of the target's own recent top-k next-token guesses.

Luo et al., "Turning Trash into Treasure: Accelerating Inference of LLMs with Token
Recycling" (arXiv 2408.05233); reference: Spec-Bench `evaluation/inference_recycling.py`.

Every verification computes the target's logits after the root and after every draft node,
accepted or not. Instead of throwing those away, keep the top-k tokens of each as a row of
a V x k adjacency matrix: `adjacency[x]` = the k likeliest tokens after the last place `x`
was seen. To draft, walk a static tree template from the row's pending token: the node at
path (c1, c2, ...) is adjacency[adjacency[root][c1]][c2]... The matrix lives as long as the
drafter, across batches and samples, so it keeps getting better (that is the recycling).

Choices beside the reference:
- Rows start at -1, meaning "never seen": nothing is drafted below an unseen token. The
  reference starts at zeros, which drafts token 0 below every unseen token: verification
  spent on a guess that is almost never right.
- Siblings with the same token are dropped, the first in template order kept, with their
  subtrees (the reference verifies the duplicates). Below the same token a dropped subtree
  would only repeat part of the kept one (the template keeps every path with a choice
  lowered), so nothing that could be accepted is lost.
- Writes of one step go root first, then nodes in tree order, rows in batch order; where a
  token occurs twice, the last write wins (the reference leaves the order to the GPU).
- `tree="chain"` drafts the top-1 chain of `draft_len` tokens, as the MMSpec runs did (their
  anti-repetition stops are not lossless and are left out, and nothing is seeded from the
  prompt's logits, which a drafter does not see).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mmspec.methods.base import DraftContext, Drafter, StepOutcome
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree

if TYPE_CHECKING:
    from mmspec.models.target import Target

UNSEEN = -1  # adjacency entry of a token the target has never been verified after

# Spec-Bench's "2.2.2" template (80 nodes, depth 6): each path lists which top-k choice to
# take at each depth below the root. Paths come by depth, siblings by choice.
TEMPLATE_2_2_2: tuple[tuple[int, ...], ...] = (
    *((c,) for c in range(8)),
    *((0, c) for c in range(8)),
    (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1),
    (4, 0), (5, 0), (6, 0), (7, 0),
    *((0, 0, c) for c in range(8)),
    (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 4, 0), (0, 5, 0),
    (0, 6, 0), (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0),
    (5, 0, 0),
    *((0, 0, 0, c) for c in range(5)),
    (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0), (0, 1, 0, 0),
    (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0),
    (0, 0, 1, 0, 0), (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
)  # fmt: skip

TREES = ("2.2.2", "chain")


def template(tree: str, draft_len: int) -> list[tuple[int, ...]]:
    """Template paths of a named tree, parents before children."""
    if tree == "2.2.2":
        return list(TEMPLATE_2_2_2)
    if tree == "chain":
        return [(0,) * d for d in range(1, draft_len + 1)]
    raise ValueError(f"recycling tree must be one of {', '.join(TREES)}; got {tree!r}")


def expand(
    paths: list[tuple[int, ...]], adjacency: torch.Tensor, root: int
) -> tuple[DraftTree, list[int]]:
    """Walk the template from `root` through `adjacency` (V, k) on the CPU.

    Returns the draft tree and, per tree node, the template index it came from. A node is
    dropped with its subtree when its parent was dropped, its parent's row is unseen, or an
    earlier sibling already holds its token.
    """
    rows = adjacency.numpy()  # a view: scalar reads without building tensors
    where = {(): -1}  # template path -> tree node index (-1 = the root) of kept paths
    tokens: list[int] = []
    parents: list[int] = []
    source: list[int] = []
    siblings: dict[int, set[int]] = {}  # tree node -> tokens of its kept children
    for i, path in enumerate(paths):
        parent = where.get(path[:-1])
        if parent is None:
            continue
        token = int(rows[root if parent < 0 else tokens[parent], path[-1]])
        taken = siblings.setdefault(parent, set())
        if token == UNSEEN or token in taken:
            continue
        taken.add(token)
        where[path] = len(tokens)
        tokens.append(token)
        parents.append(parent)
        source.append(i)
    return DraftTree(tokens, parents), source


def recycle(
    adjacency: torch.Tensor, roots: list[int], trees: list[DraftTree], logits: torch.Tensor
) -> None:
    """Write the top-k of each verified position into `adjacency`, in place.

    Args:
        adjacency: (vocab, k) int64 on the CPU.
        roots: (active,) the token each row fed at q-index 0.
        trees: (active,) the verified trees; node i is q-index i + 1, later ones are padding.
        logits: (active, q, vocab) on any device.
    """
    active, q = logits.shape[:2]
    tokens = torch.full((active, q), UNSEEN, dtype=torch.long)
    for i, (root, tree) in enumerate(zip(roots, trees)):
        tokens[i, 0] = root
        tokens[i, 1 : len(tree) + 1] = torch.tensor(tree.tokens, dtype=torch.long)
    # one topk for the whole step; only (active, q, k) indices leave the device
    best = logits.topk(adjacency.shape[1], dim=-1).indices.cpu()
    real = tokens.view(-1) != UNSEEN  # drop the padding positions of shorter trees
    flat, best = tokens.view(-1)[real], best.view(-1, adjacency.shape[1])[real]
    # index_put with repeated indices keeps an unspecified one: pick the last write ourselves
    unique, inverse = torch.unique(flat, return_inverse=True)
    order = torch.arange(len(flat))
    last = torch.zeros(len(unique), dtype=torch.long).scatter_reduce(0, inverse, order, "amax")
    adjacency[unique] = best[last]


@register("recycling")
class TokenRecycling(Drafter):
    """Training-free; drafts from an adjacency matrix refreshed by every verification.

    Args:
        tree: "2.2.2" (Spec-Bench's 80-node static tree) or "chain" (top-1 chain).
        draft_len: chain length; only used with `tree="chain"`.
        topk: successors kept per token (columns of the adjacency matrix).
    """

    def __init__(self, tree: str = "2.2.2", draft_len: int = 10, topk: int = 8) -> None:
        if draft_len < 1:
            raise ValueError(f"recycling needs draft_len >= 1, got {draft_len}")
        if topk < 1:
            raise ValueError(f"recycling needs topk >= 1, got {topk}")
        self.paths = template(tree, draft_len)
        widest = 1 + max(c for p in self.paths for c in p)
        if topk < widest:
            raise ValueError(f"recycling tree {tree!r} needs topk >= {widest}, got {topk}")
        self.tree, self.draft_len, self.topk = tree, draft_len, topk
        # (vocab, topk) int64 on the CPU, built in `load`. CPU because drafting walks it in
        # Python (one scalar read per node); on a GPU each read would be a device sync, while
        # an update only moves the (active, q, topk) indices of one topk off the device.
        self.adjacency = torch.empty(0, topk, dtype=torch.long)

    def load(self, target: Target) -> None:
        vocab = target.model.get_output_embeddings().weight.shape[0]
        if vocab < self.topk:
            raise ValueError(f"recycling topk={self.topk} exceeds the vocabulary ({vocab})")
        self.adjacency = torch.full((vocab, self.topk), UNSEEN, dtype=torch.long)

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        return [expand(self.paths, self.adjacency, t[-1])[0] for t in ctx.tokens]

    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        """Set adjacency[x] = topk(logits after x) for each row's root and every tree node."""
        recycle(self.adjacency, [t[-1] for t in ctx.tokens], outcome.trees, outcome.logits)
