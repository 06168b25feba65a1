"""Acceptance of a verified draft tree: which nodes survive and which bonus token follows.

Greedy: the longest path whose every token is the target's argmax. Sampling (lossless): at
each node the children are tried in order; a deterministic draft child x is accepted with
probability p(x) under the (renormalised) residual target distribution, otherwise x is
zeroed out and the next sibling is tried; when no child survives, the bonus token is sampled
from what remains. That keeps the output distribution exactly the target's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmspec.methods.tree import DraftTree


@dataclass
class Acceptance:
    path: list[int]  # accepted tree node indices, root first excluded; q-index = node + 1
    tokens: list[int]  # emitted tokens: the accepted drafts then the bonus token


def accept_greedy(tree: DraftTree, argmax: list[int]) -> Acceptance:
    """`argmax[i]` is the target's greedy token after q-index i (0 = root)."""
    if not tree.tokens:  # nothing drafted (AR): the bonus token alone
        return Acceptance([], [argmax[0]])
    children = _children(tree)
    path: list[int] = []
    q = 0
    while True:
        want = argmax[q]
        nxt = next((c for c in children[q] if tree.tokens[c] == want), None)
        if nxt is None:
            return Acceptance(path, [tree.tokens[n] for n in path] + [want])
        path.append(nxt)
        q = nxt + 1


def accept_sampling(
    tree: DraftTree, logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> Acceptance:
    """`logits` (q, vocab) for the root then each node; drafts without draft probabilities."""
    if tree.probs is not None:
        raise NotImplementedError("sampling acceptance of drafts with draft probabilities")
    children = _children(tree)
    path: list[int] = []
    q = 0
    while True:
        p = torch.softmax(logits[q].float() / temperature, dim=-1)
        chosen = None
        for c in children[q]:
            x = tree.tokens[c]
            total = p.sum()
            if torch.rand((), generator=generator) * total < p[x]:
                chosen = c
                break
            p[x] = 0.0  # rejected: the rest of the mass is renormalised implicitly
        if chosen is None:
            bonus = int(torch.multinomial(p / p.sum(), 1, generator=generator))
            return Acceptance(path, [tree.tokens[n] for n in path] + [bonus])
        path.append(chosen)
        q = chosen + 1


def _children(tree: DraftTree) -> list[list[int]]:
    """Children per q-index (0 = root, i + 1 = node i), in proposal order."""
    out: list[list[int]] = [[] for _ in range(len(tree) + 1)]
    for i, p in enumerate(tree.parents):
        out[p + 1].append(i)
    return out
