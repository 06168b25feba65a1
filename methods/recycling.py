"""Token Recycling: draft from a table of the target's own recent top-k next-token guesses.

Luo et al., "Turning Trash into Treasure: Accelerating Inference of LLMs with Token
Recycling" (arXiv 2408.08696). Every verification computes the target's logits after the
root and after every draft node, accepted or not. Instead of throwing those away, keep the
top-k tokens of each as a row of a V x k adjacency matrix: `adjacency[x]` = the k likeliest
tokens after the last place `x` was seen. To draft, walk a tree template from the row's
pending token: the node at path (c1, c2, ...) is adjacency[adjacency[root][c1]][c2]...

By default it drafts as MMSpec ran it (`method/recycling/spec_model_recycling.py`,
`SpecModel.specgenerate`, with `evaluation/eval_recycling_mmspec.py`'s defaults, which its
`scripts/*/eval_recycling_mmspec.sh` pass unchanged: matrix_top_k 8, draft_len 10):
- `matrix="per_sample"`: a fresh matrix for every sample and turn (MMSpec builds one per
  `specgenerate` call; a row gets its own at `begin`, or at `join` when it joins a running
  batch, once per turn, so the same).
- `prompt_seed=True`: before decoding, every prompt token's row gets the top-k of the
  prefill's logits at that token, the last occurrence winning. The engine keeps only the
  last position's logits, so the drafter taps the final hidden states of the prompt (the
  `FINAL` feature) and applies the target's LM head itself: what the reference's prefill
  computes, once per prompt.
- `tree="chain"`: the top-1 chain of up to `draft_len` tokens.
- `stops=True`: the chain stops before a token 0 (the reference's matrix starts at zeros
  and reads a top-1 of 0 as "unseen", so a genuine token 0 stops it too), before the image
  placeholder, and before a token that would end an immediate n-gram repeat (n = 1..10) in
  the recent generated tokens (the last 5 * draft_len, none of the prompt) plus the draft.
Token Recycling's own variant: `tree="2.2.2", matrix="shared", prompt_seed=False,
stops=False` (Luowaterbi/TokenRecycling `evaluation/inference_recycling.py`, on Spec-Bench:
the 80-node "2.2.2" static tree, one matrix kept across every query, nothing recycled from
the prefill, no stops). Every option combines with the others; on a tree, a stop drops the
node with its subtree.

Choices beside the references (drafting only; acceptance is the engine's, so lossless):
- Left out of MMSpec, because they change the output: the patched Qwen2.5-VL forward
  passes a one-element `cache_position`, so every chunk position attends to the prefix and
  the chunk's first token only; the fallback step's and the post-acceptance cycle guards
  replace the argmax with another token; `_has_repetitive_tail` ends generation early; its
  acceptance compares argmaxes even when sampling.
- The image-placeholder stop applies to every target; MMSpec knows the id only for
  Qwen2.5-VL (on LLaVA the target would have to rank <image> first for it to matter).
- Rows start at -1, meaning "never seen": nothing is drafted below an unseen token. The
  references start at zeros; without `stops`, that drafts token 0 below every unseen token:
  verification spent on a guess that is almost never right.
- Siblings with the same token are dropped, the first in template order kept, with their
  subtrees (Token Recycling verifies the duplicates). Below the same token a dropped subtree
  would only repeat part of the kept one (the template keeps every path with a choice
  lowered), so nothing that could be accepted is lost.
- Writes go prompt positions first (`begin`; a joining row's at `join`), then per step root
  first, then nodes in tree order, rows in batch order; where a token occurs twice, the last
  write wins (the references index_put on the GPU, which leaves the order unspecified).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mmspec.methods.base import DraftContext, Drafter, StepOutcome
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree
from mmspec.models.feature_taps import FINAL

if TYPE_CHECKING:
    from mmspec.models.target import Target

UNSEEN = -1  # adjacency entry of a token the target has never been verified after
LONGEST_REPEAT = 10  # MMSpec's cycle stop checks n-grams of 1..10 tokens
TAIL_PER_DRAFT_TOKEN = 5  # ... in the last 5 * draft_len generated tokens
# LM head outputs (positions x vocab) computed at once when seeding from the prompt: bounds
# the memory of one chunk (~134 MB in bf16 for a 150k vocabulary)
SEED_CHUNK_LOGITS = 1 << 26

# Spec-Bench's "2.2.2" template (80 nodes, depth 6): each path lists which top-k choice to
# take at each depth below the root. Paths come by depth, siblings by choice.
TEMPLATE_2_2_2: tuple[tuple[int, ...], ...] = (
    *((c,) for c in range(8)),
    *((0, c) for c in range(8)),
    (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1),
    (4, 0), (5, 0), (6, 0), (7, 0),
    *((0, 0, c) for c in range(8)),
    (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 4, 0), (0, 5, 0),
    (0, 6, 0), (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0),
    (5, 0, 0),
    *((0, 0, 0, c) for c in range(5)),
    (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0), (0, 1, 0, 0),
    (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0),
    (0, 0, 1, 0, 0), (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
)  # fmt: skip

TREES = ("2.2.2", "chain")
MATRICES = ("per_sample", "shared")


def template(tree: str, draft_len: int) -> list[tuple[int, ...]]:
    """Template paths of a named tree, parents before children."""
    if tree == "2.2.2":
        return list(TEMPLATE_2_2_2)
    if tree == "chain":
        return [(0,) * d for d in range(1, draft_len + 1)]
    raise ValueError(f"recycling tree must be one of {', '.join(TREES)}; got {tree!r}")


def ends_in_repeat(seq: list[int], longest: int = LONGEST_REPEAT) -> bool:
    """Whether `seq` ends with some n-gram twice in a row, n = 1..longest."""
    return any(seq[-n:] == seq[-2 * n : -n] for n in range(1, min(longest, len(seq) // 2) + 1))


@dataclass
class Stops:
    """MMSpec's reasons to stop a draft line, for one row."""

    banned: frozenset[int]  # never drafted: token 0 and the image placeholder
    tail: list[int]  # recent generated tokens, ending with the root

    def halt(self, line: list[int]) -> bool:
        """Stop before the last token of `line` (the tokens from below the root to here)?"""
        return line[-1] in self.banned or ends_in_repeat([*self.tail, *line])


