"""Lookahead (Ant Group's trie retrieval): draft the continuations seen after the suffix.

Zhao et al., "Lookahead: An Inference Acceleration Framework for Large Language Models with
Lossless Generation Accuracy" (`alipay/PainlessInferenceAcceleration`). Reference: MMSpec's
copy of its cache, `method/lookahead/common/lookahead_cache.py` (`LookaheadCache.put`,
`stream_put`, `hier_get`; `Tree.get`, `_ravel`), driven by `SpecModel.specgenerate` in
`method/lookahead/spec_model_lookahead.py`, with `decoding_length` 64 and `branch_length` 12
(`scripts/*/eval_lookahead_mmspec.sh`, the defaults of `evaluation/eval_lookahead_mmspec.py`).
Model-free like PLD, but where PLD drafts after one earlier occurrence of the suffix,
Lookahead pools every earlier occurrence in a trie of counted n-grams.

The drafting rule (`rule`), per row and per step:

- `mmspec` (the default): what MMSpec's code drafts and can accept, step for step.
  What the trie holds, per request:
  - The prompt, cut at its first `cut_token`: each prompt position but the last starts a
    window of up to `branch_length + 1` tokens, counted with all its prefixes (`put`).
  - The output, as a separate stream from the first generated token on: each step's emitted
    tokens are cut at their first `cut_token` (the rest of that step's tokens never go in),
    and a position's window goes in once `branch_length` tokens follow it (`stream_put`),
    so the last 12 tokens are not retrievable yet. No n-gram spans prompt and output.
  - Prompt and output counts stay apart and rank continuations by
    (1 - 1e-4) * prompt + 1e-4 * output: the prompt decides, the output breaks ties.
  `cut_token` 2 is `LookaheadCache`'s default `eos_ids=(2,)`, which MMSpec never overrides:
  LLaMA's `</s>` for LLaVA-1.5 (in a prompt, it ends each earlier answer of a multi-turn
  chat), but '#' for Qwen2.5-VL. In our tiny zoo 2 is the eos of both: tiny-qwen2.5-vl's
  template ends its system message with it, so that prompt's trie holds the system message
  alone; tiny-llava's ends earlier answers with it. An accident of a LLaMA default, but it
  decides what is drafted, so we follow it; `cut_token: null` cuts nothing.
  Retrieval (`hier_get`): the suffixes of the row's sequence (prompt, output, the pending
  token), longest first. A suffix whose first token never started a window is skipped (no
  `Tree` for it); otherwise its draft is everything that followed it in the trie,
  depth-first, siblings best first (ties: first seen) - or nothing at all when that is
  more than `decoding_length` nodes (`Tree.get` wants a count threshold then, but collects
  `None` for every node's index, so the threshold stays at 1e9 and `_ravel` skips all), and
  at most `decoding_length - 1` nodes (the reference's count includes the root). The first
  suffix whose draft has `branch_length - 1` tokens or more wins, else the last one tried.
  (Suffixes longer than `branch_length` have nothing below them, so we stop there; only at
  `branch_length` 1, where a longer one that starts a window ends the search with nothing,
  do we try them all.)
  Verification: MMSpec feeds that tree with a tree mask, but then walks it as one chain in
  depth-first order, checking node i + 1 against the target's prediction at node i. That is
  right along the first branch (the best child at each level, down to its leaf) and wrong
  past it, so we draft the first branch as a chain: up to the leaf, acceptance is the same.
- `mmspec_tree`: the same trie and retrieval, the whole tree verified as a tree.
- `best_first` (this project's version of Ant's Lookahead, the default before MMSpec's rule):
  one trie of the row's whole text (prompt and output as one stream, every n-gram up to
  `max_query_length + branch_length` long, each counted as soon as it is emitted, nothing
  cut). The last `max_query_length` (default 2, Ant's) tokens are looked up, longest suffix
  first; below the match, the `decoding_length` most frequent continuations (best-first), at
  most `branch_length` deep, are verified as a tree. A longer match with fewer than
  `branch_length - 1` draft tokens gives way to the next shorter one. With `global_trie`,
  the outputs of finished requests also go into one trie that later requests consult with
  weight 1e-4, pruned by halving past `global_max_nodes` (Ant's `squeeze`).

Where we differ from the reference, and why:
- Lossless: past the first branch's leaf MMSpec compares the leaf's prediction with the
  next node in depth-first order (a sibling of the leaf or of an ancestor) and, on a match,
  keeps accepting predictions made in that other branch's context, at that branch's
  positions, with that branch's keys left in the cache. We stop at the leaf, whose
  prediction is the bonus token: the same tokens up to there, none of the wrong ones after.
- Per request: MMSpec keeps one `LookaheadCache` for the whole run (its three warm-up
  generations included); prompt counts are reset only by a `final` `stream_put`, which
  happens when `max_new_tokens` is reached but never on EOS, and output counts are never
  reset, so a sample's drafts depend on the samples (and earlier turns) before it. Each of
  our requests starts from an empty trie. Side by side on the tiny zoo (benchmarks/parity,
  5 testmini prompts, 7 generations, 64 new tokens) MMSpec with a fresh cache per generation
  (`lookahead-fresh`, the figure to compare with) has our MAT, 1.65 on tiny-qwen2.5-vl and
  1.21 on tiny-llava; with its cache kept it reaches 2.44 and 1.63.
- Sampling: MMSpec's loop takes the argmax whatever the temperature; we draft the same and
  the engine accepts by sampling, which keeps the target's distribution.
"""

