"""Grows a draft tree from a head: statically (EAGLE-1's choice lists) or dynamically
(EAGLE-2: expand the top_k likeliest nodes per level, keep the total_token likeliest overall),
feeding tree levels into the head's cache and cropping them off afterwards."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmspec.methods.head_cache import DraftKV
from mmspec.methods.kv_slots import additive_mask
from mmspec.methods.tree import DraftTree


@dataclass
class _Node:
    token: int
    parent: int  # index into the candidate list, -1 = root
    score: float  # cumulative log-probability from the root
    depth: int


class TreeSearch:
    """Grows draft trees for a batch from a head, one tree level per head forward.

    `expand(tokens, parent_hidden, mask, positions)` runs the head over one level: tokens
    (b, n), the head output at each node's parent (b, n, h), the additive mask over the cache
    plus this level, positions (b, n); it returns (log-probs (b, n, V), output (b, n, h)).
    Level slots go into the cache while the tree grows (each node sees its ancestors) and are
    cropped off at the end.
    """

    def __init__(
        self,
        expand: Callable[
            [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
            tuple[torch.Tensor, torch.Tensor],
        ],
        kv: DraftKV,
    ) -> None:
        self.expand = expand
        self.kv = kv

    def _level(
        self, tokens: torch.Tensor, parent_hidden: torch.Tensor, anc: torch.Tensor, depth: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed one level; `anc` (b, n, tree slots so far) marks each node's ancestors.

        Returns log-probs, outputs and the visibility of the level's own nodes over all tree
        slots including theirs (b, n, slots + n), from which their children's `anc` is taken.
        """
        b, n = tokens.shape
        dev = tokens.device
        start = self.kv.length - anc.shape[-1]
        own = torch.cat(
            [anc, torch.eye(n, dtype=torch.bool, device=dev)[None].expand(b, -1, -1)], -1
        )
        base = self.kv.valid[:, None, :start].expand(-1, n, -1)
        mask = additive_mask(torch.cat([base, own], dim=-1), parent_hidden.dtype)
        positions = self.kv.next_pos[:, None] + depth - 1
        lp, out = self.expand(tokens, parent_hidden, mask, positions.expand(-1, n))
        self.kv.append_valid(torch.zeros(b, n, dtype=torch.bool, device=dev))
        return lp, out, own

    def dynamic(
        self,
        logp: torch.Tensor,
        hidden: torch.Tensor,
        depth: int,
        top_k: int,
        total_token: int,
        threshold: float = 1.0,
    ) -> list[DraftTree]:
        """EAGLE-2, from `logp` (b, V) and head output (b, h) after the pending token.

        Level 1 holds the top_k children of the root. Then `depth` times: the top_k likeliest
        nodes of the newest level (by cumulative log-probability) are fed to the head and
        each brings its top_k children as the next level. The tree keeps the `total_token - 1`
        likeliest candidates (the root is the first of the total, as in the reference); an
        ancestor scores at least as high as its descendants, so they form a tree.

        `threshold` < 1 is MMSpec's confidence variant: level 1 is always expanded; after each
        expansion a row stops growing once no node of the newest level has a cumulative
        probability above it, and keeps only the nodes above it (but at least top_k, at most
        total_token - 1).
        """
        b, dev = logp.shape[0], logp.device
        log_t = math.log(threshold) if threshold < 1.0 else None
        start = self.kv.length
        top = logp.topk(top_k, dim=-1)
        # host copies are read once per level: per-row and per-element reads would each be
        # a device op (a sync on a GPU)
        cands = [
            [_Node(t, -1, s, 1) for t, s in zip(row_tokens, row_scores)]
            for row_tokens, row_scores in zip(top.indices.tolist(), top.values.tolist())
        ]
        # MMSpec expands level 1 whatever its scores, then tests the threshold after each level
        grows = [True] * b
        frontier = [list(range(top_k))] * b  # per row: candidate indices of the newest level
        tokens, scores = top.indices, top.values
        parent_hidden = hidden[:, None, :].expand(-1, top_k, -1)
        anc = torch.zeros(b, top_k, 0, dtype=torch.bool, device=dev)
        for d in range(1, depth + 1):
            if not any(grows):
                break
            lp, out, own = self._level(tokens, parent_hidden, anc, d)
            child = lp.topk(top_k, dim=-1)  # (b, k, k)
            cum = (scores[:, :, None] + child.values).flatten(1)  # (b, k * k)
            child_tokens = child.indices.flatten(1)
            level_tokens, level_cum = child_tokens.tolist(), cum.tolist()
            base = [len(c) for c in cands]  # where this level's candidates start, per row
            for i in range(b):
                if not grows[i]:  # stopped rows are computed along, never extended
                    continue
                parents = [f for f in frontier[i] for _ in range(top_k)]
                cands[i] += [
                    _Node(t, p, s, d + 1) for t, p, s in zip(level_tokens[i], parents, level_cum[i])
                ]
                grows[i] = log_t is None or max(level_cum[i]) >= log_t
            if d == depth:
                break
            best = cum.topk(top_k, dim=-1).indices  # (b, k) into this level's k * k
            parent_of = best // top_k  # the node of this level each new frontier node is under
            frontier = [[at + j for j in row] for at, row in zip(base, best.tolist())]
            tokens, scores = child_tokens.gather(1, best), cum.gather(1, best)
            anc = own.gather(1, parent_of[:, :, None].expand(-1, -1, own.shape[-1]))
            parent_hidden = out.gather(1, parent_of[:, :, None].expand(-1, -1, out.shape[-1]))
        self.kv.crop(start)
        trees = []
        for c in cands:
            keep = total_token - 1
            if log_t is not None:
                above = sum(n.score > log_t for n in c)
                keep = min(keep, max(above, top_k))
            trees.append(_select(c, keep))
        return trees

    def static(
        self, logp: torch.Tensor, hidden: torch.Tensor, choices: Sequence[Sequence[int]]
    ) -> list[DraftTree]:
        """A fixed tree (EAGLE-1, Medusa style): choice (c1, c2, ...) is the c1-th likeliest
        child of the root, then its c2-th likeliest child, and so on. `choices` must hold
        every prefix of every choice."""
        b, dev = logp.shape[0], logp.device
        start = self.kv.length
        paths = sorted({tuple(c) for c in choices}, key=lambda c: (len(c), c))
        index = {p: i for i, p in enumerate(paths)}
        missing = [p for p in paths if len(p) > 1 and p[:-1] not in index]
        if missing:
            raise ValueError(f"tree choices miss the parents of {missing[:3]}")
        width = max(max(p) for p in paths) + 1
        tokens = torch.zeros(b, len(paths), dtype=torch.long, device=dev)
        first = logp.topk(width, dim=-1).indices
        level = [p for p in paths if len(p) == 1]
        for p in level:
            tokens[:, index[p]] = first[:, p[0]]
        # per fed node: its ancestors-or-self over the tree slots, and its head output
        own_of: dict[tuple[int, ...], torch.Tensor] = {}
        hidden_of: dict[tuple[int, ...], torch.Tensor] = {(): hidden}
        slots = 0
        depth = 1
        while True:
            parents = [p for p in level if any(c[:-1] == p for c in paths if len(c) == depth + 1)]
            if not parents:
                break
            none = torch.zeros(b, 0, dtype=torch.bool, device=dev)  # children of the root
            above = [own_of.get(p[:-1], none) for p in parents]
            anc = torch.stack([F.pad(x, (0, slots - x.shape[-1])) for x in above], dim=1)
            ph = torch.stack([hidden_of[p[:-1]] for p in parents], dim=1)
            lp, out, own = self._level(tokens[:, [index[p] for p in parents]], ph, anc, depth)
            top = lp.topk(width, dim=-1).indices  # (b, n, width)
            for j, p in enumerate(parents):
                own_of[p], hidden_of[p] = own[:, j], out[:, j]
            slots += len(parents)
            depth += 1
            level = [c for c in paths if len(c) == depth]
            for c in level:
                tokens[:, index[c]] = top[:, parents.index(c[:-1]), c[-1]]
        self.kv.crop(start)
        parent_idx = [index[p[:-1]] if len(p) > 1 else -1 for p in paths]
        return [DraftTree(tokens[i].tolist(), parent_idx) for i in range(b)]


def _select(cands: list[_Node], total: int) -> DraftTree:
    """The `total` likeliest candidates as a DraftTree (parents first, likeliest child first)."""
    order = sorted(range(len(cands)), key=lambda i: (-cands[i].score, cands[i].depth, i))
    kept: set[int] = set()
    for i in order:
        if len(kept) == total:
            break
        if cands[i].parent < 0 or cands[i].parent in kept:
            kept.add(i)
    chosen = sorted(kept, key=lambda i: (cands[i].depth, -cands[i].score, i))
    index = {c: n for n, c in enumerate(chosen)}
    return DraftTree(
        [cands[c].token for c in chosen],
        [index[cands[c].parent] if cands[c].parent >= 0 else -1 for c in chosen],
    )
