"""ViSkip (MMSpec): skip drafting on steps whose next token leans on the image.

Before each step the engine hands over, per row, the attention mass that the position which
predicted the pending token put on image tokens (last layer, mean over heads by default).
At or above `threshold` (>=, as MMSpec compares) the row takes a plain AR step: drafts there
are mostly rejected because the token is grounded in pixels no text-only drafter sees.
Otherwise the wrapped method drafts as usual. Skipping changes speed only: acceptance still
decides every token, so it is lossless.

When the gate looks (`viskip_gate`): `after_draft`, the default, is MMSpec's vispec_vskip
rule - it reads attention only from a verification of drafts, so a row's first step (after
the prefill) and the step after a skipped one always draft; `every_step` gates every step,
from whatever forward came last (the prefill's last row, an AR step's).

`viskip+<method>` is built for every registered method; its args are ViSkip's
(`viskip_threshold`, `viskip_layers`: prefixed, since methods have a `threshold` of their own,
e.g. SAM) plus the wrapped method's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from mmspec.methods.base import DraftContext, Drafter, LayerIndex, StepOutcome
from mmspec.methods.tree import DraftTree
from mmspec.models.target import Target
from mmspec.results.ids import VISKIP_PREFIX

PREFIX = VISKIP_PREFIX
GATES = ("after_draft", "every_step")


class ViSkip(Drafter):
    """Wraps `inner_cls`; subclasses per wrapped method are made by `viskip_of`."""

    inner_cls: ClassVar[type[Drafter]]
    needs_vision_score: ClassVar[bool] = True

    def __init__(
        self,
        viskip_threshold: float = 0.35,
        viskip_layers: Sequence[LayerIndex] = (-1,),
        viskip_gate: str = "after_draft",
        **inner_args: Any,
    ) -> None:
        threshold, layers = viskip_threshold, viskip_layers
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ValueError(f"viskip_threshold must be a number, got {threshold!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"viskip_threshold is an attention mass in [0, 1], got {threshold}")
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"viskip_layers must be a non-empty list of integers, got {layers!r}")
        if viskip_gate not in GATES:
            raise ValueError(f"viskip_gate must be one of {', '.join(GATES)}, got {viskip_gate!r}")
        self.threshold = float(threshold)
        self.score_layers = tuple(layers)
        self.after_draft = viskip_gate == "after_draft"
        self.ungated: set[int] = set()  # rows whose next step drafts whatever their score
        self.inner = self.inner_cls(**inner_args)

    @classmethod
    def arg_types(cls) -> dict[str, Any]:
        return {**super().arg_types(), **cls.inner_cls.arg_types()}

    @classmethod
    def arg_defaults(cls) -> dict[str, Any]:
        return {**super().arg_defaults(), **cls.inner_cls.arg_defaults()}

    @classmethod
    def drafts_tree(cls, args: Mapping[str, Any]) -> bool:
        # ViSkip's own args are prefixed (module doc); the rest are the wrapped method's
        inner = {k: v for k, v in args.items() if not k.startswith("viskip_")}
        return cls.inner_cls.drafts_tree(inner)

    def load(self, target: Target) -> None:
        self.inner.load(target)
        self.features = self.inner.features

    def begin(self, ctx: DraftContext) -> None:
        self.ungated = set(ctx.rows) if self.after_draft else set()
        self.inner.begin(ctx)

    def join(self, ctx: DraftContext) -> None:
        """Joining rows start as `begin` starts them (under `after_draft` their first step
        drafts, after their own prefill), then the wrapped drafter sets them up."""
        if self.after_draft:
            self.ungated |= set(ctx.rows)
        self.inner.join(ctx)

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        scores = ctx.extras["vision_score"]
        skip = [r not in self.ungated and s >= self.threshold for r, s in zip(ctx.rows, scores)]
        if self.after_draft:  # a skipped step verifies no drafts: the next one drafts
            self.ungated = {r for r, s in zip(ctx.rows, skip) if s}
        if all(skip):  # nothing to draft: the inner drafter's work would be thrown away
            return [DraftTree.empty(skipped=True) for _ in skip]
        trees = self.inner.propose(ctx)
        return [DraftTree.empty(skipped=True) if s else t for s, t in zip(skip, trees)]

    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        self.inner.update(ctx, outcome)


def viskip_of(inner: type[Drafter]) -> type[ViSkip]:
    """The ViSkip class wrapping `inner`: the inner method's training trait; vision-aware
    whatever the inner method is, since ViSkip decides from the image whether to draft (as
    MMSpec's taxonomy counts it: mmspec.results.taxonomy.viskip_family)."""
    return type(
        f"ViSkip_{inner.__name__}",
        (ViSkip,),
        {
            "inner_cls": inner,
            "training_free": inner.training_free,
            "vision_aware": True,
            "__doc__": f"ViSkip over {inner.name}.",
        },
    )
