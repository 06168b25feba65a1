"""SAM decoding without a model: the suffix automaton and the drafter against brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmspec.methods.sam  # noqa: F401  (runs @register)
from mmspec.methods.base import DraftContext, StepOutcome
from mmspec.methods.registry import get_drafter
from mmspec.methods.sam import SuffixAutomaton, SuffixAutomatonDrafter
from mmspec.methods.tree import DraftTree

# a small alphabet makes repeats, and so long matches and clones, frequent
seqs = st.lists(st.integers(0, 2), max_size=40)
chunks = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=5), max_size=12)


# ---- brute force: the definitions the automaton must meet -----------------------------------


def is_substring(sub: list[int], seq: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def brute_match_length(seq: list[int]) -> int:
    """Longest suffix that also ends before the end of `seq`."""
    n = len(seq)
    for length in range(n - 1, 0, -1):
        if any(seq[end - length : end] == seq[n - length :] for end in range(length, n)):
            return length
    return 0


def brute_first_end(seq: list[int], length: int) -> int:
    """End (exclusive) of the first occurrence of the suffix of `length` tokens."""
    n = len(seq)
    return next(e for e in range(length, n + 1) if seq[e - length : e] == seq[n - length :])


def brute_continuation(seq: list[int], want: int) -> list[int]:
    """What the drafter proposes, by definition.

    The up to `want` tokens after the first occurrence of the longest earlier-ending suffix;
    if fewer than `want` follow it, after the first occurrence of the longest shorter suffix
    that has `want` tokens after it, or of the one-token suffix when none has.
    """
    longest = brute_match_length(seq)
    if longest == 0:
        return []
    for length in range(longest, 0, -1):
        end = brute_first_end(seq, length)
        if len(seq) - end >= want:
            break
    return seq[end : end + want]


# ---- the automaton -----------------------------------------------------------------------


@given(seqs, st.lists(st.lists(st.integers(0, 3), max_size=8), max_size=20))
def test_recognises_exactly_the_substrings(seq: list[int], queries: list[list[int]]) -> None:
    sam = SuffixAutomaton(seq)
    for i in range(len(seq) + 1):
        for j in range(i, len(seq) + 1):
            assert seq[i:j] in sam
    for q in queries:  # token 3 never occurs: those queries are non-substrings
        assert (q in sam) == is_substring(q, seq)


@given(seqs)
def test_state_and_edge_counts_are_linear(seq: list[int]) -> None:
    sam = SuffixAutomaton(seq)
    n = len(seq)
    assert sam.num_states() <= max(2 * n - 1, n + 1)
    if n >= 3:
        assert sum(len(e) for e in sam.next) <= 3 * n - 4


@given(st.lists(st.integers(0, 2), min_size=1, max_size=8), chunks, st.integers(1, 8))
def test_incremental_match_and_continuation_equal_brute_force(
    start: list[int], steps: list[list[int]], want: int
) -> None:
    sam = SuffixAutomaton(start)
    seq = list(start)
    for chunk in [[], *steps]:
        sam.extend(chunk)
        seq += chunk
        assert sam.tokens == seq
        assert sam.match_length() == brute_match_length(seq)
        # one token never needs the walk: the first occurrence of the longest match
        longest = brute_match_length(seq)
        first = [seq[brute_first_end(seq, longest)]] if longest else []
        assert sam.continuation(1) == first
        draft = sam.continuation(want)
        assert draft == brute_continuation(seq, want)
        assert len(draft) <= want


def test_repetition_loop_drafts_the_rest_of_the_loop() -> None:
    loop = [5, 6, 7]
    sam = SuffixAutomaton([1, 2, *loop * 4])
    assert sam.match_length() == 9  # three periods end one period earlier
    # the longest match's first occurrence has one period after it; the walk moves to shorter
    # suffixes, which first occurred earlier, until enough of the loop follows
    assert sam.continuation(6) == [*loop, *loop]
    assert sam.continuation(100) == loop * 3


def test_long_runs_stay_linear() -> None:
    sam = SuffixAutomaton([4] * 5000)
    assert sam.num_states() == 5001  # a run of one token never clones
    assert sam.match_length() == 4999
    assert sam.continuation(3) == [4, 4, 4]


# ---- the drafter -------------------------------------------------------------------------


def test_registered_and_validates_args() -> None:
    assert get_drafter("sam") is SuffixAutomatonDrafter
    drafter = SuffixAutomatonDrafter()
    assert (drafter.n_predicts, drafter.threshold) == (40, 5)
    for kwargs, msg in [
        ({"n_predicts": 1}, "n_predicts >= 2"),
        ({"n_predicts": 4.0}, "n_predicts >= 2"),
        ({"threshold": 0}, "threshold >= 1"),
        ({"threshold": True}, "threshold >= 1"),
    ]:
        with pytest.raises(ValueError, match=msg):
            SuffixAutomatonDrafter(**kwargs)  # type: ignore[arg-type]


def test_propose_update_and_rows_dropping_out() -> None:
    drafter = SuffixAutomatonDrafter(n_predicts=4, threshold=3)
    phrase = [10, 11, 12, 13, 14, 15]
    tokens = [
        [*phrase, 99, 10, 11, 12],  # matches [10, 11, 12]: draft what followed it
        [*phrase, 99, 11, 12],  # match of 2 < threshold 3: AR step
        [1, 2, 3, 4],  # nothing repeats
    ]
    ctx = DraftContext(rows=[0, 1, 2], tokens=tokens, prompt_lens=[4, 4, 4])
    drafter.begin(ctx)
    trees = drafter.propose(ctx)
    assert [t.tokens for t in trees] == [[13, 14, 15], [], []]
    assert trees[0].parents == [-1, 0, 1]  # a chain

    # row 0 accepts 13, 14 then a bonus 7; row 1's bonus makes its match [11, 12, 13] long
    # enough; row 2 emits an EOS and leaves the batch
    emitted = [[13, 14, 7], [13], [0]]
    drafter.update(ctx, StepOutcome(trees, [[0, 1], [], []], emitted, torch.zeros(3, 4, 4)))
    ctx = DraftContext(
        rows=[0, 1],
        tokens=[tokens[0] + emitted[0], tokens[1] + emitted[1]],
        prompt_lens=[4, 4],
    )
    trees = drafter.propose(ctx)
    assert [t.tokens for t in trees] == [[], [14, 15, 99]]
    assert sorted(drafter._automata) == [0, 1]  # row 2's automaton is gone

    # the engine hands over rows by batch index: row 1 alone now sits at position 0
    emitted = [[14, 15, 99]]
    drafter.update(
        DraftContext(rows=[1], tokens=[ctx.tokens[1]], prompt_lens=[4]),
        StepOutcome([trees[1]], [[0, 1, 2]], emitted, torch.zeros(1, 4, 4)),
    )
    seq = ctx.tokens[1] + emitted[0]
    trees = drafter.propose(DraftContext(rows=[1], tokens=[seq], prompt_lens=[4]))
    assert [t.tokens for t in trees] == [brute_continuation(seq, 3)]
    assert drafter._automata[1].tokens == seq


def test_begin_resets_rows_of_the_previous_batch() -> None:
    drafter = SuffixAutomatonDrafter(threshold=1)
    drafter.begin(DraftContext(rows=[0], tokens=[[1, 2, 1]], prompt_lens=[2]))
    assert [t.tokens for t in drafter.propose(DraftContext([0], [[1, 2, 1]], [2]))] == [[2, 1]]
    ctx = DraftContext(rows=[0], tokens=[[5, 6, 5]], prompt_lens=[2])
    drafter.begin(ctx)
    assert [t.tokens for t in drafter.propose(ctx)] == [[6, 5]]


@settings(max_examples=60)
@given(
    st.lists(seqs.filter(bool), min_size=1, max_size=3),
    st.lists(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=4)), max_size=8),
    st.integers(2, 6),
    st.integers(1, 4),
)
def test_drafter_equals_brute_force_over_steps(
    prompts: list[list[int]], steps: list[list[list[int]]], n_predicts: int, threshold: int
) -> None:
    """Random rows, random emitted tokens, rows leaving when their step list runs out."""
    drafter = SuffixAutomatonDrafter(n_predicts=n_predicts, threshold=threshold)
    rows = list(range(len(prompts)))
    tokens = [list(p) for p in prompts]
    drafter.begin(DraftContext(rows, [list(t) for t in tokens], [len(p) for p in prompts]))
    for step in steps:
        live = [r for r in rows if r < len(step)] or rows[:1]
        ctx = DraftContext(live, [list(tokens[r]) for r in live], [1] * len(live))
        trees = drafter.propose(ctx)
        for r, tree in zip(live, trees):
            seq = tokens[r]
            want = brute_continuation(seq, n_predicts - 1)
            assert tree.tokens == (want if brute_match_length(seq) >= threshold else [])
        emitted = [step[r] if r < len(step) else [0] for r in live]
        paths = [[] for _ in live]
        drafter.update(ctx, StepOutcome(trees, paths, emitted, torch.zeros(len(live), 1, 3)))
        for r, e in zip(live, emitted):
            tokens[r] += e
        rows = live


def test_propose_catches_up_when_update_was_skipped() -> None:
    drafter = SuffixAutomatonDrafter(n_predicts=3, threshold=2)
    drafter.begin(DraftContext([0], [[1, 2, 3]], [3]))
    trees = drafter.propose(DraftContext([0], [[1, 2, 3, 4, 1, 2]], [3]))
    assert trees == [DraftTree.chain([3, 4])]
