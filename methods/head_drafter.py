"""Drive a trained draft head (EAGLE-1/2/3, ViSpec, MSD) through the engine's drafter calls.

    begin   the prompt's target features -> the head's inputs for every prompt position
    join    the same for rows joining the running batch, appended after its rows
    propose feed what is new into the head's cache (one forward), grow the tree from there
    update  the accepted tokens' target features -> the inputs to feed next time

A head module implements the calls of `Head`; the method file chooses the head and how the
tree grows. What a head reads at the prompt's image slots is its config's business
(methods/head_image_slots.py), applied here and in training alike. The head runs on the
target's device and dtype; it reuses the target's embedding table (and LM head, unless it has
its own), which are never copied or saved.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from mmspec.methods.base import DraftContext, Drafter, StepOutcome, kept_rows
from mmspec.methods.head_cache import DraftKV, feed, last_real, ragged
from mmspec.methods.head_config import DraftConfig
from mmspec.methods.head_image_slots import prompt_image
from mmspec.methods.tree import DraftTree
from mmspec.methods.tree_search import TreeSearch
from mmspec.models.feature_taps import EMBEDS, Feature
from mmspec.models.target import Target


class Head(Protocol):
    """What a draft head module offers the drafter."""

    config: DraftConfig
    target_features: tuple[Feature, ...]  # what `fuse` reads (EMBEDS is always added)

    def fuse(self, feats: dict[Feature, torch.Tensor]) -> torch.Tensor:
        """Target features (…, width) -> the head's hidden input (…, h)."""

    def combine(
        self, embeds: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings and hidden inputs (…, h) -> the block's input at those positions."""

    def block(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """The head's layer over x (b, m, w) at positions (b, m), on `cache` -> (b, m, h)."""

    def logp(self, out: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Log-probabilities over the target vocabulary (…, V) from block outputs."""

    def prompt_inputs(
        self, embeds: torch.Tensor, hidden: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One row's prompt: (n, h) embeddings of tokens 1..n, fused features of 0..n-1 and
        whether token i+1 is an image slot -> (block inputs, positions, per-row state)."""

    def prepare_features(
        self, feats: dict[Feature, torch.Tensor], image: torch.Tensor
    ) -> dict[Feature, torch.Tensor]:
        """The prompt's tapped features (b, P, width) as the head reads them; `image` (b, P)
        marks the image slots."""

    def bind_embeddings(self, embed: nn.Module) -> None:
        """Take what the head reads from the target's embedding table `embed`."""


class HeadDrafter(Drafter):
    """Base class of the trained-head methods; subclasses set `head_cls` and `grow`."""

    training_free: ClassVar[bool] = False
    head_cls: ClassVar[type[nn.Module]]
    weights: ClassVar[str] = ""  # whose trained weights it runs (default: its own name)

    def __init__(self, checkpoint: str | None = None) -> None:
        from mmspec.methods.draft_checkpoint import check_checkpoint_arg

        self.checkpoint = check_checkpoint_arg(checkpoint)
        self.head: Any = None

    # ---- loading -------------------------------------------------------------------------
    def load(self, target: Target) -> None:
        from mmspec.methods.draft_checkpoint import load_head

        self.target = target
        self.head = load_head(self.weights or self.name, self.head_cls, target, self.checkpoint)
        self.head.to(device=target.device, dtype=target.dtype).eval()
        self.embed = target.model.get_input_embeddings()
        self.lm_head = target.model.get_output_embeddings()
        self.head.bind_embeddings(self.embed)
        self.features = (EMBEDS, *self.head.target_features)

    # ---- the drafter calls ---------------------------------------------------------------
    @torch.inference_mode()
    def begin(self, ctx: DraftContext) -> None:
        self.rows, self.todo, self.state = [], [], None
        self.kv = DraftKV(0, self.target.device)
        self.join(ctx)

    @torch.inference_mode()
    def join(self, ctx: DraftContext) -> None:
        # the saved rows may still hold rows the engine dropped since: `_follow` maps them
        if not ctx.rows:
            return
        todo, state = self._prompt_inputs(ctx)
        self.kv.extend(DraftKV(len(todo), self.kv.valid.device))
        self.rows += ctx.rows
        self.todo += todo
        if state is not None:
            self.state = state if self.state is None else torch.cat([self.state, state])

    def _prompt_inputs(
        self, ctx: DraftContext
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """The head's inputs (block inputs, positions) for every prompt position of the rows of
        `ctx`, none fed yet, and their per-row state (b, h) if the head keeps one."""
        feats = ctx.extras["features"]
        width = feats[EMBEDS].shape[1]
        image_id = self.target.image_token_id
        slots = prompt_image(ctx.tokens, ctx.prompt_lens, width, image_id, feats[EMBEDS].device)
        feats = self.head.prepare_features(feats, slots)
        fused = self.head.fuse(feats)  # (b, P, h), left padded
        todo, states = [], []
        for i, (tokens, n) in enumerate(zip(ctx.tokens, ctx.prompt_lens)):
            # pair position t of the prompt with token t + 1; the last with the pending token
            pending = self.embed(torch.tensor(tokens[n : n + 1], device=fused.device))
            embeds = torch.cat([feats[EMBEDS][i, width - n + 1 :], pending])
            image = torch.tensor(tokens[1 : n + 1], device=fused.device) == image_id
            x, positions, state = self.head.prompt_inputs(embeds, fused[i, width - n :], image)
            todo.append((x, positions))
            states.append(state)
        return todo, None if states[0] is None else torch.stack(states)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        self._follow(ctx.rows)
        x, counts = ragged([t[0] for t in self.todo])
        positions, _ = ragged([t[1] for t in self.todo])
        out = feed(self.kv, self._block, x, positions, counts)
        self.todo = [(x[i, :0], positions[i, :0]) for i in range(len(counts))]
        last = last_real(out, counts)
        trees = self.grow(
            TreeSearch(self._expand, self.kv), self.head.logp(last, self.lm_head), last
        )
        self.kv.maybe_compact()
        return trees

    @torch.inference_mode()
    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        assert outcome.features is not None
        self._follow(ctx.rows)
        fused = self.head.fuse(outcome.features)  # (b, q, h)
        dev = fused.device
        # every row's emitted tokens embedded in one call
        flat = [t for emitted in outcome.emitted for t in emitted]
        all_embeds = self.embed(torch.tensor(flat, device=dev))
        per_row = all_embeds.split([len(e) for e in outcome.emitted])
        for i, (path, emitted, embeds) in enumerate(zip(outcome.paths, outcome.emitted, per_row)):
            q = torch.tensor([0] + [n + 1 for n in path], device=dev)
            state = None if self.state is None else self.state[i]
            x = self.head.combine(embeds, fused[i, q], state)
            # a step without `propose` (ViSkip skipped every row) left inputs unfed: queue
            # these behind them, so the head's cache never misses a position
            old_x, old_pos = self.todo[i]
            first = old_pos[-1] + 1 if len(old_pos) else self.kv.next_pos[i]
            positions = first + torch.arange(len(emitted), device=dev)
            self.todo[i] = (torch.cat([old_x, x]), torch.cat([old_pos, positions]))

    # ---- for subclasses --------------------------------------------------------------------
    def grow(self, search: TreeSearch, logp: torch.Tensor, hidden: torch.Tensor) -> list[DraftTree]:
        """The draft trees from the head's log-probs (b, V) and output (b, h) after the
        pending token."""
        raise NotImplementedError

    # ---- internals -----------------------------------------------------------------------
    def _block(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head.block(x, positions, mask, self.kv.cache)

    def _expand(
        self,
        tokens: torch.Tensor,
        parent_hidden: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = None if self.state is None else self.state[:, None]
        x = self.head.combine(self.embed(tokens), parent_hidden, state)
        out = self._block(x, positions, mask)
        return self.head.logp(out, self.lm_head), out

    def _follow(self, rows: list[int]) -> None:
        """Drop the state of rows the engine dropped since the last call."""
        keep = kept_rows(self.rows, rows)
        if keep is None:
            return
        self.kv.select(keep)
        self.todo = [self.todo[k] for k in keep]
        if self.state is not None:
            self.state = self.state.index_select(0, torch.tensor(keep, device=self.state.device))
        self.rows = list(rows)
