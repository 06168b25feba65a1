"""Autoregressive decoding: the baseline, an engine step with nothing drafted."""

from __future__ import annotations

from mmspec.methods.base import DraftContext, Drafter
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree


@register("ar")
class Autoregressive(Drafter):
    def join(self, ctx: DraftContext) -> None:
        """Nothing per row: nothing is drafted."""

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        return [DraftTree.empty() for _ in ctx.rows]
