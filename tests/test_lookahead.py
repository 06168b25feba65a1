"""Lookahead: the n-gram trie against brute force, MMSpec's cache and retrieval on crafted
sequences, the best_first tree, the drafter's life cycle.

No model here; that greedy lookahead equals `ar` is checked in tests/test_lossless.py. The
MMSpec references are `method/lookahead/common/lookahead_cache.py` (LookaheadCache, Tree) and
`method/lookahead/spec_model_lookahead.py` (SpecModel.specgenerate) at fd33670.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmspec.methods.lookahead  # noqa: F401 (runs @register("lookahead"))
from mmspec.methods.base import DraftContext, StepOutcome
from mmspec.methods.lookahead import (
    RULES,
    Lookahead,
    MMSpecCache,
    NgramTrie,
    best_continuations,
    depth_first,
    first_branch,
    locate,
    mmspec_tree,
)
from mmspec.methods.registry import get_drafter
from mmspec.methods.tree import DraftTree

# a small alphabet makes repeats, shared prefixes and ties common
tokens = st.lists(st.integers(0, 3), max_size=30)
streams = st.lists(tokens, min_size=1, max_size=3)
BEST_FIRST = {"rule": "best_first"}


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


def _ctx(rows: list[int], seqs: list[list[int]], prompt_lens: list[int] | None = None):
    return DraftContext(rows, seqs, prompt_lens or [len(s) - 1 for s in seqs])


def _outcome(emitted: list[list[int]]) -> StepOutcome:
    # lookahead reads only the emitted tokens
    trees = [DraftTree.empty() for _ in emitted]
    return StepOutcome(trees, [[] for _ in emitted], emitted, torch.empty(0))


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


@given(stream=tokens, max_len=st.integers(1, 5), starts=st.data())
def test_add_counts_the_ngrams_starting_where_the_window_starts(
    stream: list[int], max_len: int, starts: st.DataObject
) -> None:
    """Reference: `Tree._put` (each put counts every prefix of the window it is given)."""
    chosen = starts.draw(st.lists(st.integers(0, max(len(stream) - 1, 0)), max_size=10))
    chosen = [p for p in chosen if p < len(stream)]
    trie = NgramTrie(max_len)
    for p in chosen:
        trie.add(stream[p : p + max_len + 3])  # longer windows are clipped to max_len
    expected: dict[tuple[int, ...], int] = {}
    for p in chosen:
        for n in range(1, min(max_len, len(stream) - p) + 1):
            gram = tuple(stream[p : p + n])
            expected[gram] = expected.get(gram, 0) + 1
    assert trie_paths(trie) == expected


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


# ---- MMSpec's cache ---------------------------------------------------------------------------


def test_prompt_windows_start_everywhere_but_at_the_last_token() -> None:
    """Reference: `LookaheadCache.put` (mode input: a window of branch_length tokens after
    each position but the last, cut short by the prompt's end)."""
    cache = MMSpecCache([5, 6, 7, 5, 6], branch_length=2, cut_token=None)
    assert trie_paths(cache.prompt) == {
        (5,): 2, (5, 6): 2, (5, 6, 7): 1,
        (6,): 1, (6, 7): 1, (6, 7, 5): 1,
        (7,): 1, (7, 5): 1, (7, 5, 6): 1,
    }  # fmt: skip
    assert cache.output.size == 0


def test_prompt_is_cut_at_the_first_cut_token() -> None:
    """Reference: `LookaheadCache.put` cuts its tokens at the first of `eos_ids` (2)."""
    prompt = [1, 3, 2, 4, 5, 2, 4]
    assert trie_paths(MMSpecCache(prompt, 3, cut_token=2).prompt) == {(1,): 1, (1, 3): 1}
    assert (2, 4, 5) in trie_paths(MMSpecCache(prompt, 3, cut_token=None).prompt)


def test_output_windows_wait_for_branch_length_tokens() -> None:
    """Reference: `LookaheadCache.stream_put` (a position's window goes in once branch_length
    tokens follow it), fed as `specgenerate` feeds it: the first token, then each step's."""
    cache = MMSpecCache([1, 3], branch_length=3, cut_token=None)
    cache.put([4])
    cache.put([5, 6])
    assert cache.output.size == 0
    cache.put([7])
    assert trie_paths(cache.output) == {(4,): 1, (4, 5): 1, (4, 5, 6): 1, (4, 5, 6, 7): 1}
    cache.put([8, 9])
    assert [cache.output.tokens[c] for c in cache.output.children(NgramTrie.ROOT)] == [4, 5, 6]
    # the prompt and the output are separate streams: nothing spans 3 -> 4
    assert cache.prompt.count([3, 4]) == 0 and cache.output.count([3, 4]) == 0


def test_each_steps_output_is_cut_at_its_cut_token() -> None:
    """Reference: `LookaheadCache.stream_put` cuts each call's tokens at the first eos id and
    appends the rest to the stream: later steps go on as if the cut tokens never were."""
    cache = MMSpecCache([], branch_length=2, cut_token=2)
    for step in ([7, 8], [9, 2, 9, 9], [10, 11]):
        cache.put(step)
    assert set(trie_paths(cache.output)) == {
        (7,), (7, 8), (7, 8, 9), (8,), (8, 9), (8, 9, 10), (9,), (9, 10), (9, 10, 11)
    }  # fmt: skip


def test_prompt_counts_outrank_output_counts() -> None:
    """Reference: `Tree._ravel` ranks siblings by (1 - 1e-4) * input + 1e-4 * output counts
    (`Tree.get`'s output_weight), stable sort: ties stay in the order first seen."""
    cache = MMSpecCache([1, 5, 0, 1, 7, 0], branch_length=2, cut_token=None)
    cache.put([1, 6, 1, 6, 1, 6, 1, 7, 1, 9, 9, 9])
    tree = depth_first(locate(cache.sources, [1]), 64)
    # 7 and 5 once in the prompt, 7 once more in the output; 6 thrice and 9 once in the output
    assert [tree.tokens[c] for c in tree.children(-1)] == [7, 5, 6, 9]


# ---- MMSpec's retrieval -----------------------------------------------------------------------


def _ranked_cache() -> MMSpecCache:
    # below 2: 3 (twice: 3 4, 3 5), then 6 (once); below 2 3: 4 and 5 tie, 4 seen first
    return MMSpecCache([2, 3, 4, 9, 2, 3, 5, 9, 2, 6], branch_length=2, cut_token=None)


def test_depth_first_lists_whole_branches_best_first() -> None:
    """Reference: `Tree._ravel` (depth-first; siblings sorted by count, ties first seen)."""
    tree = depth_first(locate(_ranked_cache().sources, [2]), 64)
    assert tree.tokens == [3, 4, 5, 6] and tree.parents == [-1, 0, 0, -1]


def test_more_nodes_than_decoding_length_draft_nothing() -> None:
    """Reference: `Tree.get`: past max_size nodes its count threshold is built from `None`
    indices and stays 1e9, so `_ravel` skips every node; else max_size counts the root."""
    cursor = locate(_ranked_cache().sources, [2])  # 4 nodes below
    assert depth_first(cursor, 5).tokens == [3, 4, 5, 6]
    assert depth_first(cursor, 4).tokens == [3, 4, 5]
    assert depth_first(cursor, 3).tokens == []


# windows of 4: (1 3) offers only 0; 3 alone offers 6 5 3, 7 5 1 and 0 (7 nodes)
SPARSE_PROMPT = [3, 6, 5, 3, 7, 5, 1, 3, 0]


def _sparse(branch_length: int = 3) -> tuple[MMSpecCache, list[int]]:
    cache = MMSpecCache(SPARSE_PROMPT, branch_length, cut_token=None)
    cache.put([1])
    cache.put([3])
    return cache, [*SPARSE_PROMPT, 1, 3]


def test_without_enough_the_shortest_suffix_decides() -> None:
    """Reference: `LookaheadCache.hier_get`: suffixes longest first, stop at one offering
    branch_length tokens with the root, else keep the last one tried; (0 1 3) is not tried,
    0 starting no window (no `Tree`)."""
    cache, seq = _sparse()
    tree = mmspec_tree(cache.sources, seq, 64, 3, 3)
    assert tree.tokens == [6, 5, 3, 7, 5, 1, 0] and tree.parents == [-1, 0, 1, -1, 3, 4, -1]
    # 3 alone has more than 4 nodes below it: nothing, though (1 3) offered a token
    assert len(mmspec_tree(cache.sources, seq, 4, 3, 3)) == 0


def test_the_longest_suffix_that_offers_enough_wins() -> None:
    """Reference: `LookaheadCache.hier_get` (`s >= branch_length` ends the search)."""
    cache, seq = _sparse(branch_length=2)  # enough: 1 token
    assert mmspec_tree(cache.sources, seq, 64, 2, 2).tokens == [0]
    # the query may span the prompt's end and the output, as the reference's does
    cache = MMSpecCache([1, 2, 3, 4, 1], branch_length=3, cut_token=None)
    cache.put([2])
    assert mmspec_tree(cache.sources, [1, 2, 3, 4, 1, 2], 64, 3, 3).tokens == [3, 4]


def test_mmspec_rule_drafts_the_first_branch_as_a_chain() -> None:
    """Reference: `SpecModel.specgenerate` verifies the flattened tree as one chain: node i + 1
    against the target's prediction at node i, which is right down the first branch only."""
    cache, seq = _sparse()
    chain = first_branch(mmspec_tree(cache.sources, seq, 64, 3, 3))
    assert chain.tokens == [6, 5, 3] and chain.parents == [-1, 0, 1]
    ctx = _ctx([0], [seq], [len(SPARSE_PROMPT)])
    for rule, tokens in (("mmspec", [6, 5, 3]), ("mmspec_tree", [6, 5, 3, 7, 5, 1, 0])):
        drafter = Lookahead(branch_length=3, rule=rule, cut_token=None)
        drafter.begin(_ctx([0], [seq[:-1]], [len(SPARSE_PROMPT)]))
        drafter.update(ctx, _outcome([[3]]))
        assert drafter.propose(ctx)[0].tokens == tokens


# ---- the best_first tree ----------------------------------------------------------------------


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


def _draft(drafter: Lookahead, seq: list[int]) -> DraftTree:
    ctx = _ctx([0], [seq])
    drafter.begin(ctx)
    return drafter.propose(ctx)[0]


def test_registered_with_mmspec_defaults() -> None:
    """Reference: `scripts/*/eval_lookahead_mmspec.sh` (decoding_length 64, branch_length 12)
    and `LookaheadCache.__init__` (eos_ids=(2,)); `hier_get` tries every suffix."""
    drafter = get_drafter("lookahead")()
    assert isinstance(drafter, Lookahead) and drafter.name == "lookahead"
    assert (drafter.decoding_length, drafter.branch_length) == (64, 12)
    assert (drafter.rule, drafter.cut_token, drafter.max_query_length) == ("mmspec", 2, 12)
    assert Lookahead(**BEST_FIRST).max_query_length == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decoding_length": 0}, "decoding_length"),
        ({"branch_length": -1}, "branch_length"),
        ({"branch_length": 2.5}, "branch_length"),
        ({"max_query_length": True}, "max_query_length"),
        ({"global_trie": "yes"}, "global_trie"),
        ({"global_trie": True}, "global_trie"),  # the MMSpec rules stay per request
        ({"global_max_nodes": 0}, "global_max_nodes"),
        ({"rule": "ant"}, "rule"),
        ({"cut_token": "2"}, "cut_token"),
        ({"cut_token": -1}, "cut_token"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Lookahead(**kwargs)


def test_longest_suffix_wins_when_it_offers_a_branch() -> None:
    drafter = Lookahead(branch_length=3, **BEST_FIRST)  # enough: 2 draft tokens
    # (5, 1) was followed by 2 3 1: a branch's worth, so 1's other continuation (4 ...) is out
    assert _draft(drafter, [5, 1, 2, 3, 1, 4, 4, 4, 5, 1]).tokens == [2, 3, 1]
    # exactly enough: (5, 1) was followed by 5 1 only
    assert _draft(drafter, [1, 2, 3, 1, 4, 5, 1, 5, 1]).tokens == [5, 1]


def test_short_match_falls_back_to_the_last_token() -> None:
    drafter = Lookahead(branch_length=3, **BEST_FIRST)
    # (5, 1) has been seen only at the end, with nothing after it; 1 alone has two branches
    tree = _draft(drafter, [1, 2, 3, 1, 4, 5, 1])
    assert tree.tokens == [2, 4, 3, 5, 1, 1] and tree.parents == [-1, -1, 0, 1, 2, 3]


@pytest.mark.parametrize("rule", RULES)
def test_nothing_seen_after_the_suffix_drafts_nothing(rule: str) -> None:
    assert len(_draft(Lookahead(rule=rule), [1, 2, 3, 4])) == 0


def test_budget_and_depth_hold() -> None:
    rng = random.Random(0)
    bushy = [rng.randrange(3) for _ in range(500)]  # every suffix has many futures
    tree = _draft(Lookahead(**BEST_FIRST), bushy)
    assert len(tree) == 64 and max(tree.depths) <= 12
    small = _draft(Lookahead(decoding_length=5, branch_length=2, **BEST_FIRST), bushy)
    assert len(small) == 5 and max(small.depths) == 2
    cycle = list(range(30)) * 3  # one future, as long as you like
    assert _draft(Lookahead(**BEST_FIRST), cycle).tokens == list(range(12))
    # MMSpec's: 28 29 is the longest suffix with branch_length tokens, the root included,
    # below it in a window of 13
    assert _draft(Lookahead(cut_token=None), cycle).tokens == list(range(11))
    tree = _draft(Lookahead(rule="mmspec_tree", cut_token=None), bushy)
    assert 11 <= len(tree) <= 63 and max(tree.depths) <= 12


def test_update_learns_emitted_tokens_per_row_as_rows_finish() -> None:
    drafter = Lookahead(**BEST_FIRST)
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


def test_mmspec_rows_learn_their_own_output_a_branch_late() -> None:
    """Reference: `specgenerate` calls `stream_put` with each step's accepted tokens; its
    `LookaheadCache` then holds a window once branch_length tokens follow it."""
    drafter = Lookahead(branch_length=3)
    seqs = [[7, 4], [8, 5]]  # prompt, then the first token
    ctx = _ctx([0, 1], seqs)
    drafter.begin(ctx)
    expected = ([[], []], [[4, 20], [5, 30]])  # 4 20 4: 4's window waits for 3 tokens after it
    for emitted, drafts in zip(([[20, 4], [30, 5]], [[20], [30]]), expected):
        drafter.update(ctx, _outcome(emitted))
        for s, e in zip(seqs, emitted):
            s.extend(e)
        assert [t.tokens for t in drafter.propose(ctx)] == drafts
    # the best_first rule counts emitted tokens at once
    best_first = Lookahead(branch_length=3, **BEST_FIRST)
    ctx = _ctx([0], [[7, 4]])
    best_first.begin(ctx)
    best_first.update(ctx, _outcome([[20, 4]]))
    assert best_first.propose(_ctx([0], [[7, 4, 20, 4]]))[0].tokens == [20, 4]


@settings(deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=3),
    steps=st.data(),
    query=st.integers(1, 3),
    rule=st.sampled_from(RULES),
)
def test_incremental_updates_draft_like_a_fresh_start(
    prompts: list[list[int]], steps: st.DataObject, query: int, rule: str
) -> None:
    """A drafter fed step by step proposes what one built from the whole text would (with
    nothing cut: a cut token drops the rest of its step's output, so there steps matter)."""
    kwargs = {
        "decoding_length": 6,
        "branch_length": 3,
        "max_query_length": query,
        "rule": rule,
        "cut_token": None,
    }
    drafter = Lookahead(**kwargs)
    plens = [len(p) - 1 for p in prompts]  # the prompt's last token plays the first output
    rows, seqs = list(range(len(prompts))), [list(p) for p in prompts]
    ctx = _ctx(rows, seqs, plens)
    drafter.begin(ctx)
    for _ in range(steps.draw(st.integers(1, 6))):
        emitted = [steps.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4)) for _ in rows]
        drafter.update(ctx, _outcome(emitted))
        for s, e in zip(seqs, emitted):
            s.extend(e)
        keep = [i for i in range(len(rows)) if steps.draw(st.booleans()) or i == 0]
        kept = [rows[i] for i in keep]
        ctx = _ctx(kept, [seqs[i] for i in keep], [plens[r] for r in kept])
        rows, seqs = ctx.rows, ctx.tokens
        fresh = Lookahead(**kwargs)
        fresh.begin(ctx)
        assert [(t.tokens, t.parents) for t in drafter.propose(ctx)] == [
            (t.tokens, t.parents) for t in fresh.propose(ctx)
        ]


