"""Medusa: extra decoding heads on the target's last hidden state draft a Cartesian tree.

Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding
Heads" (ICML 2024); reference: FasterDecoding/Medusa `medusa/model/medusa_model.py` and
`medusa_choices.py`, Spec-Bench `model/medusa`.

The target's LM head reads its final hidden state h_t (after the final norm: the `FINAL`
feature) and predicts token t+1 - here the pending token, the root of the draft tree. Medusa
head k (0-based) reads the same h_t and predicts token t+2+k directly, without seeing the
tokens in between. A head is `ResBlock x num_layers` then a linear map to the vocabulary,
with ResBlock(x) = x + SiLU(W x + b); W starts at zero and the final linear as a copy of the
target's LM head, so an untrained head begins as "the LM head again".

Drafting costs one small forward per step and no cache of the head's own: the tree is the
top-10 tokens of every head arranged by a fixed list of paths (`MEDUSA_TREE`, Medusa's
63-node "mc_sim_7b_63"): the node (c1, ..., cd) is head d-1's c_d-th likeliest token, the
same whatever its parent is (heads are independent of each other's choice). The path list
is cut to the depth the heads reach; a grid may give another list (`tree`). Acceptance is
the engine's (greedy, or lossless sampling); the reference's "typical acceptance" is not
lossless and is left out.

Training (`train_loss`) is Medusa-1: the target stays frozen and each head learns the
target's own next tokens by cross-entropy on answer tokens; head k is weighted 0.8**k
(Medusa-2's decay coefficient; Medusa-1's legacy script sums the heads unweighted).
"""

from __future__ import annotations

import dataclasses
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

NUM_HEADS = 4  # the reference trains 5; the tree above reaches depth 4, so a 5th goes unused
NUM_LAYERS = 1
DECAY = 0.8  # per-head loss weight decay (Medusa-2's medusa_decay_coefficient)
PREFIX = "medusa_head."  # state-dict prefix of the heads, as Medusa-1.0 full repos save them


