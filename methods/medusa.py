"""Medusa: extra decoding heads on the target's last hidden state draft a tree of guesses.

Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding
Heads" (ICML 2024). By default this is MMSpec's Medusa (MMSpec `method/medusa/cnets_medusa.py`
`Model` and `topK_genrate`, trained by `train/main_medusa.py`); the paper's own form
(FasterDecoding/Medusa `medusa/model/medusa_model.py`, `medusa_choices.py`) is an option.

The target's LM head reads its final hidden state h_t (after the final norm: the `FINAL`
feature) and predicts token t+1 - here the pending token, the root of the draft tree. Medusa
head k (0-based) reads the same h_t and predicts token t+2+k directly, without seeing the
tokens in between. A head is `num_layers` ResBlocks, ResBlock(x) = x + SiLU(W x + b) with W
zero at the start, and then a map to the vocabulary, the head's `projection`:

- `target` (default, MMSpec): the target's own LM head. The blocks learn to predict the
  target's hidden state at t+1+k (smooth L1) and, through the LM head, its distribution of
  token t+2+k (soft cross-entropy, weight 0.1), averaged over the heads - EAGLE's loss, as
  MMSpec trains its Medusa (on ShareGPT text; here, like every head of the project, on the
  target's own answers, images included). MMSpec hard-codes 3 heads of one block.
- `own` (the paper's Medusa-1): a vocabulary projection per head, initialised as a copy of
  the LM head, trained by cross-entropy on the target's own tokens, head k weighted 0.8**k
  (Medusa-2's decay coefficient); this project used 4 heads.

The head shape (`num_heads`, `num_layers`, `projection`) is saved in the checkpoint's
config.json; how the tree is drafted is the drafter's `tree` argument:

- `beam` (default, MMSpec's `topK_genrate`, an EAGLE-2-style beam over the heads): head 0's
  top_k tokens are the root's children, scored by their log-probabilities. For each further
  head, every node of the frontier gets the same top_k tokens of that head (heads do not see
  each other's choice), scored parent + log-probability; the top_k best of those k*k are the
  next frontier. Of all levels' candidates the `total_token - 1` best form the tree (the root,
  the pending token, is the first of the total). Every head is used: MMSpec passes a `depth`
  that `topK_genrate` never reads. Its defaults: top_k 8, total_token 30.
- `static` (the paper's): a fixed list of paths (`MEDUSA_TREE`, Medusa's 63-node
  "mc_sim_7b_63", or a grid's own list): the node (c1, ..., cd) is head d-1's c_d-th
  likeliest token, the same whatever its parent is. The list is cut to the heads' depth.

Drafting costs one small forward per step and no cache of the head's own. Acceptance is the
engine's (greedy, or lossless sampling); the references' "typical acceptance" is not lossless
and is left out.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.methods.base import DraftContext, Drafter, StepOutcome, kept_rows
from mmspec.methods.head_config import DraftConfig
from mmspec.methods.head_training import TeacherBatch, uniform_noise
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree
from mmspec.methods.tree_search import _Node, _select
from mmspec.models.feature_taps import FINAL, Feature
from mmspec.models.target import Target

# Medusa's `mc_sim_7b_63` (medusa/model/medusa_choices.py): found by simulating acceptance
# of Vicuna-7B's heads on held-out data; listed in the reference's order.
MEDUSA_TREE: tuple[tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
    (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
    (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0),
    (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0),
    (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2),
    (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0),
    (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)  # fmt: skip

# the head's shape by default: MMSpec's (cnets_medusa.Model hard-codes 3 heads of 1 block)
NUM_HEADS = 3
NUM_LAYERS = 1
PROJECTION = "target"
PROJECTIONS = ("target", "own")
TREES = ("beam", "static")
# MMSpec's loss weights (train/main_medusa.py train_config v_w, p_w)
V_W, P_W = 1.0, 0.1
DECAY = 0.8  # `own` heads: per-head loss weight decay (Medusa-2's medusa_decay_coefficient)
PREFIX = "medusa_head."  # state-dict prefix of the heads, as Medusa-1.0 and MMSpec save them
_HEAD_KEY = re.compile(r"medusa_head\.(\d+)\.(\d+)\.")


class ResBlock(nn.Module):
    """x + SiLU(Linear(x)); the weight starts at zero so the block starts as the identity
    plus a constant (the references' init)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """`num_heads` heads over the target's final hidden state; head k predicts token t+2+k.

    State-dict keys `medusa_head.{k}.{j}.linear.*` (ResBlock j) and, with `own` projections,
    `medusa_head.{k}.{num_layers}.weight`: the references' module names, so their checkpoints
    map by a prefix at most. MMSpec writes `[ResBlock(h)] * num_layers`, one block shared
    within a head; with its single block that is the same as ours, independent blocks.
    """

    target_features: tuple[Feature, ...] = (FINAL,)

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        extra = dict(config.extra)
        if "num_heads" in extra and "projection" not in extra:
            # a config.json written before projections were an option: every head had its own
            extra["projection"] = "own"
        # write the defaults into the config so the saved config.json records the shape
        extra = {
            "num_heads": NUM_HEADS,
            "num_layers": NUM_LAYERS,
            "projection": PROJECTION,
            **extra,
        }
        self.config = dataclasses.replace(config, extra=extra)
        self.num_heads, self.num_layers = int(extra["num_heads"]), int(extra["num_layers"])
        self.projection = extra["projection"]
        if self.projection not in PROJECTIONS:
            raise ValueError(
                f"medusa projection must be one of {', '.join(PROJECTIONS)}, "
                f"got {self.projection!r}"
            )
        # a target-projection head without a block would be the LM head itself
        least = 1 if self.projection == "target" else 0
        if self.num_heads < 1 or self.num_layers < least:
            raise ValueError(
                f"medusa needs num_heads >= 1 and num_layers >= {least}, "
                f"got {self.num_heads} and {self.num_layers}"
            )
        self.medusa_head = nn.ModuleList(self._head(config) for _ in range(self.num_heads))
        # A fresh `own` head takes its projections from the target's LM head on the first
        # `train_loss` (the trainer builds heads without the target at hand); loading any
        # weights counts as initialised, so fine-tuning a checkpoint keeps them.
        self.initialised = self.projection == "target"
        self.register_load_state_dict_post_hook(_mark_initialised)

    def _head(self, config: DraftConfig) -> nn.Sequential:
        h = config.hidden_size
        blocks = [ResBlock(h) for _ in range(self.num_layers)]
        if self.projection == "own":
            blocks.append(nn.Linear(h, config.vocab_size, bias=False))
        return nn.Sequential(*blocks)

    def init_from_target(self, lm_head: nn.Module) -> None:
        """Every `own` head's vocabulary projection := the target's LM head (Medusa v0.1's
        init); `target` heads already use it."""
        if self.projection == "own":
            with torch.no_grad():
                for head in self.medusa_head:
                    head[-1].weight.copy_(lm_head.weight)
        self.initialised = True

    def forward(
        self, hidden: torch.Tensor, lm_head: nn.Module | None = None, heads: int | None = None
    ) -> torch.Tensor:
        """Final hidden states (…, h) -> logits of the first `heads` heads (heads, …, V).

        `lm_head` (the target's) is needed by `target` projections only."""
        x = hidden.to(next(self.parameters()).dtype)
        out = torch.stack([head(x) for head in self.medusa_head[: heads or self.num_heads]])
        if self.projection == "own":
            return out
        if lm_head is None:
            raise ValueError("medusa heads with projection 'target' need the target's LM head")
        return lm_head(out.to(lm_head.weight.dtype))

    def train_loss(
        self, batch: TeacherBatch, embed: nn.Module, lm_head: nn.Module, noise: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Head k at position t against the target's token t+2+k, on answer tokens: MMSpec's
        feature + distribution loss for `target` projections, Medusa-1's cross-entropy for
        `own` ones (see the module docstring)."""
        if not self.initialised:
            self.init_from_target(lm_head)
        clean = batch.features[FINAL]
        feats = uniform_noise(clean.to(next(self.parameters()).dtype), noise)
        length = feats.shape[1]
        total = feats.new_zeros(())
        parts: dict[str, float] = {}
        for k, head in enumerate(self.medusa_head):
            shift = 2 + k
            if shift >= length:
                break
            # left padding: position t real and token t+shift an answer token (answers are
            # real tokens, and every position after a real one is real)
            valid = batch.real[:, :-shift] & batch.answer[:, shift:] & batch.real[:, shift:]
            if not bool(valid.any()):
                continue
            # only the positions that count go through the V-wide projection
            out = head(feats[:, :-shift][valid])
            if self.projection == "own":
                logits = out.float()
                labels = batch.input_ids[:, shift:][valid]
                loss = F.cross_entropy(logits, labels)
                total = total + DECAY**k * loss
                hits = logits.argmax(-1) == labels
            else:
                # the target's hidden state at t+1+k and its distribution of token t+2+k
                want_h = clean[:, shift - 1 : length - 1][valid]
                want_p = torch.softmax(batch.logits[:, shift - 1 : length - 1][valid].float(), -1)
                logp = torch.log_softmax(lm_head(out.to(lm_head.weight.dtype)).float(), -1)
                v = F.smooth_l1_loss(out.float(), want_h.float(), reduction="none").mean(-1)
                p = -(want_p * logp).sum(-1)
                loss = V_W * v.mean() + P_W * p.mean()
                # MMSpec averages over the heads
                total = total + loss / self.num_heads
                hits = logp.argmax(-1) == want_p.argmax(-1)
                parts[f"v_loss_{k}"] = float(v.mean().detach())
                parts[f"p_loss_{k}"] = float(p.mean().detach())
            parts[f"loss_{k}"] = float(loss.detach())
            parts[f"acc_{k}"] = float(hits.float().mean())
        if not parts:  # nothing to learn in this batch: a zero that still has a graph
            total = sum(p.sum() for p in self.parameters()) * 0.0
        parts["acc"] = parts.get("acc_0", 0.0)
        return total, parts

    @classmethod
    def from_reference(
        cls, raw: dict[str, Any], state: dict[str, torch.Tensor], target: Target, where: str
    ) -> tuple[DraftConfig, dict[str, torch.Tensor]]:
        """A reference Medusa checkpoint: the paper's (config names `medusa_num_heads`;
        v0.1's medusa_lm_head.pt keys `{k}.{j}...`, or a Medusa-1.0 repo's with the
        `medusa_head.` prefix) or MMSpec's (a LLaMA-style config.json and the keys
        `medusa_head.{k}.0.linear.*` beside the frozen `embed_tokens.weight`)."""
        if "medusa_num_heads" not in raw:
            return cls._from_mmspec(raw, state, target, where)
        from mmspec.methods.draft_checkpoint import CheckpointError

        if any(k.startswith(PREFIX) for k in state):
            # a full model repo: the base model's own weights sit beside the heads
            state = {k: v for k, v in state.items() if not k.startswith(("model.", "lm_head."))}
        else:
            state = {PREFIX + k: v for k, v in state.items()}
        try:
            heads = int(raw["medusa_num_heads"])
            layers = int(raw.get("medusa_num_layers", NUM_LAYERS))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}/config.json: not a Medusa config ({exc!r})") from exc
        config = DraftConfig.for_target(
            "medusa", target, num_heads=heads, num_layers=layers, projection="own"
        )
        # v0.1 configs name only the heads: take the shape from the projection's weight so
        # a head made for another model is reported as such, not loaded
        proj = state.get(f"{PREFIX}0.{layers}.weight")
        vocab, hidden = (config.vocab_size, config.hidden_size) if proj is None else proj.shape
        config = dataclasses.replace(
            config,
            hidden_size=int(raw.get("hidden_size") or hidden),
            vocab_size=int(raw.get("vocab_size") or vocab),
        )
        return config, state

    @classmethod
    def _from_mmspec(
        cls, raw: dict[str, Any], state: dict[str, torch.Tensor], target: Target, where: str
    ) -> tuple[DraftConfig, dict[str, torch.Tensor]]:
        from mmspec.methods.draft_checkpoint import CheckpointError

        # MMSpec's Model holds a frozen copy of the target's embedding it never reads
        state = {k: v for k, v in state.items() if k != "embed_tokens.weight"}
        found = [m for m in map(_HEAD_KEY.match, state) if m]
        if not found:
            raise CheckpointError(
                f"{where}: neither the paper's Medusa (config.json names medusa_num_heads) nor "
                f"MMSpec's (keys medusa_head.<k>.0.linear.*); keys: {sorted(state)[:5]}"
            )
        heads = 1 + max(int(m[1]) for m in found)
        layers = 1 + max(int(m[2]) for m in found)
        config = DraftConfig.for_target(
            "medusa", target, num_heads=heads, num_layers=layers, projection="target"
        )
        block = state.get(f"{PREFIX}0.0.linear.weight")
        hidden = config.hidden_size if block is None else block.shape[-1]
        config = dataclasses.replace(
            config,
            hidden_size=int(raw.get("hidden_size") or hidden),
            vocab_size=int(raw.get("vocab_size") or config.vocab_size),
        )
        return config, state


def _mark_initialised(module: nn.Module, incompatible_keys: Any) -> None:
    module.initialised = True


def tree_paths(tree: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The paths of a static tree, parents first and siblings by choice; checks prefixes."""
    paths = sorted({tuple(int(c) for c in p) for p in tree}, key=lambda p: (len(p), p))
    if not paths or not paths[0]:
        raise ValueError(f"a medusa tree needs non-empty paths, got {list(tree)!r}")
    if any(c < 0 for p in paths for c in p):
        raise ValueError("medusa tree choices are top-k ranks, >= 0")
    known = set(paths)
    missing = [p for p in paths if len(p) > 1 and p[:-1] not in known]
    if missing:
        raise ValueError(f"medusa tree misses the parents of {missing[:3]}")
    return paths


def beam_trees(logp: torch.Tensor, top_k: int, total_token: int) -> list[DraftTree]:
    """MMSpec's tree (`topK_genrate`) from the heads' log-probs (heads, b, V), one per row.

    Level 1: head 0's top_k tokens. Level d+1: each of the top_k best nodes of level d (by
    cumulative log-probability) gets head d's top_k tokens, scored parent + log-prob. The tree
    is the `total_token - 1` best candidates of all levels; a parent scores at least as high
    as its children, so they form a tree (`_select` keeps it one on ties).
    """
    heads, rows, vocab = logp.shape
    k = min(top_k, vocab)
    top = logp.float().topk(k, dim=-1)
    scores, tokens = top.values.tolist(), top.indices.tolist()  # (heads, b, k)
    trees = []
    for i in range(rows):
        cands = [_Node(t, -1, s, 1) for t, s in zip(tokens[0][i], scores[0][i])]
        frontier = list(range(k))
        for d in range(1, heads):
            start = len(cands)
            cands += [
                _Node(t, f, cands[f].score + s, d + 1)
                for f in frontier
                for t, s in zip(tokens[d][i], scores[d][i])
            ]
            # a stable sort: on ties the earlier candidate, as the reference's topk mostly does
            level = sorted(range(start, len(cands)), key=lambda c: -cands[c].score)
            frontier = level[:k]
        trees.append(_select(cands, total_token - 1))
    return trees


def _pending_hidden(ctx: DraftContext) -> torch.Tensor:
    """(b, h) the final hidden state the LM head read to predict each row's pending token: the
    prompt's last position, the last column for every row as prompts are left padded."""
    return ctx.extras["features"][FINAL][:, -1].clone()


def _int_arg(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"medusa {name} must be an integer >= {least}, got {value!r}")
    return value


@register("medusa")
class Medusa(Drafter):
    """Drafts a tree of the Medusa heads' top tokens (see the module docstring).

    Args:
        checkpoint: folder or hub id of the heads (ours, or the paper's or MMSpec's
            reference checkpoints); default: the zoo's trained heads for the target.
        tree: "beam" (MMSpec's, default), "static" (`MEDUSA_TREE`, the paper's) or a static
            tree's paths (each a list of top-k ranks, one per depth); static paths deeper
            than the checkpoint's heads are dropped.
        top_k: the beam's width (tokens per head and frontier nodes per level); beam only.
        total_token: the beam tree's size, the pending token included; beam only.
    """

    training_free: ClassVar[bool] = False
    tree_drafting: ClassVar[bool] = True  # the beam and the static tree alike
    head_cls: ClassVar[type[nn.Module]] = MedusaHeads
    features: tuple[Feature, ...] = (FINAL,)

    def __init__(
        self,
        checkpoint: str | None = None,
        tree: str | Sequence[Sequence[int]] = "beam",
        top_k: int = 8,
        total_token: int = 30,
    ) -> None:
        from mmspec.methods.draft_checkpoint import check_checkpoint_arg

        self.checkpoint = check_checkpoint_arg(checkpoint)
        if isinstance(tree, str):
            if tree not in TREES:
                raise ValueError(
                    f"medusa tree must be {' or '.join(TREES)} or a list of paths, got {tree!r}"
                )
            tree = MEDUSA_TREE if tree == "static" else tree
        # None: the beam; else the static tree's paths
        self.tree = None if tree == "beam" else tree_paths(tree)
        self.top_k = _int_arg("top_k", top_k, 1)
        self.total_token = _int_arg("total_token", total_token, 2)
        self.head: Any = None

    def load(self, target: Target) -> None:
        from mmspec.methods.draft_checkpoint import load_head

        self.head = load_head("medusa", MedusaHeads, target, self.checkpoint)
        self.head.to(device=target.device, dtype=target.dtype).eval()
        self.lm_head = target.model.get_output_embeddings()
        self.depth = self.head.num_heads
        if self.tree is None:
            return
        # the static tree cut to the depth the heads reach
        self.paths = paths = [p for p in self.tree if len(p) <= self.head.num_heads]
        index = {p: i for i, p in enumerate(paths)}
        self.parents = [index[p[:-1]] if len(p) > 1 else -1 for p in paths]
        self.depth = max(len(p) for p in paths)
        self.width = 1 + max(p[-1] for p in paths)
        if self.width > self.head.config.vocab_size:
            raise ValueError(f"medusa tree needs top-{self.width} of a smaller vocabulary")
        # node i is head (depth - 1)'s (last choice)-th token: one gather drafts every row
        dev = target.device
        self.node_head = torch.tensor([len(p) - 1 for p in paths], device=dev)
        self.node_rank = torch.tensor([p[-1] for p in paths], device=dev)

    @torch.inference_mode()
    def begin(self, ctx: DraftContext) -> None:
        self.hidden = _pending_hidden(ctx)
        self.rows = list(ctx.rows)

    @torch.inference_mode()
    def join(self, ctx: DraftContext) -> None:
        # the saved rows may still hold rows the engine dropped since: `_follow` maps them
        self.hidden = torch.cat([self.hidden, _pending_hidden(ctx)])
        self.rows += ctx.rows

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        self._follow(ctx.rows)
        logits = self.head(self.hidden, self.lm_head, self.depth)  # (depth, b, V)
        if self.tree is None:
            return beam_trees(torch.log_softmax(logits.float(), -1), self.top_k, self.total_token)
        top = logits.topk(self.width, dim=-1).indices  # (depth, b, width)
        tokens = top[self.node_head, :, self.node_rank].T.tolist()  # (b, nodes)
        return [DraftTree(row, list(self.parents)) for row in tokens]

    @torch.inference_mode()
    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        assert outcome.features is not None
        feats = outcome.features[FINAL]  # (b, q, h)
        # the last accepted node (the root if none) is where the bonus token - the next
        # pending token - was predicted from
        last = torch.tensor([p[-1] + 1 if p else 0 for p in outcome.paths], device=feats.device)
        self.hidden = feats[torch.arange(feats.shape[0], device=feats.device), last]
        self.rows = list(ctx.rows)

    def _follow(self, rows: list[int]) -> None:
        """Drop the state of rows the engine dropped since the last call."""
        keep = kept_rows(self.rows, rows)
        if keep is None:
            return
        idx = torch.tensor(keep, device=self.hidden.device)
        self.hidden = self.hidden.index_select(0, idx)
        self.rows = list(rows)
