"""grid.yaml: parse and validate it, expand it into cells, chunk cells into shards.

A grid file is data, never code: its text is read strictly (grid_text.py: UTF-8, YAML's safe
loader without aliases or keys given twice), and methods, models and workloads are looked up
by name in their registries. Every problem is reported as a `GridError` naming the file, the
key path (`models[1].id`) and what is allowed, before anything is started; a value it quotes is
cut to `QUOTE_CHARS` characters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmspec.models.model_limits import ModelLimits, model_limits
from mmspec.models.prompting import PROMPT_STYLES, default_prompt_style
from mmspec.models.registry import UnknownModelError, check_model_id
from mmspec.orchestrator.grid_text import (
    PROBLEM_CHARS,
    GridError,
    read_text,
    read_yaml,
)
from mmspec.orchestrator.grid_text import clip as _clip
from mmspec.orchestrator.grid_text import quote as _quote
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.workload_config import WorkloadConfig, builtin_workloads
from mmspec.results.cells import (
    CONTINUOUS,
    DEFAULT_MAX_CONCURRENCY,
    POISSON,
    SCENARIOS,
    STATIC,
    Cell,
    ContinuousScenario,
    ModelConfig,
    PoissonScenario,
    Scenario,
    Slo,
    StaticScenario,
)
from mmspec.results.ids import cell_id, method_id, safe_name, shard_id
from mmspec.results.variants import Variant, variant_name
from mmspec.workloads.sample import TOPICS, Sample

if TYPE_CHECKING:  # the drafters import torch: only loaded when a grid names methods
    from mmspec.methods.base import Drafter, MethodArgError

log = logging.getLogger(__name__)

BASELINE = "ar"  # every grid measures it; speedups are relative to it
DEFAULT_SHARD_SIZE = 8  # samples per shard: small enough to retry/resume cheaply
DTYPES = ("float32", "float16", "bfloat16")
GRID_KEYS = (
    "name",
    "out",
    "workloads",
    "models",
    "methods",
    "method_args",
    "batch_sizes",
    "scenario",
    "slo",
    "temperatures",
    "max_new_tokens",
    "repeats",
    "seed",
    "exclude",
    "shard_size",
    "workers",
    "threads_per_worker",
    "gpus_per_worker",
    "shard_timeout_s",
)
REQUIRED_KEYS = ("name", "workloads", "models", "methods")
WORKLOAD_KEYS = ("builtin", "path", "name", "limit", "topics")
MODEL_KEYS = ("id", "dtype", "revision", "trust_remote_code", "prompt_style")
EXCLUDE_KEYS = ("model", "method", "batch_size", "scenario", "temperature", "repeat", "workload")
# each scenario's keys: (required, optional)
SCENARIO_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    STATIC: ((), ()),
    CONTINUOUS: (("concurrency",), ()),
    POISSON: (("rates",), ("requests", "seed", "max_concurrency")),
}
SLO_KEYS = ("ttft_s", "tpot_s")
DEFAULT_SCENARIOS: tuple[Scenario, ...] = (StaticScenario(),)
VARIANT_KEYS = ("name", "method", "args")  # a `methods` entry that is a mapping
MAX_VARIANTS = 1000  # per entry: each is validated by building its drafter, and is a cell each
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HASH_EXCLUDED = ("out", "shard_timeout_s")  # where and how long, not what was run


@dataclass(frozen=True)
class Grid:
    """A validated grid. `to_dict` gives its canonical form; `parse_grid` reads that back."""

    name: str
    workloads: tuple[WorkloadConfig, ...]
    models: tuple[ModelConfig, ...]
    # the entries of `methods`: registered methods and named variants; starts with "ar"
    methods: tuple[str, ...]
    # per entry, its arguments as written: a list for an argument that takes no list is a
    # sweep, one variant per value (`variants`)
    method_args: dict[str, dict[str, Any]]
    batch_sizes: tuple[int, ...] = (1,)  # static cells' batch sizes
    # how requests reach the engine, in SCENARIOS order: static batches (`batch_sizes`) and/or
    # serving streams (continuous batching at fixed concurrencies, Poisson arrivals)
    scenarios: tuple[Scenario, ...] = DEFAULT_SCENARIOS
    slo: Slo | None = None  # the objectives goodput is measured against; None: not set
    temperatures: tuple[float, ...] = (0.0,)
    max_new_tokens: int = 256
    repeats: int = 1
    seed: int = 0  # the runner mixes in repeat, sample and turn for each row's sampling seed
    exclude: tuple[dict[str, Any], ...] = ()
    out: str = "runs"  # results root, relative to the current directory
    shard_size: int = DEFAULT_SHARD_SIZE  # rounded up to a multiple of each cell's batch size
    workers: int | None = None  # worker slots; None = one per GPU, else CPUs // threads
    threads_per_worker: int = 1
    gpus_per_worker: int = 1  # GPUs one worker reserves, all on one node (models that need several)
    # the watchdog's stall limit: a shard without progress this long is retried elsewhere;
    # None: derived as the run goes (orchestrator/scheduler.py, "Watchdog")
    shard_timeout_s: float | None = None
    source: str = field(default="<grid>", compare=False)  # file name, for messages only
    variant_of: dict[str, str] = field(default_factory=dict)  # named variant -> its method
    # every entry expanded into its variants (results/variants.py), in `methods` order; a grid
    # built by hand may leave it empty: each entry is then one cell, its defaults unknown
    variants: tuple[Variant, ...] = ()


# ----------------------------------------------------------------------------- reading


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file."""
    source = str(path)
    return parse_grid(read_yaml(read_text(path), source), source, base_dir=Path(path).parent)


