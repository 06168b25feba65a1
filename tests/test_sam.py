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


def brute_followed_by(seq: list[int], token: int) -> tuple[int, int]:
    """Longest suffix of `seq` + [token] occurring in `seq`: its length, first occurrence's end."""
    query = [*seq, token]
    for length in range(len(seq), 0, -1):
        for end in range(length, len(seq) + 1):
            if seq[end - length : end] == query[-length:]:
                return length, end
    return 0, 0


def brute_mmspec_draft(seq: list[int], n_predicts: int, threshold: int) -> list[int]:
    """MMSpec's draft, by definition: the pending token seq[-1] counts twice (module doc)."""
    length, end = brute_followed_by(seq, seq[-1]) if seq else (0, 0)
    if length < threshold:
        return []
    return seq[end : end + min(n_predicts - 1, 4 * length)]


def brute_specbench_draft(seq: list[int], n_predicts: int, threshold: int) -> list[int]:
    if brute_match_length(seq) < threshold:
        return []
    return brute_continuation(seq, n_predicts - 1)


BRUTE_DRAFT = {"mmspec": brute_mmspec_draft, "specbench": brute_specbench_draft}


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


@given(st.lists(st.integers(0, 2), max_size=8), chunks, st.integers(0, 3))
def test_match_followed_by_equals_brute_force(
    start: list[int], steps: list[list[int]], token: int
) -> None:
    sam = SuffixAutomaton(start)
    seq = list(start)
    for chunk in [[], *steps]:
        sam.extend(chunk)
        seq += chunk
        # token 3 never occurs: (0, 0)
        assert sam.match_followed_by(token) == brute_followed_by(seq, token)
        if seq:  # MMSpec's lookup: the pending token once more
            assert sam.match_followed_by(seq[-1]) == brute_followed_by(seq, seq[-1])


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
    assert (drafter.n_predicts, drafter.rule, drafter.threshold) == (40, "mmspec", 1)
    drafter = SuffixAutomatonDrafter(rule="specbench")
    assert (drafter.n_predicts, drafter.rule, drafter.threshold) == (40, "specbench", 5)
    assert SuffixAutomatonDrafter(threshold=3).threshold == 3
    assert {"n_predicts", "rule", "threshold"} <= set(SuffixAutomatonDrafter.arg_names())
    for kwargs, msg in [
        ({"n_predicts": 1}, "n_predicts >= 2"),
        ({"n_predicts": 4.0}, "n_predicts >= 2"),
        ({"threshold": 0}, "threshold >= 1"),
        ({"threshold": True}, "threshold >= 1"),
        ({"rule": "samd"}, "mmspec, specbench"),
    ]:
        with pytest.raises(ValueError, match=msg):
            SuffixAutomatonDrafter(**kwargs)  # type: ignore[arg-type]


def _propose(drafter: SuffixAutomatonDrafter, seq: list[int]) -> list[int]:
    ctx = DraftContext(rows=[0], tokens=[seq], prompt_lens=[1])
    drafter.begin(ctx)
    return drafter.propose(ctx)[0].tokens


# (sequence ending with the pending token, MMSpec's draft): computed by running MMSpec's own
# `DynSAM` (`add_tokens(seq)`, `lookup(seq[-1])`, `gen_dyn_draft`) at commit fd33670
_A, _B = [*range(1, 11), 11, 11], list(range(100, 150))
MMSPEC_DRAFTS = [
    ([7, 1, 2, 3, 4, 5, 9, 1, 2, 3], [4, 5, 9, 1]),
    ([3, 3, 1, 2, 3], [1, 2, 3]),
    ([5, 5, 5, 1, 5, 5], [1, 5, 5]),
    ([9, 4, 4, 4, 4], []),
    ([1, 2, 3, 4], []),
    ([1, 2, *[5, 6, 7] * 4], [5, 6, 7, 5]),
    ([*_A, *_B, *_A[:-1]], _B[:39]),
]


@pytest.mark.parametrize(("seq", "want"), MMSPEC_DRAFTS)
def test_mmspec_rule_drafts_what_mmspec_drafts(seq: list[int], want: list[int]) -> None:
    assert _propose(SuffixAutomatonDrafter(), seq) == want
    assert brute_mmspec_draft(seq, 40, 1) == want


