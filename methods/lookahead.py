"""Lookahead (Ant Group's trie retrieval): draft a tree of the most frequent continuations.

Reference: Zhao et al., "Lookahead: An Inference Acceleration Framework for Large Language
Models with Lossless Generation Accuracy" (`alipay/PainlessInferenceAcceleration`, the
`LookaheadCache` that MMSpec copies into `method/lookahead`). Model-free like PLD, but where
PLD drafts one earlier occurrence of the suffix, Lookahead pools all of them in a tree:

- Each row keeps a trie of every n-gram of its token stream up to
  `max_query_length + branch_length` tokens long, with how often it occurs. The prompt goes
  in at `begin`, each emitted token in `update`, so a phrase is retrievable as soon as it
  has been produced.
- To draft, the row's last `max_query_length` tokens (ending with the pending token, the
  tree's root) are looked up, longest suffix first. Below the matched trie node lies every
  continuation ever seen after that suffix; the draft keeps the `decoding_length` most
  frequent ones, at most `branch_length` deep. A longer match that offers less than a
  branch's worth of tokens gives way to the next shorter one, as in the reference.
- With `global_trie`, the generated tokens of finished rows also go into one trie shared by
  every later request (the reference's "output" counts), consulted with a small weight.

Where we differ from the reference, and why:
- One count per n-gram, prompt and output alike: the reference keeps separate input and
  output counts mixed 1 : 1e-4 and resets input counts only at a `final` call that MMSpec
  skips on EOS, so old prompts leak into later requests. Here a row sees its own text;
  other requests only through `global_trie`, which is off by default so a sample's drafts
  do not depend on which samples ran before it on the same worker.
- Emitted tokens are counted at once; the reference's `stream_put` waits until a full
  window of `branch_length` tokens has been generated.
- The tree is the top `decoding_length` continuations by count (best-first). The reference
  walks depth-first above a count threshold; its threshold computation is broken (it
  collects `None` indices), which in MMSpec's setting drops every node of a large subtree.
- `decoding_length` counts draft nodes; the reference's 64 includes the root token.
- Queries are the last `max_query_length` = 2 tokens, as in Ant's code. MMSpec's copy tries
  every suffix of the whole sequence, but with its 13-token windows a match of 3 or more
  tokens only wins when it branches; the n-grams here are 14 long, like Ant's.
- The engine verifies the tree as a tree. MMSpec's copy verified the flattened tree as one
  chain, so only the first (most frequent) branch could ever be accepted.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Sequence

from mmspec.methods.base import DraftContext, Drafter, StepOutcome
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree

# Weight of the shared trie's counts next to a row's own: a row's own text predicts it far
# better, so shared counts only break ties and fill in where the row has seen nothing.
# The reference mixes its output counts in with the same weight.
GLOBAL_WEIGHT = 1e-4


class NgramTrie:
    """Occurrence counts of every n-gram (n <= max_len) of token streams fed incrementally.

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
                child = self._edges.get(node << 32 | tok, -1)
                if child < 0:
                    child = self._add(node, tok, 0)
                self.counts[child] += 1
                ends[i] = child
            self._open = ends[: self.max_len - 1]

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
    """Every token seen after the cursor's path, with its weighted count and its cursor."""
    out: dict[int, tuple[float, Cursor]] = {}
    for trie, node, w in cursor:
        for child in trie.children(node):
            tok = trie.tokens[child]
            score, cur = out.get(tok, (0.0, []))
            out[tok] = (score + w * trie.counts[child], [*cur, (trie, child, w)])
    return out


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


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"lookahead needs {name} to be an integer >= 1, got {value!r}")
    return value


@register("lookahead")
class Lookahead(Drafter):
    """Trie-retrieval Lookahead. MMSpec's settings: decoding_length 64, branch_length 12.

    Args:
        decoding_length: most draft tokens per tree (root excluded).
        branch_length: deepest a draft branch goes.
        max_query_length: longest suffix matched against the trie.
        global_trie: also draft from the outputs of earlier requests this drafter served.
        global_max_nodes: size at which the shared trie is pruned.
    """

    def __init__(
        self,
        decoding_length: int = 64,
        branch_length: int = 12,
        max_query_length: int = 2,
        global_trie: bool = False,
        global_max_nodes: int = 1 << 16,
    ) -> None:
        self.decoding_length = _positive_int("decoding_length", decoding_length)
        self.branch_length = _positive_int("branch_length", branch_length)
        self.max_query_length = _positive_int("max_query_length", max_query_length)
        if not isinstance(global_trie, bool):
            raise ValueError(
                f"lookahead needs global_trie to be true or false, got {global_trie!r}"
            )
        self.global_max_nodes = _positive_int("global_max_nodes", global_max_nodes)
        # n-grams long enough that a full-length query still has a full branch below it
        self._gram = self.max_query_length + self.branch_length
        # a match offering fewer draft tokens falls back to a shorter suffix; the reference
        # asks for branch_length tokens counting the root
        self._enough = min(self.branch_length - 1, self.decoding_length)
        self._tries: dict[int, NgramTrie] = {}  # batch row -> trie of its prompt and output
        self._generated: dict[int, list[int]] = {}  # batch row -> its output, for the shared trie
        self._shared = NgramTrie(self._gram) if global_trie else None

    def begin(self, ctx: DraftContext) -> None:
        for row in list(self._tries):
            self._retire(row)
        for i in range(len(ctx.rows)):
            self._trie(ctx, i)

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        return [self._draft(self._trie(ctx, i), tokens) for i, tokens in enumerate(ctx.tokens)]

    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        finished = [row for row in self._tries if row not in ctx.rows]  # since the last step
        for row in finished:
            self._retire(row)
        for i, emitted in enumerate(outcome.emitted):
            self._trie(ctx, i).extend(emitted)
            self._generated[ctx.rows[i]].extend(emitted)

    def _draft(self, trie: NgramTrie, tokens: list[int]) -> DraftTree:
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

    def _trie(self, ctx: DraftContext, i: int) -> NgramTrie:
        """Active row i's trie, built from its tokens the first time the row is seen."""
        row = ctx.rows[i]
        if row not in self._tries:
            trie = self._tries[row] = NgramTrie(self._gram)
            trie.extend(ctx.tokens[i])
            self._generated[row] = ctx.tokens[i][ctx.prompt_lens[i] :]
        return self._tries[row]

    def _retire(self, row: int) -> None:
        """Forget a finished row; its output joins the shared trie when there is one."""
        del self._tries[row]
        generated = self._generated.pop(row)
        if self._shared is not None:
            self._shared.extend(generated)
            self._shared.cut()
            if self._shared.size > self.global_max_nodes:
                self._shared = self._shared.halved()