def parse_grid(data: Any, source: str = "<grid>", base_dir: str | Path | None = None) -> Grid:
    """Validate a grid given as plain data (a parsed YAML file or a manifest's `grid`).

    Relative workload paths are taken from `base_dir` (the grid file's folder; default the
    current directory) and stored absolute, so a resumed run finds the same data.
    """
    return _Parser(source, Path(base_dir) if base_dir is not None else Path.cwd()).grid(data)


def to_dict(grid: Grid) -> dict[str, Any]:
    """The canonical plain form of a grid: what the manifest stores and the hash covers."""
    return {
        "name": grid.name,
        "out": grid.out,
        "workloads": [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in _asdict(w).items() if v}
            for w in grid.workloads
        ],
        "models": [_asdict(m) for m in grid.models],
        "methods": [_entry_dict(grid, m) for m in grid.methods],
        "method_args": {
            m: dict(a) for m, a in sorted(grid.method_args.items()) if m not in grid.variant_of
        },
        "batch_sizes": list(grid.batch_sizes),
        "temperatures": list(grid.temperatures),
        "max_new_tokens": grid.max_new_tokens,
        "repeats": grid.repeats,
        "seed": grid.seed,
        "exclude": [dict(e) for e in grid.exclude],
        "shard_size": grid.shard_size,
        "workers": grid.workers,
        "threads_per_worker": grid.threads_per_worker,
        "gpus_per_worker": grid.gpus_per_worker,
        "shard_timeout_s": grid.shard_timeout_s,
        **_serving_dict(grid),
    }


def _serving_dict(grid: Grid) -> dict[str, Any]:
    # only what is set: a grid that names no scenario and no SLO hashes as before they existed
    data: dict[str, Any] = {}
    if grid.scenarios != DEFAULT_SCENARIOS:
        data["scenario"] = scenario_dict(grid.scenarios)
    if grid.slo is not None:
        data["slo"] = {k: v for k, v in _asdict(grid.slo).items() if v is not None}
    return data


def scenario_dict(scenarios: Sequence[Scenario]) -> dict[str, dict[str, Any]]:
    """The canonical `scenario` mapping: each scenario's settings, unset ones left out."""
    result: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        settings = {k: v for k, v in _asdict(scenario).items() if k != "name" and v is not None}
        result[scenario.name] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()
        }
    return result


def grid_sha256(grid: Grid) -> str:
    """sha256 of the canonical JSON of the grid, less `HASH_EXCLUDED` (where results go and
    how long a shard may take are not what was run; runs from before a key hash alike)."""
    canonical = {k: v for k, v in to_dict(grid).items() if k not in HASH_EXCLUDED}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _asdict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _entry_dict(grid: Grid, entry: str) -> str | dict[str, Any]:
    """A `methods` entry as the grid writes it: a name, or a named variant's mapping (a grid
    without variants keeps the form, and the hash, it had before variants existed)."""
    if entry not in grid.variant_of:
        return entry
    args = dict(grid.method_args.get(entry, {}))
    return {"name": entry, "method": grid.variant_of[entry], "args": args}


# ----------------------------------------------------------------------------- expanding


@dataclass(frozen=True)
class Load:
    """How one cell's requests reach the engine: a static batch size or a serving stream."""

    scenario: str
    batch_size: int  # static: the batch size; serving: the most rows decoding together
    rate: float | None = None  # poisson arrivals per second
    arrival_seed: int | None = None
    requests: int | None = None


def loads(grid: Grid) -> list[Load]:
    """Every load the grid measures, in scenario order: static batch sizes, concurrencies,
    rates."""
    result: list[Load] = []
    for scenario in grid.scenarios:
        if isinstance(scenario, StaticScenario):
            result += [Load(STATIC, b) for b in grid.batch_sizes]
        elif isinstance(scenario, ContinuousScenario):
            result += [Load(CONTINUOUS, c) for c in scenario.concurrency]
        else:
            result += [
                Load(POISSON, scenario.max_concurrency, r, scenario.seed, scenario.requests)
                for r in scenario.rates
            ]
    return result


def expand(grid: Grid) -> list[Cell]:
    """All cells: model x variant x load (batch size, concurrency or rate) x temperature x
    repeat x workload, minus excludes (a method without variants is one variant)."""
    cells = []
    for model in grid.models:
        for variant in grid.variants or _unresolved(grid):
            for load in loads(grid):
                for temperature in grid.temperatures:
                    for repeat in range(grid.repeats):
                        for workload in grid.workloads:
                            cell = Cell(
                                cell_id=cell_id(
                                    model.id,
                                    variant.name,
                                    load.batch_size,
                                    temperature,
                                    repeat,
                                    workload.name,
                                    load.scenario,
                                    load.rate,
                                ),
                                model=model,
                                method=variant.name,
                                method_args=dict(variant.args),
                                batch_size=load.batch_size,
                                temperature=temperature,
                                repeat=repeat,
                                seed=grid.seed,
                                max_new_tokens=grid.max_new_tokens,
                                workload=workload.name,
                                base_method=variant.method,
                                resolved_args=dict(variant.resolved) if grid.variants else None,
                                scenario=load.scenario,
                                rate=load.rate,
                                arrival_seed=load.arrival_seed,
                                requests=load.requests,
                            )
                            if not any(_excluded(r, cell, variant) for r in grid.exclude):
                                cells.append(cell)
    return cells