def expand(
    paths: list[tuple[int, ...]], adjacency: torch.Tensor, root: int, stops: Stops | None = None
) -> tuple[DraftTree, list[int]]:
    """Walk the template from `root` through `adjacency` (V, k) on the CPU.

    Returns the draft tree and, per tree node, the template index it came from. A node is
    dropped with its subtree when its parent was dropped, its parent's row is unseen, an
    earlier sibling already holds its token, or `stops` halts its line.
    """
    rows = adjacency.numpy()  # a view: scalar reads without building tensors
    where = {(): -1}  # template path -> tree node index (-1 = the root) of kept paths
    tokens: list[int] = []
    parents: list[int] = []
    source: list[int] = []
    lines: list[list[int]] = []  # per tree node: the tokens from below the root down to it
    siblings: dict[int, set[int]] = {}  # tree node -> tokens of its kept children
    for i, path in enumerate(paths):
        parent = where.get(path[:-1])
        if parent is None:
            continue
        token = int(rows[root if parent < 0 else tokens[parent], path[-1]])
        taken = siblings.setdefault(parent, set())
        if token == UNSEEN or token in taken:
            continue
        line = [*(lines[parent] if parent >= 0 else []), token]
        if stops is not None and stops.halt(line):
            continue
        taken.add(token)
        where[path] = len(tokens)
        tokens.append(token)
        parents.append(parent)
        source.append(i)
        lines.append(line)
    return DraftTree(tokens, parents), source


def write_last(table: torch.Tensor, tokens: torch.Tensor, best: torch.Tensor) -> None:
    """table[tokens[j]] = best[j] in order: where a token repeats, its last j wins.

    index_put with repeated indices keeps an unspecified one, so pick the last ourselves.
    """
    unique, inverse = torch.unique(tokens, return_inverse=True)
    order = torch.arange(len(tokens))
    last = torch.zeros(len(unique), dtype=torch.long).scatter_reduce(0, inverse, order, "amax")
    table[unique] = best[last]


def recycle(
    tables: list[torch.Tensor], roots: list[int], trees: list[DraftTree], logits: torch.Tensor
) -> None:
    """Write the top-k of each verified position into its row's table, in place.

    Args:
        tables: (active,) (vocab, k) int64 on the CPU; rows may share one.
        roots: (active,) the token each row fed at q-index 0.
        trees: (active,) the verified trees; node i is q-index i + 1, later ones are padding.
        logits: (active, q, vocab) on any device.
    """
    # one topk for the whole step; only (active, q, k) indices leave the device
    best = logits.topk(tables[0].shape[1], dim=-1).indices.cpu()
    for table, root, tree, row_best in zip(tables, roots, trees, best):
        fed = torch.tensor([root, *tree.tokens], dtype=torch.long)
        write_last(table, fed, row_best[: len(fed)])  # padding q-indices are not read