from __future__ import annotations

import heapq
import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from mmspec.methods.base import DraftContext, Drafter, StepOutcome
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree

RULES = ("mmspec", "mmspec_tree", "best_first")  # the drafting rules (module doc)

# Weight of output counts next to prompt counts under the MMSpec rules (the reference's
# `output_weight`): prompt counts weigh 1 - OUTPUT_WEIGHT.
OUTPUT_WEIGHT = 1e-4
# Weight of the shared trie's counts next to a row's own under `best_first`: a row's own text
# predicts it far better, so shared counts only break ties and fill in where the row has seen
# nothing. The reference mixes its output counts in with the same weight.
GLOBAL_WEIGHT = 1e-4


class NgramTrie:
    """Occurrence counts of n-grams (n <= max_len) of token streams fed incrementally.

    `extend` counts every n-gram a stream's tokens complete; `add` counts one occurrence of
    a window and its prefixes (the n-grams starting where the window starts), for callers
    that decide themselves which positions count.

    A node is an int indexing flat lists (node 0 is the root, the empty n-gram), not an object:
    a prompt adds up to max_len nodes per token, and that many small objects set off Python's
    cyclic GC over the worker's whole heap (a 3,000-token prompt took 300 ms next to a loaded
    model, 45 ms like this). Ints and int-keyed dicts are not tracked by the GC.

    Example:
        trie = NgramTrie(max_len=3)
        trie.extend([1, 2, 1, 2])
        trie.count([1, 2]) == 2 and trie.count([2, 1, 2]) == 1
    """

    ROOT = 0

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.tokens = [-1]  # (nodes,) last token of the node's n-gram
        self.counts = [0]  # (nodes,) occurrences of the node's n-gram
        self._first = [-1]  # (nodes,) first child, -1 if none; siblings in the order first seen
        self._last = [-1]  # (nodes,) last child, after which a new sibling goes
        self._next = [-1]  # (nodes,) next sibling, -1 if none
        self._edges: dict[int, int] = {}  # node << 32 | token -> child (token ids fit 32 bits)
        # nodes of the stream's last 1..max_len-1 tokens (shortest suffix first): the n-grams
        # that the next token extends
        self._open: list[int] = []

    @property
    def size(self) -> int:
        """Nodes below the root: distinct n-grams stored."""
        return len(self.counts) - 1

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens to the current stream, counting every n-gram they complete."""
        for tok in tokens:
            # the token ends one new n-gram per suffix it extends, the empty one included
            ends = [self.ROOT, *self._open]
            for i, node in enumerate(ends):
                ends[i] = self._child(node, tok)
                self.counts[ends[i]] += 1
            self._open = ends[: self.max_len - 1]

    def add(self, window: Sequence[int]) -> None:
        """Count one occurrence of `window[:max_len]` and of each of its prefixes."""
        node = self.ROOT
        for tok in window[: self.max_len]:
            node = self._child(node, tok)
            self.counts[node] += 1

    def cut(self) -> None:
        """End the current stream: no n-gram spans the cut."""
        self._open = []

    def find(self, path: Sequence[int], node: int = ROOT) -> int:
        """The node `path` leads to from `node`, -1 if that n-gram was never seen."""
        for tok in path:
            node = self._edges.get(node << 32 | tok, -1)
            if node < 0:
                break
        return node

    def count(self, gram: Sequence[int]) -> int:
        node = self.find(gram)
        return self.counts[node] if node >= 0 else 0

    def children(self, node: int) -> Iterator[int]:
        """Child nodes in the order their tokens were first seen after `node`'s n-gram."""
        child = self._first[node]
        while child >= 0:
            yield child
            child = self._next[child]

    def halved(self) -> NgramTrie:
        """A copy with every count halved, without the n-grams seen once (reference: squeeze)."""
        out = NgramTrie(self.max_len)
        stack = [(self.ROOT, out.ROOT)]
        while stack:
            old, new = stack.pop()
            for child in self.children(old):
                # a dropped n-gram's extensions occur at most as often: they go too
                if self.counts[child] > 1:
                    copy = out._add(new, self.tokens[child], self.counts[child] // 2)
                    stack.append((child, copy))
        return out

    def _child(self, parent: int, tok: int) -> int:
        """`parent`'s child for `tok`, made (count 0) if it is new."""
        child = self._edges.get(parent << 32 | tok, -1)
        return child if child >= 0 else self._add(parent, tok, 0)

    def _add(self, parent: int, tok: int, count: int) -> int:
        node = len(self.counts)
        self.tokens.append(tok)
        self.counts.append(count)
        self._first.append(-1)
        self._last.append(-1)
        self._next.append(-1)
        self._edges[parent << 32 | tok] = node
        if self._last[parent] < 0:
            self._first[parent] = node
        else:
            self._next[self._last[parent]] = node
        self._last[parent] = node
        return node


# A position in one or more tries: the node that the same path reaches in each, with the
# weight of that trie's counts.
Cursor = list[tuple[NgramTrie, int, float]]


def locate(cursor: Cursor, path: Sequence[int]) -> Cursor:
    """Where `path` leads from each of the cursor's nodes; empty when none has seen it."""
    found = ((trie, trie.find(path, node), w) for trie, node, w in cursor)
    return [(trie, node, w) for trie, node, w in found if node >= 0]


def _children(cursor: Cursor) -> dict[int, tuple[float, Cursor]]:
    """Every token seen after the cursor's path, with its weighted count and its cursor.

    Tokens come in the order first seen, the cursor's first trie before the next.
    """
    out: dict[int, tuple[float, Cursor]] = {}
    for trie, node, w in cursor:
        for child in trie.children(node):
            tok = trie.tokens[child]
            score, cur = out.get(tok, (0.0, []))
            out[tok] = (score + w * trie.counts[child], [*cur, (trie, child, w)])
    return out


# ---- the MMSpec rules -------------------------------------------------------------------------


class MMSpecCache:
    """One request's n-gram counts, filled as MMSpec's `LookaheadCache` fills them.

    Two tries over the same windows of `branch_length + 1` tokens: one for the prompt, one
    for the output (see the module doc). A trie's top level holds only tokens that started a
    window: those the reference has a `Tree` for.
    """

    def __init__(self, prompt: Sequence[int], branch_length: int, cut_token: int | None) -> None:
        self.window = branch_length + 1
        self.cut_token = cut_token
        self.prompt = NgramTrie(self.window)
        self.output = NgramTrie(self.window)
        # output tokens whose window has not gone in yet: fewer than `window` after each put
        self._tail: list[int] = []
        text = self._cut(prompt)
        # the prompt's last token starts no window: nothing follows it in the prompt
        for i in range(len(text) - 1):
            self.prompt.add(text[i : i + self.window])

    @property
    def sources(self) -> Cursor:
        """Both tries' roots, weighted as the reference ranks continuations."""
        return [
            (self.prompt, NgramTrie.ROOT, 1.0 - OUTPUT_WEIGHT),
            (self.output, NgramTrie.ROOT, OUTPUT_WEIGHT),
        ]

    def put(self, emitted: Sequence[int]) -> None:
        """One step's output tokens: windows go in once `branch_length` tokens follow them."""
        self._tail.extend(self._cut(emitted))
        ready = len(self._tail) - self.window + 1
        for i in range(ready):
            self.output.add(self._tail[i : i + self.window])
        if ready > 0:
            del self._tail[:ready]

    def _cut(self, tokens: Sequence[int]) -> list[int]:
        tokens = list(tokens)
        if self.cut_token in tokens:
            return tokens[: tokens.index(self.cut_token)]
        return tokens


def depth_first(cursor: Cursor, max_nodes: int) -> DraftTree:
    """Everything below `cursor`, depth-first, siblings best first (ties: first seen).

    As MMSpec's `Tree.get`: nothing when that is more than `max_nodes` nodes, else its first
    `max_nodes - 1` (the reference's count includes the root).
    """
    tokens: list[int] = []
    parents: list[int] = []
    todo: list[tuple[int, int, Cursor]] = []  # (token, parent, cursor); the next one on top

    def push_children(cur: Cursor, parent: int) -> None:
        # sorted() is stable, so equal counts keep the order first seen
        ranked = sorted(_children(cur).items(), key=lambda kv: kv[1][0], reverse=True)
        todo.extend((tok, parent, child) for tok, (_, child) in reversed(ranked))

    push_children(cursor, -1)
    while todo:
        if len(tokens) + len(todo) > max_nodes:  # every node waiting will be visited
            return DraftTree.empty()
        tok, parent, cur = todo.pop()
        tokens.append(tok)
        parents.append(parent)
        push_children(cur, len(tokens) - 1)
    return DraftTree(tokens[: max_nodes - 1], parents[: max_nodes - 1])


def mmspec_tree(
    sources: Cursor,
    tokens: Sequence[int],
    decoding_length: int,
    branch_length: int,
    max_query_length: int,
) -> DraftTree:
    """MMSpec's `hier_get`: the tree below the longest suffix that offers enough, or below the
    shortest one whose first token started a window."""
    tree = DraftTree.empty()
    for n in range(min(max_query_length, len(tokens)), 0, -1):
        suffix = tokens[-n:]
        if not locate(sources, suffix[:1]):  # the reference has no `Tree` to ask: no result
            continue
        cursor = locate(sources, suffix)
        tree = depth_first(cursor, decoding_length) if cursor else DraftTree.empty()
        if len(tree) + 1 >= branch_length:  # the reference counts the root
            break
    return tree


def first_branch(tree: DraftTree) -> DraftTree:
    """The leading chain of a depth-first tree: the best child at each level, to a leaf."""
    n = 0
    while n < len(tree) and tree.parents[n] == n - 1:
        n += 1
    return DraftTree.chain(tree.tokens[:n])


# ---- the best_first rule ----------------------------------------------------------------------


def best_continuations(cursor: Cursor, max_nodes: int, max_depth: int) -> DraftTree:
    """The `max_nodes` most frequent continuations below `cursor`, at most `max_depth` deep.

    A child never occurs more often than its parent, so the most frequent nodes form a tree,
    and taking them best-first lists parents before children and siblings most frequent first
    (ties: first seen first), as acceptance wants them tried.
    """
    tokens: list[int] = []
    parents: list[int] = []
    order = itertools.count()  # tie-break: earlier pushed first; never compares cursors
    heap: list[tuple[float, int, int, int, int, Cursor]] = []

    def push_children(cur: Cursor, parent: int, depth: int) -> None:
        for tok, (score, child) in _children(cur).items():
            heapq.heappush(heap, (-score, next(order), tok, parent, depth, child))

    push_children(cursor, -1, 1)
    while heap and len(tokens) < max_nodes:
        _, _, tok, parent, depth, cur = heapq.heappop(heap)
        tokens.append(tok)
        parents.append(parent)
        if depth < max_depth:
            push_children(cur, len(tokens) - 1, depth + 1)
    return DraftTree(tokens, parents)


class RowText:
    """A row's whole text in one trie (`best_first`), and its output for the shared trie."""

    def __init__(self, tokens: Sequence[int], prompt_len: int, max_len: int) -> None:
        self.trie = NgramTrie(max_len)
        self.trie.extend(tokens)
        self.generated = list(tokens[prompt_len:])

    def put(self, emitted: Sequence[int]) -> None:
        self.trie.extend(emitted)
        self.generated.extend(emitted)


# ---- the drafter ------------------------------------------------------------------------------


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"lookahead needs {name} to be an integer >= 1, got {value!r}")
    return value


