"""Lookahead: the n-gram trie against brute force, the draft tree's shape, the drafter's life cycle.

No model here; that greedy lookahead equals `ar` is checked in tests/test_lossless.py.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmspec.methods.lookahead  # noqa: F401 (runs @register("lookahead"))
from mmspec.methods.base import DraftContext, StepOutcome
from mmspec.methods.lookahead import Lookahead, NgramTrie, best_continuations, locate
from mmspec.methods.registry import get_drafter
from mmspec.methods.tree import DraftTree

# a small alphabet makes repeats, shared prefixes and ties common
tokens = st.lists(st.integers(0, 3), max_size=30)
streams = st.lists(tokens, min_size=1, max_size=3)


def occurrences(data: list[list[int]], gram: list[int]) -> int:
    """Brute force: how often `gram` occurs inside one of the streams."""
    n = len(gram)
    return sum(s[i : i + n] == gram for s in data for i in range(len(s) - n + 1))


def trie_paths(
    trie: NgramTrie, node: int = NgramTrie.ROOT, prefix: tuple[int, ...] = ()
) -> dict[tuple[int, ...], int]:
    """Every n-gram stored below `node`, with its count."""
    out: dict[tuple[int, ...], int] = {}
    for child in trie.children(node):
        path = (*prefix, trie.tokens[child])
        out[path] = trie.counts[child]
        out.update(trie_paths(trie, child, path))
    return out


def node_paths(tree: DraftTree) -> list[list[int]]:
    """Tokens from the root down to each node."""
    paths: list[list[int]] = []
    for tok, parent in zip(tree.tokens, tree.parents):
        paths.append([*(paths[parent] if parent >= 0 else []), tok])
    return paths


def build(data: list[list[int]], max_len: int, cuts: st.DataObject | None = None) -> NgramTrie:
    """A trie of the streams, each fed in random chunks when `cuts` draws them."""
    trie = NgramTrie(max_len)
    for s in data:
        start = 0
        while start < len(s):
            step = cuts.draw(st.integers(1, len(s) - start)) if cuts else len(s)
            trie.extend(s[start : start + step])
            start += step
        trie.cut()
    return trie


# ---- the trie ---------------------------------------------------------------------------------


@given(data=streams, max_len=st.integers(1, 5), cuts=st.data())
def test_trie_counts_every_ngram_and_nothing_else(
    data: list[list[int]], max_len: int, cuts: st.DataObject
) -> None:
    trie = build(data, max_len, cuts)
    expected = {
        tuple(s[i : i + n])
        for s in data
        for n in range(1, max_len + 1)
        for i in range(len(s) - n + 1)
    }
    stored = trie_paths(trie)
    assert set(stored) == expected  # no n-gram spans a cut, none is longer than max_len
    assert all(c == occurrences(data, list(g)) for g, c in stored.items())
    assert trie.size == len(expected)
    assert trie.count([9]) == 0 and trie.find([9]) == -1


@given(data=streams, max_len=st.integers(1, 5))
def test_halving_drops_singletons(data: list[list[int]], max_len: int) -> None:
    trie = build(data, max_len)
    halved = trie.halved()
    expected = {g: c // 2 for g, c in trie_paths(trie).items() if c > 1}
    assert trie_paths(halved) == expected and halved.size == len(expected)
    # siblings keep the order they were first seen in
    assert [halved.tokens[c] for c in halved.children(halved.ROOT)] == [
        trie.tokens[c] for c in trie.children(trie.ROOT) if trie.counts[c] > 1
    ]


# ---- the draft tree ---------------------------------------------------------------------------


@settings(deadline=None)
@given(
    data=streams,
    suffix=st.lists(st.integers(0, 3), max_size=2),
    max_nodes=st.integers(1, 12),
    max_depth=st.integers(1, 5),
)
def test_tree_is_the_top_continuations_of_the_suffix(
    data: list[list[int]], suffix: list[int], max_nodes: int, max_depth: int
) -> None:
    trie = build(data, len(suffix) + max_depth)  # long enough for every count to be exact
    cursor = locate([(trie, trie.ROOT, 1.0)], suffix)
    if not cursor:
        assert occurrences(data, suffix) == 0
        return
    tree = best_continuations(cursor, max_nodes, max_depth)
    DraftTree(tree.tokens, tree.parents)  # raises unless parents come before children
    assert len(tree) <= max_nodes and max(tree.depths, default=0) <= max_depth

    def count(path: list[int]) -> int:
        return occurrences(data, suffix + path)

    paths = node_paths(tree)
    assert all(count(p) > 0 for p in paths)  # every path really follows the suffix
    for node in [-1, *range(len(tree))]:
        kids = tree.children(node)
        kid_tokens = [tree.tokens[k] for k in kids]
        assert len(set(kid_tokens)) == len(kid_tokens)
        counts = [count(paths[k]) for k in kids]
        assert counts == sorted(counts, reverse=True)
        # a continuation left out may not beat one taken, and only a full tree leaves any out
        depth = tree.depths[node] if node >= 0 else 0
        if depth == max_depth:
            continue
        above = paths[node] if node >= 0 else []
        for tok in set(range(4)) - set(kid_tokens):
            missed = count([*above, tok])
            if missed:
                assert len(tree) == max_nodes
                assert missed <= min(count(p) for p in paths)


def test_ties_keep_the_order_first_seen() -> None:
    trie = NgramTrie(4)
    trie.extend([1, 2, 3, 1, 4, 5])
    tree = best_continuations(locate([(trie, trie.ROOT, 1.0)], [1]), 64, 3)
    assert tree.tokens == [2, 4, 3, 5, 1] and tree.parents == [-1, -1, 0, 1, 2]


# ---- the drafter ------------------------------------------------------------------------------


def _ctx(rows: list[int], seqs: list[list[int]], prompt_lens: list[int] | None = None):
    return DraftContext(rows, seqs, prompt_lens or [len(s) - 1 for s in seqs])


def _outcome(emitted: list[list[int]]) -> StepOutcome:
    # lookahead reads only the emitted tokens
    trees = [DraftTree.empty() for _ in emitted]
    return StepOutcome(trees, [[] for _ in emitted], emitted, torch.empty(0))


def _draft(drafter: Lookahead, seq: list[int]) -> DraftTree:
    ctx = _ctx([0], [seq])
    drafter.begin(ctx)
    return drafter.propose(ctx)[0]


def test_registered_with_mmspec_defaults() -> None:
    drafter = get_drafter("lookahead")()
    assert isinstance(drafter, Lookahead) and drafter.name == "lookahead"
    assert (drafter.decoding_length, drafter.branch_length) == (64, 12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decoding_length": 0}, "decoding_length"),
        ({"branch_length": -1}, "branch_length"),
        ({"branch_length": 2.5}, "branch_length"),
        ({"max_query_length": True}, "max_query_length"),
        ({"global_trie": "yes"}, "global_trie"),
        ({"global_max_nodes": 0}, "global_max_nodes"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Lookahead(**kwargs)


def test_longest_suffix_wins_when_it_offers_a_branch() -> None:
    drafter = Lookahead(branch_length=3)  # enough: 2 draft tokens
    # (5, 1) was followed by 2 3 1: a branch's worth, so 1's other continuation (4 ...) is out
    assert _draft(drafter, [5, 1, 2, 3, 1, 4, 4, 4, 5, 1]).tokens == [2, 3, 1]
    # exactly enough: (5, 1) was followed by 5 1 only
    assert _draft(drafter, [1, 2, 3, 1, 4, 5, 1, 5, 1]).tokens == [5, 1]


def test_short_match_falls_back_to_the_last_token() -> None:
    drafter = Lookahead(branch_length=3)
    # (5, 1) has been seen only at the end, with nothing after it; 1 alone has two branches
    tree = _draft(drafter, [1, 2, 3, 1, 4, 5, 1])
    assert tree.tokens == [2, 4, 3, 5, 1, 1] and tree.parents == [-1, -1, 0, 1, 2, 3]


def test_nothing_seen_after_the_suffix_drafts_nothing() -> None:
    assert len(_draft(Lookahead(), [1, 2, 3, 4])) == 0


def test_budget_and_depth_hold() -> None:
    rng = random.Random(0)
    bushy = [rng.randrange(3) for _ in range(500)]  # every suffix has many futures
    tree = _draft(Lookahead(), bushy)
    assert len(tree) == 64 and max(tree.depths) <= 12
    small = _draft(Lookahead(decoding_length=5, branch_length=2), bushy)
    assert len(small) == 5 and max(small.depths) == 2
    cycle = list(range(30)) * 3  # one future, as long as you like
    assert _draft(Lookahead(), cycle).tokens == list(range(12))


def test_update_learns_emitted_tokens_per_row_as_rows_finish() -> None:
    drafter = Lookahead()
    seqs = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    ctx = _ctx([0, 1, 2], seqs)
    drafter.begin(ctx)
    drafter.update(ctx, _outcome([[20, 21], [30, 31], [40, 41]]))
    for s, e in zip(seqs, [[20, 21], [30, 31], [40, 41]]):
        s.extend(e)
    # row 1 finished; rows 0 and 2 come back to their own earlier text
    ctx = _ctx([0, 2], [seqs[0], seqs[2]])
    drafter.update(ctx, _outcome([[4], [12]]))
    seqs[0].append(4)
    seqs[2].append(12)
    assert [t.tokens[:2] for t in drafter.propose(ctx)] == [[20, 21], [40, 41]]


@settings(deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=3),
    steps=st.data(),
    query=st.integers(1, 3),
)
def test_incremental_updates_draft_like_a_fresh_start(
    prompts: list[list[int]], steps: st.DataObject, query: int
) -> None:
    """A drafter fed step by step proposes what one built from the whole text would."""
    kwargs = {"decoding_length": 6, "branch_length": 3, "max_query_length": query}
    drafter = Lookahead(**kwargs)
    rows, seqs = list(range(len(prompts))), [list(p) for p in prompts]
    ctx = _ctx(rows, seqs)
    drafter.begin(ctx)
    for _ in range(steps.draw(st.integers(1, 6))):
        emitted = [steps.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4)) for _ in rows]
        drafter.update(ctx, _outcome(emitted))
        for s, e in zip(seqs, emitted):
            s.extend(e)
        keep = [i for i in range(len(rows)) if steps.draw(st.booleans()) or i == 0]
        ctx = _ctx([rows[i] for i in keep], [seqs[i] for i in keep])
        rows, seqs = ctx.rows, ctx.tokens
        fresh = Lookahead(**kwargs)
        fresh.begin(ctx)
        assert [(t.tokens, t.parents) for t in drafter.propose(ctx)] == [
            (t.tokens, t.parents) for t in fresh.propose(ctx)
        ]


def test_global_trie_carries_outputs_to_later_requests() -> None:
    def second_request(drafter: Lookahead) -> list[int]:
        first = _ctx([0], [[1, 2, 3]], prompt_lens=[2])
        drafter.begin(first)
        drafter.update(first, _outcome([[7, 8, 9]]))
        second = _ctx([0], [[4, 3]])  # a new prompt that ends where the old output went on
        drafter.begin(second)
        return drafter.propose(second)[0].tokens

    assert second_request(Lookahead()) == []
    assert second_request(Lookahead(global_trie=True)) == [7, 8, 9]


def test_a_row_own_text_outranks_the_global_trie() -> None:
    drafter = Lookahead(global_trie=True)
    for out in ([1, 5, 5, 1, 5], [1, 5]):  # two earlier requests: 1 is followed by 5 thrice
        ctx = _ctx([0], [[0]])
        drafter.begin(ctx)
        drafter.update(ctx, _outcome([out]))
    tree = _draft(drafter, [1, 6, 1])
    assert [tree.tokens[c] for c in tree.children(-1)] == [6, 5]
