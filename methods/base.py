"""The drafter interface every method implements (one context in, one DraftTree per row out)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmspec.methods.tree import DraftTree
from mmspec.models.feature_taps import Feature
from mmspec.results.taxonomy import Family

if TYPE_CHECKING:
    from mmspec.models.target import Target


@dataclass
class DraftContext:
    """What a drafter may look at, for the rows of the batch still generating.

    `tokens[i]` is the whole sequence of active row i without padding: prompt ids (image
    placeholder tokens included), then every generated token, ending with the pending token
    that the next verification will feed (the root of the draft tree).
    """

    rows: list[int]  # (active,) index of each active row in the batch it started in
    tokens: list[list[int]]  # (active, len_i)
    prompt_lens: list[int]  # (active,)
    temperature: float = 0.0
    # what the engine measured for the drafter: "vision_score" (per row) when it asked for
    # it; in `begin` only, "features": the prompt's `Drafter.features`, each (active, P, width)
    # left padded like the prompt (row i's are the last prompt_lens[i] positions)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutcome:
    """What the last verification showed, handed to `Drafter.update`."""

    trees: list[DraftTree]  # (active,) the trees that were verified
    paths: list[list[int]]  # (active,) accepted node indices, root excluded
    emitted: list[list[int]]  # (active,) accepted draft tokens, then the bonus token
    # (active, q, vocab) target logits after the root (q-index 0) and after each node i (i + 1)
    logits: torch.Tensor
    # the drafter's `features` of the same q positions, each (active, q, width); None if none
    features: dict[Feature, torch.Tensor] | None = None


def kept_rows(before: list[int], now: list[int]) -> list[int] | None:
    """Where the rows of `now` were in `before` (the engine drops finished rows between
    calls); None when nothing changed. For drafters keeping per-row state."""
    return None if now == before else [before.index(r) for r in now]


class Drafter:
    """Base class: propose draft trees, optionally learn from what was accepted.

    Life cycle: construct from method args -> `load(target)` once per worker -> per batch
    `begin(ctx)`, then per step `propose(ctx)` and `update(ctx, accepted)`.
    """

    name: ClassVar[str] = ""
    training_free: ClassVar[bool] = True
    vision_aware: ClassVar[bool] = False
    # MMSpec's drafting axis: a tree of alternatives per step (True) or one chain (False);
    # a drafter whose shape depends on its options overrides drafts_tree instead
    tree_drafting: ClassVar[bool] = False
    # the engine then puts each row's attention mass on image tokens (of the position that
    # predicted the pending token) in ctx.extras["vision_score"], from `score_layers`
    needs_vision_score: ClassVar[bool] = False
    score_layers: tuple[int, ...] = (-1,)
    # target features the drafter reads (models/feature_taps.py), set by `load` at the latest:
    # the engine taps them at prefill (-> begin) and at every verification (-> update)
    features: tuple[Feature, ...] = ()

    @classmethod
    def arg_names(cls) -> list[str]:
        """The method_args a grid may give this drafter (its constructor's keywords)."""
        return [
            p.name
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]

    @classmethod
    def drafts_tree(cls, args: Mapping[str, Any]) -> bool:
        """Whether this drafter, given these method_args, drafts trees rather than chains."""
        return cls.tree_drafting

    @classmethod
    def family(cls, args: Mapping[str, Any]) -> Family:
        """Where this drafter, given these method_args, sits in MMSpec's taxonomy (the
        manifest records it for the reports: mmspec.results.taxonomy)."""
        drafting = "tree" if cls.drafts_tree(args) else "linear"
        return Family(drafting, vision_aware=cls.vision_aware, training_free=cls.training_free)

    def load(self, target: Target) -> None:
        """Load weights or read what the drafter needs from the target (no-op if model-free)."""

    def begin(self, ctx: DraftContext) -> None:
        """A new batch starts; reset per-row state."""

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        """One draft tree per active row (an empty tree means a plain AR step for that row)."""
        raise NotImplementedError

    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        """Learn from the last step (`ctx.tokens` does not yet include `outcome.emitted`)."""
