"""Cells: the points of a grid, as every result row and run folder names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    method: str  # registry name, e.g. "pld" or "viskip+eagle2"
    method_args: dict[str, Any]
    batch_size: int
    temperature: float
    repeat: int
    seed: int
    max_new_tokens: int
    workload: str  # name of the workload the samples come from