@register("recycling")
class TokenRecycling(Drafter):
    """Training-free; drafts from an adjacency matrix refreshed by every verification.

    Args (defaults: MMSpec's runs; see the module docstring):
        tree: "chain" (top-1 chain) or "2.2.2" (Spec-Bench's 80-node static tree).
        draft_len: chain length; with `stops`, also sets the repeat check's window.
        topk: successors kept per token (columns of the adjacency matrix).
        matrix: "per_sample" (fresh each sample and turn) or "shared" (kept for the
            drafter's life, across batches and samples).
        prompt_seed: seed the prompt tokens' rows from the prefill's logits.
        stops: stop a line before token 0, the image placeholder or an immediate repeat.
    """

    @classmethod
    def drafts_tree(cls, args: Mapping[str, Any]) -> bool:
        return args.get("tree", "chain") != "chain"  # MMSpec's default is the chain

    def __init__(
        self,
        tree: str = "chain",
        draft_len: int = 10,
        topk: int = 8,
        matrix: str = "per_sample",
        prompt_seed: bool = True,
        stops: bool = True,
    ) -> None:
        if draft_len < 1:
            raise ValueError(f"recycling needs draft_len >= 1, got {draft_len}")
        if topk < 1:
            raise ValueError(f"recycling needs topk >= 1, got {topk}")
        if matrix not in MATRICES:
            raise ValueError(
                f"recycling matrix must be one of {', '.join(MATRICES)}; got {matrix!r}"
            )
        for name, flag in (("prompt_seed", prompt_seed), ("stops", stops)):
            if not isinstance(flag, bool):
                raise ValueError(f"recycling {name} must be true or false, got {flag!r}")
        self.paths = template(tree, draft_len)
        widest = 1 + max(c for p in self.paths for c in p)
        if topk < widest:
            raise ValueError(f"recycling tree {tree!r} needs topk >= {widest}, got {topk}")
        self.tree, self.draft_len, self.topk, self.matrix = tree, draft_len, topk, matrix
        self.prompt_seed, self.stops = prompt_seed, stops
        # the engine then hands `begin` the prompt's final hidden states, for the LM head (it
        # taps them at each verification too: references to tensors it computes anyway)
        self.features = (FINAL,) if prompt_seed else ()
        self.head: torch.nn.Module | None = None
        self.banned: frozenset[int] = frozenset()
        self.vocab = 0
        # (vocab, topk) int64 on the CPU. CPU because drafting walks it in Python (one scalar
        # read per node); on a GPU each read would be a device sync, while an update only
        # moves the (active, q, topk) indices of one topk off the device.
        self.adjacency = torch.empty(0, topk, dtype=torch.long)  # matrix="shared"
        self.tables: dict[int, torch.Tensor] = {}  # matrix="per_sample": batch row -> table

    def load(self, target: Target) -> None:
        self.head = target.model.get_output_embeddings()
        self.vocab = self.head.weight.shape[0]
        if self.vocab < self.topk:
            raise ValueError(f"recycling topk={self.topk} exceeds the vocabulary ({self.vocab})")
        self.banned = frozenset({0, target.image_token_id})
        if self.matrix == "shared":
            self.adjacency = self._blank()

    def _blank(self) -> torch.Tensor:
        return torch.full((self.vocab, self.topk), UNSEEN, dtype=torch.long)

    def _tables(self, ctx: DraftContext) -> list[torch.Tensor]:
        """The table each active row drafts from and writes to."""
        if self.matrix == "shared":
            return [self.adjacency] * len(ctx.rows)
        return [self.tables[r] for r in ctx.rows]

    def begin(self, ctx: DraftContext) -> None:
        if self.matrix == "per_sample":  # ~10 MB a row for a 152k vocabulary at topk 8
            self.tables = {r: self._blank() for r in ctx.rows}
        if self.prompt_seed:
            self._seed(ctx)

    def join(self, ctx: DraftContext) -> None:
        """Joining rows start as `begin` starts them: per sample, a fresh table each, seeded
        from the row's own prompt, the running rows' untouched; with the shared matrix, their
        prompts are seeded into it, as `begin` seeds every row's."""
        if self.matrix == "per_sample":
            self.tables.update({r: self._blank() for r in ctx.rows})
        if self.prompt_seed:
            self._seed(ctx)

    @torch.inference_mode()
    def _seed(self, ctx: DraftContext) -> None:
        """Each prompt token's row = top-k of the prefill's logits after it (last one wins)."""
        final = ctx.extras.get("features", {}).get(FINAL)
        if final is None or self.head is None:
            raise RuntimeError(
                "recycling prompt_seed needs the prompt's final hidden states in begin's "
                "or join's ctx.extras['features'] (the engine taps Drafter.features after load)"
            )
        chunk = max(1, SEED_CHUNK_LOGITS // self.vocab)
        for table, tokens, n, hidden in zip(self._tables(ctx), ctx.tokens, ctx.prompt_lens, final):
            hidden = hidden[hidden.shape[0] - n :]  # left padded: the row's positions are last
            best = torch.cat(
                [
                    self.head(hidden[s : s + chunk]).topk(self.topk, dim=-1).indices.cpu()
                    for s in range(0, n, chunk)
                ]
            )
            write_last(table, torch.tensor(tokens[:n], dtype=torch.long), best)

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        if self.matrix == "per_sample":
            # rows that finished are gone from ctx: free their tables, or a request stream
            # (`Engine.serve`) would keep one per request it ever served
            self.tables = {r: self.tables[r] for r in ctx.rows}
        trees = []
        for table, tokens, n in zip(self._tables(ctx), ctx.tokens, ctx.prompt_lens):
            stops = None
            if self.stops:
                window = TAIL_PER_DRAFT_TOKEN * self.draft_len
                stops = Stops(self.banned, tokens[max(n, len(tokens) - window) :])
            trees.append(expand(self.paths, table, tokens[-1], stops)[0])
        return trees

    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        """Set table[x] = topk(logits after x) for each row's root and every tree node."""
        recycle(self._tables(ctx), [t[-1] for t in ctx.tokens], outcome.trees, outcome.logits)
