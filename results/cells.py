"""Cells: the points of a grid, as every result row and run folder names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmspec.results.variants import canonical_args


@dataclass(frozen=True)
class ModelConfig:
    """A target model as the grid names it."""

    id: str  # registry name, hub id or local path
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    # "mmspec" | "chat_template" (mmspec.models.prompting); None: the model's default
    prompt_style: str | None = None


@dataclass(frozen=True)
class Cell:
    """One point of the grid: model x method x batch size x temperature x repeat (x workload)."""

    cell_id: str  # stable, human-readable, unique in a run
    model: ModelConfig
    # what results call the method: a registry name ("pld", "viskip+eagle2") or a variant's
    # name ("eagle2-wide", "viskip+pld[viskip_threshold=0.2]"; see results/variants.py)
    method: str
    method_args: dict[str, Any]  # as the grid gives them: what the drafter is built with
    batch_size: int
    temperature: float
    repeat: int
    seed: int
    max_new_tokens: int
    workload: str  # name of the workload the samples come from
    base_method: str | None = None  # the registered method of a variant; None: `method` itself
    # method_args with the drafter's defaults filled in (what results record); None: unknown
    resolved_args: dict[str, Any] | None = None

    @property
    def registered_method(self) -> str:
        """The registry name the drafter is built from."""
        return self.base_method or self.method

    @property
    def resolved_json(self) -> str | None:
        """`resolved_args` as results record them (canonical JSON); None when unknown."""
        return None if self.resolved_args is None else canonical_args(self.resolved_args)