def test_mmspec_rule_counts_the_pending_token_twice() -> None:
    mmspec = SuffixAutomatonDrafter()
    # Spec-Bench's match without its threshold and walk: the longest suffix that ends earlier
    longest = SuffixAutomatonDrafter(n_predicts=7, threshold=1, rule="specbench")
    # [1, 2, 3] ends earlier, but [1, 2, 3, 3] never occurs: the match is [3] alone, so the
    # 4 tokens after the first 3 (not 12), and with no threshold to pass
    seq = [7, 1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert _propose(mmspec, seq) == [4, 5, 9, 1]
    assert _propose(longest, seq) == [4, 5, 9, 1, 2, 3]
    assert _propose(SuffixAutomatonDrafter(rule="specbench"), seq) == []  # 3 < threshold 5
    # with the pending 3 twice, [3, 3] at the start matches, not the longest earlier [3]
    assert _propose(mmspec, [3, 3, 1, 2, 3]) == [1, 2, 3]
    assert _propose(longest, [3, 3, 1, 2, 3]) == [3, 1, 2, 3]
    # in a run of one token the match is the whole run, which first ends at the end: no draft
    assert _propose(mmspec, [9, 4, 4, 4, 4]) == []
    # in a repetition loop: the 4 tokens after the first 7, where the walk drafts the loop
    loop = [1, 2, *[5, 6, 7] * 4]
    assert _propose(mmspec, loop) == [5, 6, 7, 5]
    assert _propose(SuffixAutomatonDrafter(rule="specbench"), loop) == [5, 6, 7] * 3
    # a threshold gates the rule's own match: [3, 3] has 2 tokens
    assert _propose(SuffixAutomatonDrafter(threshold=2), [3, 3, 1, 2, 3]) == [1, 2, 3]
    assert _propose(SuffixAutomatonDrafter(threshold=3), [3, 3, 1, 2, 3]) == []


def test_mmspec_draft_is_four_tokens_per_matched_token_up_to_n_predicts() -> None:
    body = list(range(100, 200))
    for k in range(1, 12):
        head = [*range(1, k), 50, 50]  # the pending 50 twice makes a match of k + 1 tokens
        seq = [*head, *body, *head[:-1]]
        for n_predicts in (2, 10, 40):
            want = body[: min(n_predicts - 1, 4 * (k + 1))]
            assert _propose(SuffixAutomatonDrafter(n_predicts=n_predicts), seq) == want


def test_propose_update_and_rows_dropping_out() -> None:
    drafter = SuffixAutomatonDrafter(n_predicts=4, threshold=3, rule="specbench")
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


def test_mmspec_propose_after_update() -> None:
    drafter = SuffixAutomatonDrafter(n_predicts=6)
    ctx = DraftContext(rows=[0], tokens=[[4, 8, 9, 5, 6, 4]], prompt_lens=[5])
    drafter.begin(ctx)
    trees = drafter.propose(ctx)
    assert [t.tokens for t in trees] == [[8, 9, 5, 6]]
    # 8, 9 accepted, then a bonus 4: [4, 4] never occurred, so again what followed the first 4
    drafter.update(ctx, StepOutcome(trees, [[0, 1]], [[8, 9, 4]], torch.zeros(1, 5, 4)))
    ctx = DraftContext(rows=[0], tokens=[[4, 8, 9, 5, 6, 4, 8, 9, 4]], prompt_lens=[5])
    trees = drafter.propose(ctx)
    assert [t.tokens for t in trees] == [[8, 9, 5, 6]]
    # nothing accepted, bonus 4: the pending 4 twice matches [4, 4], which first occurs at
    # the very end, so nothing follows it
    drafter.update(ctx, StepOutcome(trees, [[]], [[4]], torch.zeros(1, 5, 4)))
    ctx = DraftContext(rows=[0], tokens=[[*ctx.tokens[0], 4]], prompt_lens=[5])
    assert [t.tokens for t in drafter.propose(ctx)] == [[]]


def test_begin_resets_rows_of_the_previous_batch() -> None:
    drafter = SuffixAutomatonDrafter()
    drafter.begin(DraftContext(rows=[0], tokens=[[1, 2, 1]], prompt_lens=[2]))
    assert [t.tokens for t in drafter.propose(DraftContext([0], [[1, 2, 1]], [2]))] == [[2, 1]]
    ctx = DraftContext(rows=[0], tokens=[[5, 6, 5]], prompt_lens=[2])
    drafter.begin(ctx)
    assert [t.tokens for t in drafter.propose(ctx)] == [[6, 5]]


@settings(max_examples=60)
@given(
    st.sampled_from(["mmspec", "specbench"]),
    st.lists(seqs.filter(bool), min_size=1, max_size=3),
    st.lists(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=4)), max_size=8),
    st.integers(2, 12),
    st.integers(1, 4),
)
def test_drafter_equals_brute_force_over_steps(
    rule: str,
    prompts: list[list[int]],
    steps: list[list[list[int]]],
    n_predicts: int,
    threshold: int,
) -> None:
    """Random rows, random emitted tokens, rows leaving when their step list runs out."""
    drafter = SuffixAutomatonDrafter(n_predicts=n_predicts, threshold=threshold, rule=rule)
    rows = list(range(len(prompts)))
    tokens = [list(p) for p in prompts]
    drafter.begin(DraftContext(rows, [list(t) for t in tokens], [len(p) for p in prompts]))
    for step in steps:
        live = [r for r in rows if r < len(step)] or rows[:1]
        ctx = DraftContext(live, [list(tokens[r]) for r in live], [1] * len(live))
        trees = drafter.propose(ctx)
        for r, tree in zip(live, trees):
            assert tree.tokens == BRUTE_DRAFT[rule](tokens[r], n_predicts, threshold)
        emitted = [step[r] if r < len(step) else [0] for r in live]
        paths = [[] for _ in live]
        drafter.update(ctx, StepOutcome(trees, paths, emitted, torch.zeros(len(live), 1, 3)))
        for r, e in zip(live, emitted):
            tokens[r] += e
        rows = live


def test_propose_catches_up_when_update_was_skipped() -> None:
    drafter = SuffixAutomatonDrafter(n_predicts=3, threshold=2, rule="specbench")
    drafter.begin(DraftContext([0], [[1, 2, 3]], [3]))
    trees = drafter.propose(DraftContext([0], [[1, 2, 3, 4, 1, 2]], [3]))
    assert trees == [DraftTree.chain([3, 4])]
