"""Token Recycling without a model: the adjacency matrix and the tree walk against brute force."""

from __future__ import annotations

import collections
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmspec.methods.recycling  # noqa: F401  (runs @register)
from mmspec.methods.base import DraftContext, StepOutcome
from mmspec.methods.recycling import (
    TEMPLATE_2_2_2,
    UNSEEN,
    TokenRecycling,
    expand,
    template,
)
from mmspec.methods.registry import get_drafter
from mmspec.methods.tree import DraftTree


class _FakeModel:
    def __init__(self, vocab: int) -> None:
        self.head = torch.nn.Linear(2, vocab, bias=False)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


def _drafter(vocab: int, **kwargs: object) -> TokenRecycling:
    drafter = TokenRecycling(**kwargs)  # type: ignore[arg-type]
    drafter.load(SimpleNamespace(model=_FakeModel(vocab), device=torch.device("cpu")))  # type: ignore[arg-type]
    return drafter


def _ctx(roots: list[int], rows: list[int] | None = None) -> DraftContext:
    return DraftContext(
        rows=rows if rows is not None else list(range(len(roots))),
        tokens=[[7, r] for r in roots],  # a one-token "prompt", then the pending root
        prompt_lens=[1] * len(roots),
    )


def _peaked(vocab: int, order: list[int]) -> torch.Tensor:
    """Logits row whose ranking is `order` first, then the remaining tokens by id."""
    rest = [t for t in range(vocab) if t not in order]
    logits = torch.empty(vocab)
    for rank, tok in enumerate([*order, *rest]):
        logits[tok] = float(vocab - rank)
    return logits


def _path_walk(
    paths: list[tuple[int, ...]], adj: list[list[int]], root: int
) -> list[tuple[int, ...]]:
    """Kept template paths, the slow way: walk each path from the root, then drop repeats."""
    token: dict[tuple[int, ...], int] = {(): root}
    kept: list[tuple[int, ...]] = []
    for path in paths:
        tok = root
        for c in path:  # every prefix is walked again from the root
            tok = adj[tok][c]
            if tok == UNSEEN:
                break
        if tok == UNSEEN or path[:-1] not in token:
            continue
        earlier = [token[s] for s in kept if s[:-1] == path[:-1]]
        if tok in earlier:
            continue
        token[path] = tok
        kept.append(path)
    return kept


# ---- the template ------------------------------------------------------------------------


def test_template_2_2_2_is_specbench_tree() -> None:
    paths = template("2.2.2", draft_len=10)
    assert len(paths) == len(set(paths)) == 80
    assert collections.Counter(map(len, paths)) == {1: 8, 2: 21, 3: 25, 4: 15, 5: 8, 6: 3}
    assert paths[:3] == [(0,), (1,), (2,)] and paths[-1] == (0, 0, 0, 1, 0, 0)
    for i, p in enumerate(paths):
        assert len(p) == 1 or p[:-1] in paths[:i]  # parents first
        # lowering any choice stays in the tree: dropping a repeated sibling (a higher choice
        # under the same token) drops only paths its kept twin also drafts
        for j in range(len(p)):
            for lower in range(p[j]):
                assert (*p[:j], lower, *p[j + 1 :]) in paths
    assert template("chain", draft_len=3) == [(0,), (0, 0), (0, 0, 0)]
    assert tuple(paths) == TEMPLATE_2_2_2


def test_distinct_rows_expand_to_all_80_nodes() -> None:
    vocab = 50
    gen = torch.Generator().manual_seed(0)
    adj = torch.stack([torch.randperm(vocab, generator=gen)[:8] for _ in range(vocab)])
    tree, source = expand(template("2.2.2", 10), adj, root=3)
    paths = list(TEMPLATE_2_2_2)
    assert len(tree) == 80 and source == list(range(80))
    assert tree.depths == [len(p) for p in paths]
    for i, p in enumerate(paths):
        parent = tree.parents[i]
        assert parent == (paths.index(p[:-1]) if len(p) > 1 else -1)
        assert tree.tokens[i] == int(adj[3 if parent < 0 else tree.tokens[parent], p[-1]])


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    vocab=st.integers(2, 12),
    tree=st.sampled_from(["2.2.2", "chain"]),
    draft_len=st.integers(1, 12),
)
def test_expand_equals_path_walk(
    data: st.DataObject, vocab: int, tree: str, draft_len: int
) -> None:
    # a small vocabulary forces repeated siblings; some rows are still unseen
    row = st.one_of(
        st.just([UNSEEN] * 8), st.lists(st.integers(0, vocab - 1), min_size=8, max_size=8)
    )
    adj = data.draw(st.lists(row, min_size=vocab, max_size=vocab))
    root = data.draw(st.integers(0, vocab - 1))
    paths = template(tree, draft_len)

    got, source = expand(paths, torch.tensor(adj, dtype=torch.long), root)

    kept = _path_walk(paths, adj, root)
    assert [paths[i] for i in source] == kept
    assert got.depths == [len(p) for p in kept]
    assert got.parents == [kept.index(p[:-1]) if len(p) > 1 else -1 for p in kept]
    for i, p in enumerate(kept):
        tok = root
        for c in p:
            tok = adj[tok][c]
        assert got.tokens[i] == tok
    for node in range(-1, len(got)):
        children = [got.tokens[c] for c in got.children(node)]
        assert len(children) == len(set(children))


def test_chain_follows_top1_and_stops_at_unseen() -> None:
    drafter = _drafter(20, tree="chain", draft_len=4)
    for tok in range(10):
        drafter.adjacency[tok] = torch.tensor([tok + 1, 0, 0, 0, 0, 0, 0, 0])
    assert drafter.propose(_ctx([2]))[0].tokens == [3, 4, 5, 6]
    assert drafter.propose(_ctx([8]))[0].tokens == [9, 10]  # row 10 was never seen
    assert drafter.propose(_ctx([15]))[0].tokens == []
    chain = drafter.propose(_ctx([0]))[0]
    assert chain.parents == [-1, 0, 1, 2]


