"""SAM decoding: draft what followed the longest earlier occurrence of the sequence's suffix.

Hu et al., "SAM Decoding: Speculative Decoding via Suffix Automaton" (arXiv 2411.10666);
reference: Spec-Bench `model/samd` (`sam/dyn_sam.py`, `draft.py`), run there with
n_predicts 40 and len_threshold 5. As in MMSpec, only the dynamic automaton is used: it is
built over each row's own prompt (image placeholders included) and generated tokens, with
no static corpus and no auxiliary tree drafter.

A suffix automaton recognises every substring of a sequence with at most 2n states, and
grows online in O(1) amortised time per appended token. Each state is one class of
substrings that end at the same set of positions; besides the usual `next`, `link` and
`length` we keep where the class first occurs, so the tokens that followed it can be read
straight off the sequence.

Drafting, per row and per step:
1. The match: the longest suffix of the sequence (pending token included) that also ends
   earlier. That is the class `link[last]`, so it costs nothing to keep up to date.
2. If the match is shorter than `threshold` tokens: an empty tree (a plain AR step).
3. Otherwise draft, as a chain, the up to `n_predicts - 1` tokens that followed the match's
   first occurrence (`n_predicts` counts the root, so one verification feeds at most
   `n_predicts` tokens, as in the reference). When fewer tokens than that are left before the
   current end, walk up suffix links to shorter suffixes whose first occurrence is earlier,
   until enough are left or the shortest is reached (the reference's `to_anc`). In a
   repetition loop this drafts the whole rest of the loop instead of one period.

Choices beside the reference:
- The pending token is already in the automaton (the reference keeps a separate matching
  state and steps it with the pending token at lookup time). Same match, less machinery.
- The draft may end with the pending token itself (the reference's sequence stops short of
  it) and is never padded (the reference pads short drafts with token 0 up to n_predicts).
- The walk wants `n_predicts - 1` tokens, what the draft can hold; the reference compares
  against `n_predicts`, one more than it ever drafts.
- MMSpec's own SAM (`method/sam/samd`) has no threshold: it drafts min(39, 4 x match) tokens,
  and it steps the pending token into the match twice. We follow Spec-Bench's rule.
"""

from __future__ import annotations

from collections.abc import Iterable

from mmspec.methods.base import DraftContext, Drafter, StepOutcome
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree

ROOT = 0  # the initial state: the empty string