@pytest.mark.parametrize("rule", ["mmspec", "best_first"])
def test_each_request_starts_from_its_own_text(rule: str) -> None:
    """MMSpec keeps one `LookaheadCache` for the whole run (`SpecModel.__init__`), so earlier
    samples' text leaks into later drafts; ours is per request."""
    drafter = Lookahead(branch_length=2, rule=rule, cut_token=None)
    first = _ctx([0], [[1, 2, 3, 7]])
    drafter.begin(first)
    drafter.update(first, _outcome([[8, 9, 9]]))
    second = _ctx([0], [[4, 7]])  # a new prompt that ends where the old text went on
    drafter.begin(second)
    assert drafter.propose(second)[0].tokens == []


def test_global_trie_carries_outputs_to_later_requests() -> None:
    def second_request(drafter: Lookahead) -> list[int]:
        first = _ctx([0], [[1, 2, 3]], prompt_lens=[2])
        drafter.begin(first)
        drafter.update(first, _outcome([[7, 8, 9]]))
        second = _ctx([0], [[4, 3]])  # a new prompt that ends where the old output went on
        drafter.begin(second)
        return drafter.propose(second)[0].tokens

    assert second_request(Lookahead(**BEST_FIRST)) == []
    assert second_request(Lookahead(global_trie=True, **BEST_FIRST)) == [7, 8, 9]


def test_a_row_own_text_outranks_the_global_trie() -> None:
    drafter = Lookahead(global_trie=True, **BEST_FIRST)
    for out in ([1, 5, 5, 1, 5], [1, 5]):  # two earlier requests: 1 is followed by 5 thrice
        ctx = _ctx([0], [[0]])
        drafter.begin(ctx)
        drafter.update(ctx, _outcome([out]))
    tree = _draft(drafter, [1, 6, 1])
    assert [tree.tokens[c] for c in tree.children(-1)] == [6, 5]