# ---- the adjacency matrix ----------------------------------------------------------------


@st.composite
def _steps(draw: st.DrawFn, vocab: int) -> list[tuple[list[int], list[DraftTree], torch.Tensor]]:
    """Verification steps: roots, trees and (active, q, vocab) logits with distinct values."""
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        active = draw(st.integers(1, 3))
        roots = draw(st.lists(st.integers(0, vocab - 1), min_size=active, max_size=active))
        trees = []
        for _ in range(active):
            n = draw(st.integers(0, 5))
            tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
            parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
            trees.append(DraftTree(tokens, parents))
        q = 1 + max(len(t) for t in trees)
        perm = st.permutations(list(range(vocab)))
        logits = torch.tensor(
            [[draw(perm) for _ in range(q)] for _ in range(active)], dtype=torch.float32
        )
        steps.append((roots, trees, logits))
    return steps


@settings(max_examples=200, deadline=None)
@given(data=st.data(), vocab=st.integers(2, 9), k=st.integers(1, 8))
def test_adjacency_equals_slow_reference(data: st.DataObject, vocab: int, k: int) -> None:
    k = min(k, vocab)
    drafter = _drafter(vocab, tree="chain", topk=k)
    slow: dict[int, list[int]] = {}
    for roots, trees, logits in data.draw(_steps(vocab)):
        ctx = _ctx(roots)
        drafter.update(ctx, StepOutcome(trees, [[] for _ in roots], [[] for _ in roots], logits))
        for i, (root, tree) in enumerate(zip(roots, trees)):
            # root then each node, row by row; padding q-indices past the tree are not read
            for q, tok in enumerate([root, *tree.tokens]):
                row = logits[i, q].tolist()
                slow[tok] = sorted(range(vocab), key=lambda t: -row[t])[:k]
    expected = [slow.get(t, [UNSEEN] * k) for t in range(vocab)]
    assert drafter.adjacency.tolist() == expected


# ---- the drafter ---------------------------------------------------------------------------


def test_learns_from_verification_and_keeps_it_across_batches() -> None:
    vocab = 30
    drafter = _drafter(vocab)
    assert drafter.adjacency.shape == (vocab, 8) and drafter.adjacency.dtype == torch.long
    drafter.begin(_ctx([5, 6]))
    assert [len(t) for t in drafter.propose(_ctx([5, 6]))] == [0, 0]  # nothing seen yet

    # row 0 fed 5 with tree 5 -> 11 (node 0) ; row 1 fed 6 with an empty tree (padding q-index)
    trees = [DraftTree.chain([11]), DraftTree.empty()]
    logits = torch.stack(
        [
            torch.stack([_peaked(vocab, [11, 12]), _peaked(vocab, [20, 21])]),
            torch.stack([_peaked(vocab, [1, 2]), _peaked(vocab, [25])]),  # second is padding
        ]
    )
    drafter.update(_ctx([5, 6]), StepOutcome(trees, [[0], []], [[11, 20], [1]], logits))
    assert drafter.adjacency[5, :2].tolist() == [11, 12]
    assert drafter.adjacency[11, :2].tolist() == [20, 21]
    assert drafter.adjacency[6, :2].tolist() == [1, 2]
    assert drafter.adjacency[25].tolist() == [UNSEEN] * 8  # a padding position's token

    # a new batch, another batch row: the matrix is keyed by token and outlives the batch
    drafter.begin(_ctx([5], rows=[3]))
    tree = drafter.propose(_ctx([5], rows=[3]))[0]
    assert tree.tokens[:8] == _peaked(vocab, [11, 12]).topk(8).indices.tolist()
    assert tree.parents[:8] == [-1] * 8
    below_11 = [tree.tokens[c] for c in tree.children(0)]
    assert below_11 == _peaked(vocab, [20, 21]).topk(8).indices.tolist()
    assert tree.probs is None  # deterministic drafts


def test_last_write_wins_within_a_step() -> None:
    vocab = 10
    drafter = _drafter(vocab, tree="chain", topk=2)
    # token 4 is the root of row 0 and a node of row 1: row 1's write comes later
    trees = [DraftTree.empty(), DraftTree.chain([4, 4])]
    logits = torch.stack(
        [
            torch.stack([_peaked(vocab, [1, 2])] * 3),
            torch.stack([_peaked(vocab, [3]), _peaked(vocab, [5]), _peaked(vocab, [6, 7])]),
        ]
    )
    drafter.update(_ctx([4, 9]), StepOutcome(trees, [[], []], [[1], [3]], logits))
    assert drafter.adjacency[4].tolist() == [6, 7]
    assert drafter.adjacency[9, 0].item() == 3


def test_registered_and_validates_kwargs() -> None:
    assert get_drafter("recycling") is TokenRecycling
    assert TokenRecycling.training_free and not TokenRecycling.vision_aware
    with pytest.raises(ValueError, match=re.escape("tree must be one of 2.2.2, chain")):
        TokenRecycling(tree="2.2")
    with pytest.raises(ValueError, match="draft_len >= 1"):
        TokenRecycling(tree="chain", draft_len=0)
    with pytest.raises(ValueError, match="topk >= 1"):
        TokenRecycling(topk=0)
    with pytest.raises(ValueError, match="needs topk >= 8"):
        TokenRecycling(tree="2.2.2", topk=4)
    assert len(TokenRecycling(tree="chain", topk=1).paths) == 10
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        _drafter(4, topk=8)