@register("lookahead")
class Lookahead(Drafter):
    """Trie-retrieval Lookahead; the defaults are MMSpec's (module doc).

    Args:
        decoding_length: most tree nodes, the root included under the MMSpec rules (64);
            most draft tokens under `best_first`.
        branch_length: deepest a draft branch goes (12).
        rule: `mmspec`, `mmspec_tree` or `best_first` (module doc).
        cut_token: MMSpec rules: the prompt and each step's output are cut at its first
            occurrence (2, the reference's default eos id); null cuts nothing.
        max_query_length: longest suffix looked up; null: the rule's own (under the MMSpec
            rules every suffix that can change the draft, `branch_length` tokens; 2 under
            `best_first`, as in Ant's code).
        global_trie: `best_first` only: also draft from the outputs of earlier requests this
            drafter served.
        global_max_nodes: size at which the shared trie is pruned.
    """

    @classmethod
    def drafts_tree(cls, args: Mapping[str, Any]) -> bool:
        # MMSpec's rule verifies its best branch as a chain; the other two verify a tree
        return args.get("rule", "mmspec") != "mmspec"

    def __init__(
        self,
        decoding_length: int = 64,
        branch_length: int = 12,
        rule: str = "mmspec",
        cut_token: int | None = 2,
        max_query_length: int | None = None,
        global_trie: bool = False,
        global_max_nodes: int = 1 << 16,
    ) -> None:
        self.decoding_length = _positive_int("decoding_length", decoding_length)
        self.branch_length = _positive_int("branch_length", branch_length)
        if rule not in RULES:
            raise ValueError(f"lookahead rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.rule = rule
        if cut_token is not None and (
            isinstance(cut_token, bool) or not isinstance(cut_token, int) or cut_token < 0
        ):
            raise ValueError(f"lookahead cut_token must be a token id or null, got {cut_token!r}")
        self.cut_token = cut_token
        if max_query_length is None:
            # MMSpec's rules: every suffix with something below it; at branch_length 1, with
            # any draft enough, a longer one that fails still ends the search, so all of them
            every = self.branch_length if self.branch_length > 1 else sys.maxsize
            max_query_length = 2 if rule == "best_first" else every
        self.max_query_length = _positive_int("max_query_length", max_query_length)
        if not isinstance(global_trie, bool):
            raise ValueError(
                f"lookahead needs global_trie to be true or false, got {global_trie!r}"
            )
        if global_trie and rule != "best_first":
            # the MMSpec rules stay per request: the reference's shared cache is what we avoid
            raise ValueError(f"lookahead global_trie needs rule 'best_first', got {rule!r}")
        self.global_max_nodes = _positive_int("global_max_nodes", global_max_nodes)
        # best_first: n-grams long enough that a full-length query still has a full branch
        # below it
        self._gram = self.max_query_length + self.branch_length
        # best_first: a match offering fewer draft tokens falls back to a shorter suffix; the
        # reference asks for branch_length tokens counting the root
        self._enough = min(self.branch_length - 1, self.decoding_length)
        self._rows: dict[int, MMSpecCache | RowText] = {}  # batch row -> what it has seen
        self._shared = NgramTrie(self._gram) if global_trie else None

    def begin(self, ctx: DraftContext) -> None:
        for row in list(self._rows):
            self._retire(row)
        for i in range(len(ctx.rows)):
            self._row(ctx, i)

    def join(self, ctx: DraftContext) -> None:
        """Each joining row gets the counts of its own text, as `begin` builds them (a row's
        trie is per request); the running rows' and `global_trie`'s shared one stay as they
        are (finished rows' outputs reach the shared trie at the next `update`)."""
        for i in range(len(ctx.rows)):
            self._rows[ctx.rows[i]] = self._fresh(ctx, i)

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        return [self._draft(self._row(ctx, i), tokens) for i, tokens in enumerate(ctx.tokens)]

    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        finished = [row for row in self._rows if row not in ctx.rows]  # since the last step
        for row in finished:
            self._retire(row)
        for i, emitted in enumerate(outcome.emitted):
            self._row(ctx, i).put(emitted)

    def _draft(self, seen: MMSpecCache | RowText, tokens: list[int]) -> DraftTree:
        if isinstance(seen, MMSpecCache):
            tree = mmspec_tree(
                seen.sources,
                tokens,
                self.decoding_length,
                self.branch_length,
                self.max_query_length,
            )
            return first_branch(tree) if self.rule == "mmspec" else tree
        return self._best_first(seen.trie, tokens)

    def _best_first(self, trie: NgramTrie, tokens: list[int]) -> DraftTree:
        """Tree below the longest suffix that offers enough, else below the shortest matched."""
        sources: Cursor = [(trie, trie.ROOT, 1.0)]
        if self._shared is not None:
            sources.append((self._shared, self._shared.ROOT, GLOBAL_WEIGHT))
        tree = DraftTree.empty()
        for n in range(min(self.max_query_length, len(tokens)), 0, -1):
            cursor = locate(sources, tokens[-n:])
            if not cursor:
                continue
            tree = best_continuations(cursor, self.decoding_length, self.branch_length)
            if len(tree) >= self._enough:
                break
        return tree

    def _row(self, ctx: DraftContext, i: int) -> MMSpecCache | RowText:
        """What active row i has seen, built from its tokens the first time the row is seen."""
        row = ctx.rows[i]
        if row not in self._rows:
            self._rows[row] = self._fresh(ctx, i)
        return self._rows[row]

    def _fresh(self, ctx: DraftContext, i: int) -> MMSpecCache | RowText:
        """Active row i's counts built from its tokens alone."""
        tokens, prompt_len = ctx.tokens[i], ctx.prompt_lens[i]
        if self.rule == "best_first":
            return RowText(tokens, prompt_len, self._gram)
        seen = MMSpecCache(tokens[:prompt_len], self.branch_length, self.cut_token)
        seen.put(tokens[prompt_len:])  # the first token, from the prefill
        return seen

    def _retire(self, row: int) -> None:
        """Forget a finished row; its output joins the shared trie when there is one."""
        seen = self._rows.pop(row)
        if self._shared is not None and isinstance(seen, RowText):
            self._shared.extend(seen.generated)
            self._shared.cut()
            if self._shared.size > self.global_max_nodes:
                self._shared = self._shared.halved()