class SuffixAutomaton:
    """Online suffix automaton of one growing token sequence.

    Example:
        sam = SuffixAutomaton([1, 2, 3, 9, 1, 2, 3])
        sam.match_length()      # 3: [1, 2, 3] ends earlier, [9, 1, 2, 3] does not
        sam.continuation(2)     # [9, 1]: what followed [1, 2, 3] the first time
    """

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self.tokens: list[int] = []  # (n,) the sequence so far
        # per state; state 0 is ROOT
        self.next: list[dict[int, int]] = [{}]  # token -> state of (this class + token)
        self.link: list[int] = [-1]  # state of the longest suffix in another class
        self.length: list[int] = [0]  # length of the longest string in the class
        # end (exclusive) of the class's first occurrence: tokens[first_end[s]:] follows it
        self.first_end: list[int] = [0]
        self.last = ROOT  # state of the whole sequence
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, seq: Iterable[int]) -> bool:
        """Whether `seq` is a substring of the sequence."""
        state = ROOT
        for tok in seq:
            state = self.next[state].get(tok, -1)
            if state < 0:
                return False
        return True

    def num_states(self) -> int:
        return len(self.length)

    def extend(self, tokens: Iterable[int]) -> None:
        for tok in tokens:
            self.append(tok)

    def append(self, token: int) -> None:
        """Add one token: the textbook online construction (Blumer et al.), amortised O(1)."""
        self.tokens.append(token)
        n = len(self.tokens)
        cur = self._new_state({}, -1, n, n)
        p = self.last
        # every suffix without a `token` edge can now be followed by it, ending only here
        while p >= 0 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        if p < 0:
            self.link[cur] = ROOT
        else:
            q = self.next[p][token]
            if self.length[p] + 1 == self.length[q]:
                self.link[cur] = q
            else:
                # q's shorter strings now also end here: split them off into a clone, which
                # first occurred where q did
                clone = self._new_state(
                    dict(self.next[q]), self.link[q], self.length[p] + 1, self.first_end[q]
                )
                while p >= 0 and self.next[p].get(token) == q:
                    self.next[p][token] = clone
                    p = self.link[p]
                self.link[q] = self.link[cur] = clone
        self.last = cur

    def match_length(self) -> int:
        """Length of the longest suffix of the sequence that also ends earlier."""
        return self.length[self._match()]

    def continuation(self, want: int) -> list[int]:
        """Up to `want` tokens that followed an earlier occurrence of a suffix (see module doc).

        The longest earlier suffix's first occurrence, or, when fewer than `want` tokens
        follow it, that of the longest shorter suffix with enough tokens after its first
        occurrence (the shortest one if none has). Empty when no suffix ends earlier.
        """
        state = self._match()
        if state == ROOT:
            return []
        n = len(self.tokens)
        # a suffix-link parent is a shorter suffix, so it first occurred no later
        while n - self.first_end[state] < want and self.link[state] != ROOT:
            state = self.link[state]
        start = self.first_end[state]
        return self.tokens[start : start + want]

    def _match(self) -> int:
        # the whole sequence's class holds the suffixes that end only at the end; its link
        # is the class of the longest suffix that also ends earlier
        return max(self.link[self.last], ROOT)

    def _new_state(self, nxt: dict[int, int], link: int, length: int, first_end: int) -> int:
        self.next.append(nxt)
        self.link.append(link)
        self.length.append(length)
        self.first_end.append(first_end)
        return len(self.length) - 1


def _int_at_least(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; `threshold: true` in a grid is a mistake, not 1
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"sam needs an integer {name} >= {minimum}, got {value!r}")
    return value


@register("sam")
class SuffixAutomatonDrafter(Drafter):
    """Training-free retrieval drafter over each row's own tokens (SAM-Decoding, dynamic SAM).

    Args:
        n_predicts: tokens fed to one verification, root included: drafts hold at most
            n_predicts - 1 tokens (Spec-Bench's `--samd_n_predicts`).
        threshold: draft only when the longest earlier suffix has at least this many tokens
            (Spec-Bench's `--samd_len_threshold`); below it the row takes an AR step.
    """

    def __init__(self, n_predicts: int = 40, threshold: int = 5) -> None:
        self.n_predicts = _int_at_least("n_predicts", n_predicts, 2)
        self.threshold = _int_at_least("threshold", threshold, 1)
        self._automata: dict[int, SuffixAutomaton] = {}  # batch row -> its automaton

    def begin(self, ctx: DraftContext) -> None:
        self._automata = {row: SuffixAutomaton(t) for row, t in zip(ctx.rows, ctx.tokens)}

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        trees = []
        for row, tokens in zip(ctx.rows, ctx.tokens):
            sam = self._catch_up(row, tokens)
            if sam.match_length() < self.threshold:
                trees.append(DraftTree.empty())
            else:
                trees.append(DraftTree.chain(sam.continuation(self.n_predicts - 1)))
        # rows that finished are gone from ctx: forget their automata
        self._automata = {row: self._automata[row] for row in ctx.rows}
        return trees

    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        """Append each row's emitted tokens (ctx.tokens does not hold them yet)."""
        for row, emitted in zip(ctx.rows, outcome.emitted):
            self._automata[row].extend(emitted)

    def _catch_up(self, row: int, tokens: list[int]) -> SuffixAutomaton:
        """The row's automaton, extended by any tokens it missed (a wrapper that skips update)."""
        sam = self._automata.get(row)
        if sam is None or len(sam) > len(tokens):  # a row we never saw, or another sequence
            sam = self._automata[row] = SuffixAutomaton(tokens)
        elif len(sam) < len(tokens):
            sam.extend(tokens[len(sam) :])
        return sam
