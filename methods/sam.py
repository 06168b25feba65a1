"""SAM decoding: draft what followed an earlier occurrence of the sequence's suffix.

Hu et al., "SAM Decoding: Speculative Decoding via Suffix Automaton" (arXiv 2411.10666);
references: MMSpec `method/sam/samd/dyn_sam.py` and `sam_draft.py`, driven by
`method/sam/spec_model_sam.py`; Spec-Bench `model/samd` (`sam/dyn_sam.py`, `draft.py`). As in
MMSpec, only the dynamic automaton is used: it is built afresh for each sample (MMSpec resets
it in every `specgenerate` call) over the row's own prompt (image placeholders included) and
generated tokens, with no static corpus and no auxiliary tree drafter: MMSpec builds a
`NullStaticSAM` whose lookup call is commented out, and of its eval script's `--total-token`,
`--depth`, `--top-k`, `--threshold` none reaches the drafter (`--total-token` only shortens
the decoding loop's bound).

A suffix automaton recognises every substring of a sequence with at most 2n states, and
grows online in O(1) amortised time per appended token. Each state is one class of
substrings that end at the same set of positions; besides the usual `next`, `link` and
`length` we keep where the class first occurs, so the tokens that followed it can be read
straight off the sequence.

The drafting rule (`rule`), per row and per step; the sequence ends with the pending token x
(the draft's root), which is already in the automaton:
- `mmspec` (the default; MMSpec's `DraftModel.lookup` -> `DynSAM.gen_dyn_draft`, n_predicts 40,
  alpha 4): the match is the longest suffix of the sequence *followed by x once more* that
  occurs in the sequence (x occurs, so it has at least 1 token); draft, as a chain, the
  min(n_predicts - 1, 4 x match) tokens that followed its first occurrence - fewer if the
  sequence ends sooner, none if that occurrence ends at the end. No walk to shorter suffixes.
  MMSpec's automaton already holds x (its `update` adds the bonus token) and `lookup(x)` steps
  the matching state with x again, so x counts twice. That is a porting slip: SAM Decoding's
  lookup steps with the one token not yet added. But it decides the draft: unless "x x"
  occurs, the match is x alone and the draft the 4 tokens after x's first occurrence in the
  sequence, where the slip-free rule drafts after the longest earlier suffix (the two drafts
  differ at about a third of the positions of MMSpec's reference answers). We keep it so
  that drafts, and so acceptance per step, equal MMSpec's.
- `specbench` (Spec-Bench's `len_threshold` 5, which MMSpec's config has but never reads):
  the match is the longest suffix of the sequence that also ends earlier. Draft the
  n_predicts - 1 tokens that followed its first occurrence; when fewer are left before the
  end, walk up suffix links to shorter suffixes whose first occurrence is earlier, until
  enough are left or the shortest is reached (the reference's `to_anc`). In a repetition
  loop this drafts the whole rest of the loop instead of one period.
Under either rule a match shorter than `threshold` tokens gives an empty tree (an AR step).
MMSpec's match is mostly x alone: `threshold: 5` under `mmspec` all but stops drafting.

Choices beside the references:
- The draft is never padded (Spec-Bench pads short drafts with token 0 up to n_predicts).
- Under `specbench` the draft may end with the pending token itself (the reference's sequence
  stops short of it), and the walk wants `n_predicts - 1` tokens, what the draft can hold;
  the reference compares against `n_predicts`, one more than it ever drafts.
- MMSpec's `specgenerate` also stops a sample once its output ends in a 2- to 32-gram
  repeated three times, dropping the last copy. That changes the output (it is not lossless)
  and is no drafting rule: we do not copy it.
"""

from __future__ import annotations

from collections.abc import Iterable

from mmspec.methods.base import DraftContext, Drafter, StepOutcome
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree

ROOT = 0  # the initial state: the empty string
RULES = ("mmspec", "specbench")  # the drafting rules (module doc)
DEFAULT_THRESHOLD = {"mmspec": 1, "specbench": 5}  # per rule: MMSpec drafts on any match
MMSPEC_ALPHA = 4  # MMSpec's DynSAM `alpha`: tokens drafted per matched token