class ResBlock(nn.Module):
    """x + SiLU(Linear(x)); the weight starts at zero so the block starts as the identity
    plus a constant (the reference's init)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """`num_heads` heads over the target's final hidden state; head k predicts token t+2+k.

    State-dict keys `medusa_head.{k}.{j}.linear.*` (ResBlock j) and
    `medusa_head.{k}.{num_layers}.weight` (the vocabulary projection): the reference's
    module names, so its checkpoints map by a prefix at most.
    """

    target_features: tuple[Feature, ...] = (FINAL,)

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        # write the defaults into the config so the saved config.json records the shape
        extra = {"num_heads": NUM_HEADS, "num_layers": NUM_LAYERS, **config.extra}
        self.config = dataclasses.replace(config, extra=extra)
        self.num_heads, self.num_layers = int(extra["num_heads"]), int(extra["num_layers"])
        if self.num_heads < 1 or self.num_layers < 0:
            raise ValueError(
                f"medusa needs num_heads >= 1 and num_layers >= 0, "
                f"got {self.num_heads} and {self.num_layers}"
            )
        h, v = config.hidden_size, config.vocab_size
        self.medusa_head = nn.ModuleList(
            nn.Sequential(
                *(ResBlock(h) for _ in range(self.num_layers)), nn.Linear(h, v, bias=False)
            )
            for _ in range(self.num_heads)
        )
        # A fresh head takes its projections from the target's LM head on the first
        # `train_loss` (the trainer builds heads without the target at hand); loading any
        # weights counts as initialised, so fine-tuning a checkpoint keeps them.
        self.initialised = False
        self.register_load_state_dict_post_hook(_mark_initialised)

    def init_from_target(self, lm_head: nn.Module) -> None:
        """Every head's vocabulary projection := the target's LM head (Medusa v0.1's init)."""
        weight = lm_head.weight
        with torch.no_grad():
            for head in self.medusa_head:
                head[-1].weight.copy_(weight)
        self.initialised = True

    def forward(self, hidden: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """Final hidden states (…, h) -> logits of the first `heads` heads (heads, …, V)."""
        x = hidden.to(self.medusa_head[0][-1].weight.dtype)
        return torch.stack([head(x) for head in self.medusa_head[: heads or self.num_heads]])

    def train_loss(
        self, batch: TeacherBatch, embed: nn.Module, lm_head: nn.Module, noise: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Medusa-1: head k's cross-entropy against the target's token t+2+k on answers."""
        if not self.initialised:
            self.init_from_target(lm_head)
        dtype = self.medusa_head[0][-1].weight.dtype
        feats = uniform_noise(batch.features[FINAL].to(dtype), noise)
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
            logits = head(feats[:, :-shift][valid]).float()
            labels = batch.input_ids[:, shift:][valid]
            ce = F.cross_entropy(logits, labels)
            total = total + DECAY**k * ce
            parts[f"loss_{k}"] = float(ce.detach())
            parts[f"acc_{k}"] = float((logits.argmax(-1) == labels).float().mean())
        if not parts:  # nothing to learn in this batch: a zero that still has a graph
            total = sum(p.sum() for p in self.parameters()) * 0.0
        parts["acc"] = parts.get("acc_0", 0.0)
        return total, parts

    @classmethod
    def from_reference(
        cls, raw: dict[str, Any], state: dict[str, torch.Tensor], target: Target, where: str
    ) -> tuple[DraftConfig, dict[str, torch.Tensor]]:
        """A reference Medusa checkpoint: v0.1's medusa_lm_head.pt (keys `{k}.{j}...`) or a
        Medusa-1.0 repo whose keys carry the `medusa_head.` prefix."""
        from mmspec.methods.draft_checkpoint import CheckpointError

        if any(k.startswith(PREFIX) for k in state):
            # a full model repo: the base model's own weights sit beside the heads
            state = {k: v for k, v in state.items() if not k.startswith(("model.", "lm_head."))}
        else:
            state = {PREFIX + k: v for k, v in state.items()}
        try:
            heads = int(raw["medusa_num_heads"])
            layers = int(raw.get("medusa_num_layers", NUM_LAYERS))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{where}/config.json: not a Medusa config ({exc!r}; needs medusa_num_heads)"
            ) from exc
        config = DraftConfig.for_target("medusa", target, num_heads=heads, num_layers=layers)
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


def _mark_initialised(module: nn.Module, incompatible_keys: Any) -> None:
    module.initialised = True


def tree_paths(tree: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The paths of a Medusa tree, parents first and siblings by choice; checks prefixes."""
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


@register("medusa")
class Medusa(Drafter):
    """Drafts the Cartesian tree of the Medusa heads' top tokens (see the module docstring).

    Args:
        checkpoint: folder or hub id of the heads (ours or a reference Medusa checkpoint);
            default: the zoo's trained heads for the target.
        tree: the paths to draft (each a list of top-k ranks, one per depth); deeper paths
            than the checkpoint has heads are dropped.
    """

    training_free: ClassVar[bool] = False
    head_cls: ClassVar[type[nn.Module]] = MedusaHeads
    features: tuple[Feature, ...] = (FINAL,)

    def __init__(
        self, checkpoint: str | None = None, tree: Sequence[Sequence[int]] = MEDUSA_TREE
    ) -> None:
        from mmspec.methods.draft_checkpoint import check_checkpoint_arg

        self.checkpoint = check_checkpoint_arg(checkpoint)
        self.tree = tree_paths(tree)
        self.head: Any = None

    def load(self, target: Target) -> None:
        from mmspec.methods.draft_checkpoint import load_head

        self.head = load_head("medusa", MedusaHeads, target, self.checkpoint)
        self.head.to(device=target.device, dtype=target.dtype).eval()
        # the tree cut to the depth the heads reach
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
        # left padded: the last prompt position is the last column for every row, and its
        # feature is what the LM head read to predict the pending token
        self.hidden = ctx.extras["features"][FINAL][:, -1].clone()
        self.rows = list(ctx.rows)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        self._follow(ctx.rows)
        logits = self.head(self.hidden, self.depth)  # (depth, b, V)
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