def _unresolved(grid: Grid) -> Iterator[Variant]:
    # a Grid built in code rather than parsed: each entry as it is, defaults not looked up
    for entry in grid.methods:
        args = dict(grid.method_args.get(entry, {}))
        yield Variant(entry, grid.variant_of.get(entry, entry), args, args)


def _excluded(rule: Mapping[str, Any], cell: Cell, variant: Variant) -> bool:
    values = {
        "model": {cell.model.id},
        # a rule names a variant, or the entry it came from (all of that entry's sweep)
        "method": {variant.name, variant.entry},
        "batch_size": {cell.batch_size},  # a serving cell's concurrency cap
        "scenario": {cell.scenario},
        "temperature": {cell.temperature},
        "repeat": {cell.repeat},
        "workload": {cell.workload},
    }
    return all(value in values[key] for key, value in rule.items())


def chunk_size(shard_size: int, batch_size: int) -> int:
    """Samples per shard: `shard_size` rounded up to whole batches (at least one batch)."""
    return max(1, math.ceil(shard_size / batch_size)) * batch_size


def make_shards(
    cells: Sequence[Cell],
    samples_by_workload: Mapping[str, Sequence[Sample]],
    run_id: str,
    shard_size: int,
) -> list[Shard]:
    """Cut every static cell's samples into shards of whole batches; ids are
    `<cell_id>__s000`... A serving cell is one shard, `<cell_id>__s000`: its whole request
    stream (a poisson cell's first `requests` samples), which cannot be cut without changing
    what is measured."""
    shards = []
    for cell in cells:
        if cell.workload not in samples_by_workload:
            raise KeyError(f"no samples loaded for workload {cell.workload!r}")
        samples = samples_by_workload[cell.workload]
        if cell.serving:
            shards.append(Shard(run_id, shard_id(cell.cell_id, 0), cell, _stream(cell, samples)))
            continue
        size = chunk_size(shard_size, cell.batch_size)
        for index, start in enumerate(range(0, len(samples), size)):
            shards.append(
                Shard(
                    run_id=run_id,
                    shard_id=shard_id(cell.cell_id, index),
                    cell=cell,
                    samples=tuple(samples[start : start + size]),
                )
            )
    return shards


def _stream(cell: Cell, samples: Sequence[Sample]) -> tuple[Sample, ...]:
    if cell.requests is None:
        return tuple(samples)
    if cell.requests > len(samples):  # check_streams says so first, naming the grid file
        raise ValueError(
            f"cell {cell.cell_id}: {cell.requests} requests, but workload {cell.workload!r} "
            f"has {len(samples)} samples"
        )
    return tuple(samples[: cell.requests])


def check_streams(grid: Grid, samples_by_workload: Mapping[str, Sequence[Sample]]) -> None:
    """GridError unless every workload holds the samples its poisson cells ask for (called
    once the workloads are loaded, before anything starts)."""
    for cell in expand(grid):
        have = len(samples_by_workload.get(cell.workload, ()))
        if cell.requests is not None and cell.requests > have:
            raise GridError(
                f"{grid.source}: scenario.poisson.requests: {cell.requests} requests, but "
                f"workload {cell.workload!r} has {have} samples; allowed: at most {have} (a "
                "request is one sample's conversation)"
            )


# ----------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _listing(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values) if values else "(none)"


@dataclass(frozen=True)
class _Entry:
    """One `methods` entry as the parser reads it."""

    name: str  # a registered method, or a named variant's own name
    method: str  # the registered method it runs
    args_key: str  # where its arguments are written, for messages
    args: dict[str, Any]  # a named variant's `args` (a method's are in method_args)
    is_variant: bool = False

    @property
    def key(self) -> str:
        """The key path that names the entry's arguments' owner, for messages."""
        return self.args_key.removesuffix(".args")


def _same(a: Any, b: Any) -> bool:
    # 1 and 1.0 are one value to a drafter; True and 1 are not (bools are not numbers)
    return (type(a) is type(b) or (_is_number(a) and _is_number(b))) and a == b


def _plain(value: Any) -> Any:
    # a default JSON cannot hold (a tuple is a list already): recorded by its text
    return repr(value)


