"""Cells: the points of a grid, as every result row and run folder names them; and the grid's
serving scenarios (how requests reach the engine) and SLOs, which cells and reports read."""

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


STATIC, CONTINUOUS, POISSON = "static", "continuous", "poisson"
SCENARIOS = (STATIC, CONTINUOUS, POISSON)
DEFAULT_MAX_CONCURRENCY = 8  # a poisson stream's cap on rows decoding together


@dataclass(frozen=True)
class StaticScenario:
    """Today's batches: `batch_sizes` rows start together; none join until all have left."""

    name: str = STATIC


@dataclass(frozen=True)
class ContinuousScenario:
    """Every sample queued at the start; a row joins whenever fewer than the concurrency
    decode: one cell per concurrency."""

    concurrency: tuple[int, ...]
    name: str = CONTINUOUS


@dataclass(frozen=True)
class PoissonScenario:
    """The first `requests` samples arrive as a Poisson process (orchestrator/arrivals.py):
    one cell per rate, at most `max_concurrency` rows decoding together."""

    rates: tuple[float, ...]
    requests: int | None = None  # None: every sample of the workload
    seed: int = 0  # of the arrival pattern, shared by every method and rate
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    name: str = POISSON


Scenario = StaticScenario | ContinuousScenario | PoissonScenario


@dataclass(frozen=True)
class Slo:
    """Service-level objectives for goodput: a request meets them when its time to first
    token and its time per output token are within these (None: no limit on that one)."""

    ttft_s: float | None = None
    tpot_s: float | None = None


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
    # how requests reach the engine: "static" batches of `batch_size`, or a serving stream
    # ("continuous": a closed loop of `batch_size` clients; "poisson": arrivals at `rate`)
    # with at most `batch_size` rows decoding together
    scenario: str = STATIC
    rate: float | None = None  # poisson: mean arrivals per second; None otherwise
    arrival_seed: int | None = None  # poisson: the seed of the arrival pattern (arrivals.py)
    requests: int | None = None  # poisson: the stream's length, its workload's first samples

    @property
    def serving(self) -> bool:
        """A request stream (one shard, `Engine.serve`) rather than static batches."""
        return self.scenario != STATIC

    @property
    def registered_method(self) -> str:
        """The registry name the drafter is built from."""
        return self.base_method or self.method

    @property
    def resolved_json(self) -> str | None:
        """`resolved_args` as results record them (canonical JSON); None when unknown."""
        return None if self.resolved_args is None else canonical_args(self.resolved_args)