class SuffixAutomaton:
    """Online suffix automaton of one growing token sequence.

    Example:
        sam = SuffixAutomaton([1, 2, 3, 9, 1, 2, 3])
        sam.match_length()      # 3: [1, 2, 3] ends earlier, [9, 1, 2, 3] does not
        sam.continuation(2)     # [9, 1]: what followed [1, 2, 3] the first time
        sam.match_followed_by(3)  # (1, 3): [3, 3] never occurs, [3] first ends at 3
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

    def match_followed_by(self, token: int) -> tuple[int, int]:
        """The longest suffix of the sequence followed by `token` that occurs in the sequence.

        Returns its length and the end (exclusive) of its first occurrence; (0, 0) when
        `token` does not occur. The matching step of MMSpec's `DynSAM.lookup(token)`.
        """
        # a suffix + token occurs only if the suffix ends earlier: start from the longest such
        state = self._match()
        while state != ROOT and token not in self.next[state]:
            state = self.link[state]
        found = self.next[state].get(token)
        if found is None:
            return 0, 0
        return self.length[state] + 1, self.first_end[found]

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
            n_predicts - 1 tokens (40 in MMSpec's `SamdConfig`; Spec-Bench's
            `--samd_n_predicts`).
        rule: `mmspec` (default) or `specbench`, which match to draft from and how much of
            what followed it (module doc).
        threshold: draft only when the rule's match has at least this many tokens, else the
            row takes an AR step. Default per rule: 1 for `mmspec` (MMSpec never reads its
            `len_threshold`), 5 for `specbench` (`--samd_len_threshold`).
    """

    def __init__(
        self, n_predicts: int = 40, rule: str = "mmspec", threshold: int | None = None
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"sam rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.rule = rule
        self.n_predicts = _int_at_least("n_predicts", n_predicts, 2)
        if threshold is None:
            threshold = DEFAULT_THRESHOLD[rule]
        self.threshold = _int_at_least("threshold", threshold, 1)
        self._automata: dict[int, SuffixAutomaton] = {}  # batch row -> its automaton

    def begin(self, ctx: DraftContext) -> None:
        self._automata = {row: SuffixAutomaton(t) for row, t in zip(ctx.rows, ctx.tokens)}

    def join(self, ctx: DraftContext) -> None:
        """Each joining row gets an automaton of its own prompt, as `begin` builds: MMSpec's
        automaton is per sample, so the running rows' are left as they are."""
        self._automata.update({row: SuffixAutomaton(t) for row, t in zip(ctx.rows, ctx.tokens)})

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        draft = self._mmspec_draft if self.rule == "mmspec" else self._specbench_draft
        trees = [
            DraftTree.chain(draft(self._catch_up(row, tokens)))
            for row, tokens in zip(ctx.rows, ctx.tokens)
        ]
        # rows that finished are gone from ctx: forget their automata
        self._automata = {row: self._automata[row] for row in ctx.rows}
        return trees

    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        """Append each row's emitted tokens (ctx.tokens does not hold them yet)."""
        for row, emitted in zip(ctx.rows, outcome.emitted):
            self._automata[row].extend(emitted)

    def _mmspec_draft(self, sam: SuffixAutomaton) -> list[int]:
        """What followed the first occurrence of (longest suffix + pending token once more)."""
        if not sam.tokens:
            return []
        length, end = sam.match_followed_by(sam.tokens[-1])
        if length < self.threshold:
            return []
        return sam.tokens[end : end + min(self.n_predicts - 1, MMSPEC_ALPHA * length)]

    def _specbench_draft(self, sam: SuffixAutomaton) -> list[int]:
        """What followed the longest earlier suffix, walking to shorter ones for more."""
        if sam.match_length() < self.threshold:
            return []
        return sam.continuation(self.n_predicts - 1)

    def _catch_up(self, row: int, tokens: list[int]) -> SuffixAutomaton:
        """The row's automaton, extended by any tokens it missed (a wrapper that skips update)."""
        sam = self._automata.get(row)
        if sam is None or len(sam) > len(tokens):  # a row we never saw, or another sequence
            sam = self._automata[row] = SuffixAutomaton(tokens)
        elif len(sam) < len(tokens):
            sam.extend(tokens[len(sam) :])
        return sam