class _Parser:
    """Validates one grid; holds the file name so every error can name it."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source  # the file the data came from, for messages
        self.base_dir = base_dir  # relative workload paths start here
        # what each model can hold, for those whose config.json is on this machine
        self.limits: list[tuple[ModelConfig, ModelLimits]] = []

    def error(self, key: str, problem: str, allowed: str | None = None) -> GridError:
        where = f"{self.source}: {_clip(key, PROBLEM_CHARS)}: " if key else f"{self.source}: "
        problem = _clip(problem, PROBLEM_CHARS)
        return GridError(where + problem + (f"; allowed: {allowed}" if allowed else ""))

    def grid(self, data: Any) -> Grid:
        if not isinstance(data, Mapping):
            raise self.error("", "the grid must be a mapping of keys", _listing(GRID_KEYS))
        self.keys(data, "", GRID_KEYS)
        for key in REQUIRED_KEYS:
            if key not in data:
                raise self.error(key, "missing required key", _listing(GRID_KEYS))

        models = self.models(data["models"])
        limits = ((m, model_limits(m.id, m.revision)) for m in models)
        self.limits = [(m, limit) for m, limit in limits if limit is not None]
        entries = self.methods(data["methods"])
        methods = tuple(e.name for e in entries)
        method_args = self.method_args(data.get("method_args") or {}, entries)
        method_args.update({e.name: e.args for e in entries if e.is_variant})
        variants = self.variants(entries, method_args)
        workloads = self.workloads(data["workloads"])
        batch_sizes = self.positive_ints(data.get("batch_sizes", [1]), "batch_sizes")
        scenarios = self.scenarios(data.get("scenario", STATIC), data.get("seed", 0))
        if not isinstance(scenarios[0], StaticScenario) and batch_sizes != (1,):
            log.warning(
                "%s: batch_sizes: no static scenario uses them (add `static: {}` to scenario)",
                self.source,
            )
        temperatures = self.temperatures(data.get("temperatures", [0.0]))
        repeats = self.positive_int(data.get("repeats", 1), "repeats")
        grid = Grid(
            name=self.name(data["name"], "name"),
            out=self.text(data.get("out", "runs"), "out"),
            workloads=workloads,
            models=models,
            methods=methods,
            method_args=method_args,
            batch_sizes=batch_sizes,
            scenarios=scenarios,
            slo=self.slo(data["slo"]) if data.get("slo") is not None else None,
            temperatures=temperatures,
            max_new_tokens=self.max_new_tokens(data.get("max_new_tokens", 256)),
            repeats=repeats,
            seed=self.seed(data.get("seed", 0)),
            exclude=(),
            shard_size=self.positive_int(data.get("shard_size", DEFAULT_SHARD_SIZE), "shard_size"),
            workers=self.optional_positive_int(data.get("workers"), "workers"),
            threads_per_worker=self.positive_int(
                data.get("threads_per_worker", 1), "threads_per_worker"
            ),
            gpus_per_worker=self.gpus_per_worker(data.get("gpus_per_worker", 1)),
            shard_timeout_s=self.optional_positive_number(
                data.get("shard_timeout_s"), "shard_timeout_s"
            ),
            source=self.source,
            variant_of={e.name: e.method for e in entries if e.is_variant},
            variants=variants,
        )
        grid = dataclasses.replace(grid, exclude=self.exclude(data.get("exclude") or [], grid))
        if not expand(grid):
            raise self.error("exclude", "the exclude rules remove every cell of the grid")
        return grid

    # --- generic shapes

    def keys(self, data: Mapping[str, Any], prefix: str, allowed: Sequence[str]) -> None:
        for key in data:
            if key not in allowed:
                where = f"{prefix}.{key}" if prefix else str(key)
                raise self.error(where, "unknown key", _listing(allowed))

    def mapping(self, value: Any, key: str, allowed: Sequence[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a mapping, got {_quote(value)}", _listing(allowed))
        self.keys(value, key, allowed)
        return value

    def items(self, value: Any, key: str, what: str) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.error(key, f"expected a non-empty list, got {_quote(value)}", what)
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty string, got {_quote(value)}")
        return value

    def name(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.error(
                key, f"bad name {_quote(value)}", "letters, digits, '.', '_', '-' (not first)"
            )
        return value

    def positive_int(self, value: Any, key: str) -> int:
        if not _is_int(value) or value < 1:
            raise self.error(key, f"got {_quote(value)}", "positive integers")
        return value

    def optional_positive_int(self, value: Any, key: str) -> int | None:
        return None if value is None else self.positive_int(value, key)

    def optional_positive_number(self, value: Any, key: str) -> float | None:
        if value is None:
            return None
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise self.error(key, f"got {_quote(value)}", "positive numbers (seconds), or null")
        return float(value)

    def max_new_tokens(self, value: Any) -> int:
        tokens = self.positive_int(value, "max_new_tokens")
        for model, limit in self.limits:
            context = limit.context_length
            if context is not None and tokens >= context:
                raise self.error(
                    "max_new_tokens",
                    f"{tokens} new tokens do not fit in model {model.id}'s context of {context} "
                    "tokens (the prompt takes its share too)",
                    f"positive integers below {context}",
                )
        return tokens

    def gpus_per_worker(self, value: Any) -> int:
        if not _is_int(value) or value < 1:
            raise self.error(
                "gpus_per_worker",
                f"got {_quote(value)}",
                "positive integers: the GPUs one worker reserves on one node (default 1); "
                "on a cluster without GPUs it is ignored",
            )
        return value

    def seed(self, value: Any) -> int:
        if not _is_int(value) or value < 0:
            raise self.error("seed", f"got {_quote(value)}", "integers >= 0")
        return value

    def positive_ints(self, value: Any, key: str) -> tuple[int, ...]:
        values = self.items(value, key, "positive integers")
        for i, v in enumerate(values):
            self.positive_int(v, f"{key}[{i}]")
            if v in values[:i]:
                raise self.error(f"{key}[{i}]", f"duplicate value {v}", "each value once")
        return tuple(values)

    def temperatures(self, value: Any) -> tuple[float, ...]:
        values = self.items(value, "temperatures", "numbers >= 0")
        result: list[float] = []
        for i, v in enumerate(values):
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                raise self.error(f"temperatures[{i}]", f"got {_quote(v)}", "numbers >= 0")
            if float(v) in result:
                raise self.error(f"temperatures[{i}]", f"duplicate value {v}", "each value once")
            result.append(float(v))
        return tuple(result)

    # --- serving

    def scenarios(self, value: Any, grid_seed: Any) -> tuple[Scenario, ...]:
        """`scenario`: "static" (the default), or a mapping of one or more scenarios to their
        settings; returned in SCENARIOS order whatever order the file gives."""
        forms = f"{STATIC}, or a mapping of {_listing(SCENARIOS)} to their settings"
        if value == STATIC:
            return DEFAULT_SCENARIOS
        if isinstance(value, str) and value in SCENARIOS:
            raise self.error(
                "scenario",
                f"{_quote(value)} needs its settings",
                f"e.g. scenario: {{{CONTINUOUS}: {{concurrency: [1, 4]}}}} or "
                f"{{{POISSON}: {{rates: [1, 2], requests: 40}}}}",
            )
        if not isinstance(value, Mapping):
            raise self.error("scenario", f"unknown scenario {_quote(value)}", forms)
        if not value:
            raise self.error("scenario", "an empty mapping names no scenario", forms)
        self.keys(value, "scenario", SCENARIOS)
        found: list[Scenario] = []
        for name in SCENARIOS:
            if name not in value:
                continue
            key = f"scenario.{name}"
            required, optional = SCENARIO_KEYS[name]
            settings = value[name] if value[name] is not None else {}
            settings = self.mapping(settings, key, required + optional)
            for needed in required:
                if needed not in settings:
                    raise self.error(f"{key}.{needed}", "missing required key", needed)
            if name == STATIC:
                found.append(StaticScenario())
            elif name == CONTINUOUS:
                concurrency = self.counts(settings["concurrency"], f"{key}.concurrency")
                found.append(ContinuousScenario(concurrency))
            else:
                found.append(self.poisson(settings, key, grid_seed))
        return tuple(found)

    def poisson(self, settings: Mapping[str, Any], key: str, grid_seed: Any) -> PoissonScenario:
        rates = self.items(settings["rates"], f"{key}.rates", "numbers > 0 (arrivals per second)")
        result: list[float] = []
        for i, rate in enumerate(rates):
            if not _is_number(rate) or not math.isfinite(rate) or rate <= 0:
                raise self.error(
                    f"{key}.rates[{i}]", f"got {_quote(rate)}", "numbers > 0 (arrivals per second)"
                )
            if float(rate) in result:
                raise self.error(f"{key}.rates[{i}]", f"duplicate value {rate}", "each value once")
            result.append(float(rate))
        requests = settings.get("requests")
        if requests is not None and (not _is_int(requests) or requests < 1):
            raise self.error(
                f"{key}.requests",
                f"got {_quote(requests)}",
                "integers >= 1 (the stream's first samples; default: every sample)",
            )
        seed = settings.get("seed", grid_seed if _is_int(grid_seed) else 0)
        if not _is_int(seed) or seed < 0:
            raise self.error(f"{key}.seed", f"got {_quote(seed)}", "integers >= 0")
        cap = settings.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)
        if not _is_int(cap) or cap < 1:
            raise self.error(
                f"{key}.max_concurrency",
                f"got {_quote(cap)}",
                "integers >= 1 (the most rows decoding together)",
            )
        return PoissonScenario(tuple(result), requests, seed, cap)

    def counts(self, value: Any, key: str) -> tuple[int, ...]:
        """A non-empty list of distinct integers >= 1 (concurrencies)."""
        allowed = "integers >= 1 (the most rows decoding together)"
        values = self.items(value, key, allowed)
        for i, v in enumerate(values):
            if not _is_int(v) or v < 1:
                raise self.error(f"{key}[{i}]", f"got {_quote(v)}", allowed)
            if v in values[:i]:
                raise self.error(f"{key}[{i}]", f"duplicate value {v}", "each value once")
        return tuple(values)

    def slo(self, value: Any) -> Slo:
        """`slo`: the goodput objectives, seconds; at least one of ttft_s, tpot_s."""
        settings = self.mapping(value, "slo", SLO_KEYS)
        if not settings:
            raise self.error("slo", "an empty mapping sets no objective", _listing(SLO_KEYS))
        limits: dict[str, float] = {}
        for name, limit in settings.items():
            if not _is_number(limit) or not math.isfinite(limit) or limit <= 0:
                raise self.error(f"slo.{name}", f"got {_quote(limit)}", "numbers > 0 (seconds)")
            limits[name] = float(limit)
        return Slo(**limits)

    # --- sections

    def models(self, value: Any) -> tuple[ModelConfig, ...]:
        entries = self.items(value, "models", "mappings with keys " + _listing(MODEL_KEYS))
        models: list[ModelConfig] = []
        for i, entry in enumerate(entries):
            key = f"models[{i}]"
            if isinstance(entry, str):  # shorthand: just the id
                entry = {"id": entry}
            entry = self.mapping(entry, key, MODEL_KEYS)
            if "id" not in entry:
                raise self.error(f"{key}.id", "missing required key", _listing(MODEL_KEYS))
            model_id = self.text(entry["id"], f"{key}.id")
            try:
                check_model_id(model_id)
            except UnknownModelError as exc:
                raise self.error(f"{key}.id", str(exc)) from None
            dtype = entry.get("dtype", "float32")
            if dtype not in DTYPES:
                raise self.error(f"{key}.dtype", f"unknown dtype {_quote(dtype)}", _listing(DTYPES))
            revision = entry.get("revision")
            if revision is not None:
                revision = self.text(revision, f"{key}.revision")
            trust = entry.get("trust_remote_code", False)
            if not isinstance(trust, bool):
                raise self.error(f"{key}.trust_remote_code", f"got {_quote(trust)}", "true, false")
            style = entry.get("prompt_style", default_prompt_style(model_id))
            if style not in PROMPT_STYLES:
                raise self.error(
                    f"{key}.prompt_style",
                    f"unknown prompt style {_quote(style)}",
                    _listing(PROMPT_STYLES),
                )
            if any(safe_name(m.id) == safe_name(model_id) for m in models):
                raise self.error(
                    f"{key}.id", f"model {_quote(model_id)} appears twice", "each once"
                )
            models.append(ModelConfig(model_id, dtype, revision, trust, style))
        return tuple(models)

    def methods(self, value: Any) -> list[_Entry]:
        # the registry imports every drafter (and torch): only when a grid is validated, so
        # `status`, `logs` and `cancel` start fast
        from mmspec.methods.registry import method_names

        known = method_names()
        listed = self.items(
            value, "methods", _listing(known) + ", or variants {name, method, args}"
        )
        entries: list[_Entry] = []
        for i, item in enumerate(listed):
            key = f"methods[{i}]"
            if isinstance(item, Mapping):
                entry = self.variant(item, key, known)
            else:
                entry = self.plain_method(item, key, known)
            if any(e.name == entry.name for e in entries):
                kind = "variant name" if entry.is_variant else "method"
                where = f"{key}.name" if entry.is_variant else key
                raise self.error(where, f"{kind} {_quote(entry.name)} appears twice", "each once")
            entries.append(entry)
        if not any(e.name == BASELINE for e in entries):
            log.info(
                "%s: methods: added the %r baseline (every speedup is measured against it)",
                self.source,
                BASELINE,
            )
            entries.insert(0, _Entry(BASELINE, BASELINE, f"method_args.{BASELINE}", {}))
        return entries

    def plain_method(self, item: Any, key: str, known: Sequence[str]) -> _Entry:
        """A registered method by its name; its arguments are in method_args."""
        if not isinstance(item, str) or item not in known:
            raise self.error(key, f"unknown method {_quote(item)}", _listing(known))
        return _Entry(item, item, f"method_args.{item}", {})

    def variant(self, item: Mapping[str, Any], key: str, known: Sequence[str]) -> _Entry:
        """A named variant, `{name, method, args}`: a registered method under its own name."""
        item = self.mapping(item, key, VARIANT_KEYS)
        for required in ("name", "method"):
            if required not in item:
                raise self.error(f"{key}.{required}", "missing required key", "name, method, args")
        name = self.name(item["name"], f"{key}.name")
        if name in known:
            raise self.error(
                f"{key}.name",
                f"{_quote(name)} is a registered method; a variant needs a name of its own",
                f"any other name, or the method's own arguments in method_args.{name}",
            )
        method = item["method"]
        if not isinstance(method, str) or method not in known:
            raise self.error(f"{key}.method", f"unknown method {_quote(method)}", _listing(known))
        if method == BASELINE:
            raise self.error(
                f"{key}.method",
                f"the {BASELINE!r} baseline has no settings to vary",
                _listing([m for m in known if m != BASELINE]),
            )
        args = item.get("args", {})
        if not isinstance(args, Mapping):
            raise self.error(f"{key}.args", f"expected a mapping of arguments, got {_quote(args)}")
        return _Entry(name, method, f"{key}.args", dict(args), is_variant=True)

    def method_args(self, value: Any, entries: Sequence[_Entry]) -> dict[str, dict[str, Any]]:
        if not isinstance(value, Mapping):
            raise self.error("method_args", f"expected a mapping, got {_quote(value)}")
        by_name = {e.name: e for e in entries}
        result: dict[str, dict[str, Any]] = {}
        for method, args in value.items():
            key = f"method_args.{method}"
            entry = by_name.get(method)
            if entry is None:
                names = [e.name for e in entries if not e.is_variant]
                raise self.error(key, f"{_quote(method)} is not in methods", _listing(names))
            if entry.is_variant:
                raise self.error(
                    key,
                    f"{_quote(method)} is a variant: its arguments go in its own args",
                    f"methods: [{{name: {method}, method: {entry.method}, args: {{...}}}}]",
                )
            if not isinstance(args, Mapping):
                raise self.error(key, f"expected a mapping of arguments, got {_quote(args)}")
            result[method] = dict(args)
        return result

    def variants(
        self, entries: Sequence[_Entry], method_args: Mapping[str, Mapping[str, Any]]
    ) -> tuple[Variant, ...]:
        """Every entry expanded: one variant per combination of its swept values, each built
        once here (types, then the drafter's own range checks) before any worker starts."""
        variants: list[Variant] = []
        for entry in entries:
            args = dict(method_args.get(entry.name, {}))
            for variant in self.expand_entry(entry, args):
                self.unique_variant(variant, entry, variants)
                variants.append(variant)
        return tuple(variants)

    def expand_entry(self, entry: _Entry, args: dict[str, Any]) -> Iterator[Variant]:
        from mmspec.methods.registry import UnknownMethodError, get_drafter

        try:
            drafter_cls = get_drafter(entry.method)
        except UnknownMethodError as exc:
            raise self.error(entry.args_key, str(exc)) from None
        try:
            json.dumps(args, allow_nan=False)
        except (TypeError, ValueError):
            raise self.error(
                entry.args_key, "arguments must be plain numbers, strings, lists"
            ) from None
        swept = self.swept_values(drafter_cls, args, entry.args_key)
        count = math.prod(len(values) for values in swept.values())
        if count > MAX_VARIANTS:
            raise self.error(
                entry.args_key,
                f"the lists sweep {count:,} combinations of "
                f"{', '.join(f'{len(v)} {k}' for k, v in swept.items())}",
                f"at most {MAX_VARIANTS} variants per method: shorter lists",
            )
        defaults = drafter_cls.arg_defaults()
        for values in itertools.product(*swept.values()):
            chosen = dict(zip(swept, values))
            setting = {**args, **chosen}
            name = variant_name(entry.name, list(chosen.items()))
            self.drafter_accepts(drafter_cls, name, setting, entry.args_key)
            resolved = json.loads(json.dumps({**defaults, **setting}, default=_plain))
            yield Variant(name, entry.method, setting, resolved, entry.name, tuple(swept))

    def swept_values(
        self, drafter_cls: type[Drafter], args: Mapping[str, Any], key: str
    ) -> dict[str, list[Any]]:
        """The arguments given as a list of values (a sweep) with those values, type-checked
        one by one; every other argument is checked whole. An argument whose type is itself a
        list takes a list as its value, never as a sweep."""
        from mmspec.methods.base import MethodArgError, accepts

        schema = drafter_cls.arg_types()
        swept: dict[str, list[Any]] = {}
        for name, value in args.items():
            takes_list = name in schema and accepts(schema[name], [])
            if not isinstance(value, list) or takes_list or name not in schema:
                try:
                    drafter_cls.check_args({name: value})
                except MethodArgError as exc:
                    method = drafter_cls.name if takes_list else None
                    raise self.bad_option(key, exc, list_of=method) from None
                continue
            if not value or len(value) > MAX_VARIANTS:
                raise self.error(
                    f"{key}.{name}",
                    f"a list of {len(value):,} values" if value else "an empty list sweeps nothing",
                    f"one value, or a list of 1 to {MAX_VARIANTS} values (one variant each)",
                )
            for j, element in enumerate(value):
                try:
                    drafter_cls.check_args({name: element})
                except MethodArgError as exc:
                    raise self.bad_option(f"{key}.{name}[{j}]", exc, indexed=True) from None
                if any(_same(element, v) for v in value[:j]):
                    raise self.error(
                        f"{key}.{name}[{j}]",
                        f"duplicate value {_quote(element)}",
                        "each value once",
                    )
            swept[name] = list(value)
        return swept

    def drafter_accepts(
        self, drafter_cls: type[Drafter], name: str, args: dict[str, Any], key: str
    ) -> None:
        # Types are checked (swept_values); building the drafter checks the ranges, before
        # any worker starts.
        try:
            drafter_cls(**args)
        except (TypeError, ValueError) as exc:
            problem = f"bad arguments for {name}: {exc}"
            raise self.error(key, problem, _listing(drafter_cls.arg_names())) from None
        for option, layers in drafter_cls.layer_args(args).items():
            self.layers_exist(f"{key}.{option}", layers)

    def unique_variant(self, variant: Variant, entry: _Entry, earlier: Sequence[Variant]) -> None:
        """Two variants may share neither a name (as ids spell it) nor a setting: results of
        one could not be told from the other's."""
        for other in earlier:
            if method_id(other.name) == method_id(variant.name):
                raise self.error(
                    entry.key,
                    f"variant {_quote(variant.name)} has the same id as {_quote(other.name)} "
                    f"({method_id(variant.name)}), which names its results",
                    "names that differ in letters, digits, '.', '-' or '+'",
                )
            if other.method == variant.method and other.resolved_json == variant.resolved_json:
                raise self.error(
                    entry.key,
                    f"{_quote(variant.name)} runs {variant.method} with the same arguments as "
                    f"{_quote(other.name)} (defaults included)",
                    "each setting of a method once",
                )

    def bad_option(
        self, key: str, exc: MethodArgError, list_of: str | None = None, indexed: bool = False
    ) -> GridError:
        """The message for an option the drafter does not take or a value of the wrong type;
        `key` ends at the method's arguments (or, `indexed`, at one value of a sweep).
        `list_of`: the method, when the option takes a list as its value."""
        if not exc.expected:
            return self.error(key, f"unknown option {_quote(exc.name)}", _listing(exc.known))
        where = key if indexed else f"{key}.{exc.name}"
        if list_of is not None and isinstance(exc.value, list):
            # a list of lists reads as a sweep of a list-valued option: say how to write one
            return self.error(
                where,
                f"got {_quote(exc.value)}; {exc.name} takes a list as its value, so a list is "
                "not a sweep of it: give one variant per value, e.g. methods: [{name: <a name>, "
                f"method: {list_of}, args: {{{exc.name}: <one list>}}}}]",
                exc.expected,
            )
        return self.error(where, f"got {_quote(exc.value)}", exc.expected)

    def layers_exist(self, key: str, layers: Sequence[int]) -> None:
        for model, limit in self.limits:
            n = limit.num_layers
            bad = [i for i in layers if n is not None and not -n <= i < n]
            if bad:
                raise self.error(
                    key,
                    f"layer {bad[0]} is out of range for model {model.id} ({n} decoder layers)",
                    f"integers from {-n} to {n - 1}",
                )

    def workloads(self, value: Any) -> tuple[WorkloadConfig, ...]:
        entries = self.items(value, "workloads", "mappings with keys " + _listing(WORKLOAD_KEYS))
        workloads: list[WorkloadConfig] = []
        for i, entry in enumerate(entries):
            key = f"workloads[{i}]"
            entry = self.mapping(entry, key, WORKLOAD_KEYS)
            if ("builtin" in entry) == ("path" in entry):
                raise self.error(key, "give exactly one of builtin or path", "builtin, path")
            builtin = path = None
            if "builtin" in entry:
                builtin = entry["builtin"]
                known = builtin_workloads()
                if builtin not in known:
                    raise self.error(
                        f"{key}.builtin",
                        f"unknown builtin workload {_quote(builtin)}",
                        _listing(known),
                    )
                default_name = builtin
            else:
                resolved = self.workload_path(self.text(entry["path"], f"{key}.path"), key)
                path = str(resolved)
                # a split is named by its folder: `test` for /data/MMSpec/test[/mmspec.jsonl]
                folder = resolved.parent if resolved.suffix == ".jsonl" else resolved
                default_name = safe_name(folder.name)
            name = self.name(entry.get("name", default_name), f"{key}.name")
            if any(w.name == name for w in workloads):
                raise self.error(
                    f"{key}.name", f"workload name {_quote(name)} appears twice", "unique names"
                )
            limit = self.optional_positive_int(entry.get("limit"), f"{key}.limit")
            topics = None
            if "topics" in entry:
                listed = self.items(entry["topics"], f"{key}.topics", _listing(TOPICS))
                for j, topic in enumerate(listed):
                    if topic not in TOPICS:
                        raise self.error(
                            f"{key}.topics[{j}]", f"unknown topic {_quote(topic)}", _listing(TOPICS)
                        )
                topics = tuple(listed)
            workloads.append(WorkloadConfig(name, builtin, path, limit, topics))
        return tuple(workloads)

    def workload_path(self, written: str, key: str) -> Path:
        allowed = "an existing directory with mmspec.jsonl + images/"
        try:
            resolved = (self.base_dir / Path(written).expanduser()).resolve()
            found = resolved.exists()
        except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
            problem = getattr(exc, "strerror", None) or type(exc).__name__
            raise self.error(
                f"{key}.path", f"workload path {_quote(written)} cannot be read: {problem}", allowed
            ) from None
        if not found:
            raise self.error(
                f"{key}.path",
                f"workload path {_quote(written)} does not exist (looked at "
                f"{_quote(str(resolved))})",
                allowed,
            )
        return resolved

    def exclude(self, value: Any, grid: Grid) -> tuple[dict[str, Any], ...]:
        if not isinstance(value, list):
            raise self.error("exclude", f"expected a list, got {_quote(value)}")
        variants = [v.name for v in grid.variants if v.name not in grid.methods]
        choices: dict[str, list[Any]] = {
            "model": [m.id for m in grid.models],
            # an entry (all of its sweep) or one variant of a sweep
            "method": [*grid.methods, *variants],
            "batch_size": sorted({load.batch_size for load in loads(grid)}),
            "scenario": [scenario.name for scenario in grid.scenarios],
            "temperature": list(grid.temperatures),
            "repeat": list(range(grid.repeats)),
            "workload": [w.name for w in grid.workloads],
        }
        rules: list[dict[str, Any]] = []
        for i, entry in enumerate(value):
            key = f"exclude[{i}]"
            entry = self.mapping(entry, key, EXCLUDE_KEYS)
            if not entry:
                raise self.error(key, "an empty rule would exclude everything", "one or more keys")
            for field_name, field_value in entry.items():
                allowed = choices[field_name]
                # a value that matches nothing is almost always a typo; say so instead
                if field_value not in allowed or isinstance(field_value, bool):
                    raise self.error(
                        f"{key}.{field_name}",
                        f"{_quote(field_value)} is not in the grid",
                        _listing(allowed),
                    )
            if entry.get("method") == BASELINE:
                raise self.error(
                    f"{key}.method",
                    f"the {BASELINE!r} baseline cannot be excluded (speedups need it)",
                    _listing([m for m in grid.methods if m != BASELINE]),
                )
            rule = dict(entry)
            if "temperature" in rule:
                rule["temperature"] = float(rule["temperature"])
            rules.append(rule)
        return tuple(rules)
