"""grid.yaml: parse and validate it, expand it into cells, chunk cells into shards.

A grid file is data, never code: it is read with `yaml.safe_load`, and methods, models and
workloads are looked up by name in their registries. Every problem is reported as a
`GridError` naming the file, the key path (`models[1].id`) and what is allowed, before
anything is started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmspec.models.prompting import PROMPT_STYLES, default_prompt_style
from mmspec.models.registry import UnknownModelError, check_model_id
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.workload_config import WorkloadConfig, builtin_workloads
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.ids import cell_id, safe_name, shard_id
from mmspec.workloads.sample import TOPICS, Sample

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
    "temperatures",
    "max_new_tokens",
    "repeats",
    "seed",
    "exclude",
    "shard_size",
    "workers",
    "threads_per_worker",
    "gpus_per_worker",
)
REQUIRED_KEYS = ("name", "workloads", "models", "methods")
WORKLOAD_KEYS = ("builtin", "path", "name", "limit", "topics")
MODEL_KEYS = ("id", "dtype", "revision", "trust_remote_code", "prompt_style")
EXCLUDE_KEYS = ("model", "method", "batch_size", "temperature", "repeat", "workload")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class GridError(ValueError):
    """A grid file that cannot be run; the message names file, key and allowed values."""


@dataclass(frozen=True)
class Grid:
    """A validated grid. `to_dict` gives its canonical form; `parse_grid` reads that back."""

    name: str
    workloads: tuple[WorkloadConfig, ...]
    models: tuple[ModelConfig, ...]
    methods: tuple[str, ...]  # always starts with the baseline "ar"
    method_args: dict[str, dict[str, Any]]  # only for methods in `methods`
    batch_sizes: tuple[int, ...] = (1,)
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
    source: str = field(default="<grid>", compare=False)  # file name, for messages only


# ----------------------------------------------------------------------------- reading


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise GridError(f"{source}: cannot read the grid file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise GridError(f"{source}: not valid YAML{where}: {problem}") from None
    return parse_grid(data, source, base_dir=Path(path).parent)


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
        "methods": list(grid.methods),
        "method_args": {m: dict(a) for m, a in sorted(grid.method_args.items())},
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
    }


def grid_sha256(grid: Grid) -> str:
    """sha256 of the canonical JSON of the grid; `out` is left out (where, not what)."""
    canonical = {k: v for k, v in to_dict(grid).items() if k != "out"}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _asdict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# ----------------------------------------------------------------------------- expanding


def expand(grid: Grid) -> list[Cell]:
    """All cells: model x method x batch size x temperature x repeat x workload, minus excludes."""
    cells = []
    for model in grid.models:
        for method in grid.methods:
            for batch_size in grid.batch_sizes:
                for temperature in grid.temperatures:
                    for repeat in range(grid.repeats):
                        for workload in grid.workloads:
                            cell = Cell(
                                cell_id=cell_id(
                                    model.id,
                                    method,
                                    batch_size,
                                    temperature,
                                    repeat,
                                    workload.name,
                                ),
                                model=model,
                                method=method,
                                method_args=dict(grid.method_args.get(method, {})),
                                batch_size=batch_size,
                                temperature=temperature,
                                repeat=repeat,
                                seed=grid.seed,
                                max_new_tokens=grid.max_new_tokens,
                                workload=workload.name,
                            )
                            if not any(_excluded(rule, cell) for rule in grid.exclude):
                                cells.append(cell)
    return cells


def _excluded(rule: Mapping[str, Any], cell: Cell) -> bool:
    values = {
        "model": cell.model.id,
        "method": cell.method,
        "batch_size": cell.batch_size,
        "temperature": cell.temperature,
        "repeat": cell.repeat,
        "workload": cell.workload,
    }
    return all(values[key] == value for key, value in rule.items())


def chunk_size(shard_size: int, batch_size: int) -> int:
    """Samples per shard: `shard_size` rounded up to whole batches (at least one batch)."""
    return max(1, math.ceil(shard_size / batch_size)) * batch_size


def make_shards(
    cells: Sequence[Cell],
    samples_by_workload: Mapping[str, Sequence[Sample]],
    run_id: str,
    shard_size: int,
) -> list[Shard]:
    """Cut every cell's samples into shards of whole batches; ids are `<cell_id>__s000`..."""
    shards = []
    for cell in cells:
        if cell.workload not in samples_by_workload:
            raise KeyError(f"no samples loaded for workload {cell.workload!r}")
        samples = samples_by_workload[cell.workload]
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


# ----------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _listing(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values) if values else "(none)"


class _Parser:
    """Validates one grid; holds the file name so every error can name it."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source  # the file the data came from, for messages
        self.base_dir = base_dir  # relative workload paths start here

    def error(self, key: str, problem: str, allowed: str | None = None) -> GridError:
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        return GridError(where + problem + (f"; allowed: {allowed}" if allowed else ""))

    def grid(self, data: Any) -> Grid:
        if not isinstance(data, Mapping):
            raise self.error("", "the grid must be a mapping of keys", _listing(GRID_KEYS))
        self.keys(data, "", GRID_KEYS)
        for key in REQUIRED_KEYS:
            if key not in data:
                raise self.error(key, "missing required key", _listing(GRID_KEYS))

        models = self.models(data["models"])
        methods = self.methods(data["methods"])
        workloads = self.workloads(data["workloads"])
        batch_sizes = self.positive_ints(data.get("batch_sizes", [1]), "batch_sizes")
        temperatures = self.temperatures(data.get("temperatures", [0.0]))
        repeats = self.positive_int(data.get("repeats", 1), "repeats")
        grid = Grid(
            name=self.name(data["name"], "name"),
            out=self.text(data.get("out", "runs"), "out"),
            workloads=workloads,
            models=models,
            methods=methods,
            method_args=self.method_args(data.get("method_args") or {}, methods),
            batch_sizes=batch_sizes,
            temperatures=temperatures,
            max_new_tokens=self.positive_int(data.get("max_new_tokens", 256), "max_new_tokens"),
            repeats=repeats,
            seed=self.seed(data.get("seed", 0)),
            exclude=(),
            shard_size=self.positive_int(data.get("shard_size", DEFAULT_SHARD_SIZE), "shard_size"),
            workers=self.optional_positive_int(data.get("workers"), "workers"),
            threads_per_worker=self.positive_int(
                data.get("threads_per_worker", 1), "threads_per_worker"
            ),
            gpus_per_worker=self.gpus_per_worker(data.get("gpus_per_worker", 1)),
            source=self.source,
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
            raise self.error(key, f"expected a mapping, got {value!r}", _listing(allowed))
        self.keys(value, key, allowed)
        return value

    def items(self, value: Any, key: str, what: str) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.error(key, f"expected a non-empty list, got {value!r}", what)
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value

    def name(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.error(
                key, f"bad name {value!r}", "letters, digits, '.', '_', '-' (not first)"
            )
        return value

    def positive_int(self, value: Any, key: str) -> int:
        if not _is_int(value) or value < 1:
            raise self.error(key, f"got {value!r}", "positive integers")
        return value

    def optional_positive_int(self, value: Any, key: str) -> int | None:
        return None if value is None else self.positive_int(value, key)

    def gpus_per_worker(self, value: Any) -> int:
        if not _is_int(value) or value < 1:
            raise self.error(
                "gpus_per_worker",
                f"got {value!r}",
                "positive integers: the GPUs one worker reserves on one node (default 1); "
                "on a cluster without GPUs it is ignored",
            )
        return value

    def seed(self, value: Any) -> int:
        if not _is_int(value) or value < 0:
            raise self.error("seed", f"got {value!r}", "integers >= 0")
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
                raise self.error(f"temperatures[{i}]", f"got {v!r}", "numbers >= 0")
            if float(v) in result:
                raise self.error(f"temperatures[{i}]", f"duplicate value {v}", "each value once")
            result.append(float(v))
        return tuple(result)

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
                raise self.error(f"{key}.dtype", f"unknown dtype {dtype!r}", _listing(DTYPES))
            revision = entry.get("revision")
            if revision is not None:
                revision = self.text(revision, f"{key}.revision")
            trust = entry.get("trust_remote_code", False)
            if not isinstance(trust, bool):
                raise self.error(f"{key}.trust_remote_code", f"got {trust!r}", "true, false")
            style = entry.get("prompt_style", default_prompt_style(model_id))
            if style not in PROMPT_STYLES:
                raise self.error(
                    f"{key}.prompt_style",
                    f"unknown prompt style {style!r}",
                    _listing(PROMPT_STYLES),
                )
            if any(safe_name(m.id) == safe_name(model_id) for m in models):
                raise self.error(f"{key}.id", f"model {model_id!r} appears twice", "each once")
            models.append(ModelConfig(model_id, dtype, revision, trust, style))
        return tuple(models)

    def methods(self, value: Any) -> tuple[str, ...]:
        # the registry imports every drafter (and torch): only when a grid is validated, so
        # `status`, `logs` and `cancel` start fast
        from mmspec.methods.registry import method_names

        known = method_names()
        entries = self.items(value, "methods", _listing(known))
        for i, method in enumerate(entries):
            if not isinstance(method, str) or method not in known:
                raise self.error(f"methods[{i}]", f"unknown method {method!r}", _listing(known))
            if method in entries[:i]:
                raise self.error(f"methods[{i}]", f"method {method!r} appears twice")
        if BASELINE not in entries:
            log.info(
                "%s: methods: added the %r baseline (every speedup is measured against it)",
                self.source,
                BASELINE,
            )
            entries = [BASELINE, *entries]
        return tuple(entries)

    def method_args(self, value: Any, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not isinstance(value, Mapping):
            raise self.error("method_args", f"expected a mapping, got {value!r}")
        result: dict[str, dict[str, Any]] = {}
        for method, args in value.items():
            key = f"method_args.{method}"
            if method not in methods:
                raise self.error(key, f"{method!r} is not in methods", _listing(methods))
            if not isinstance(args, Mapping):
                raise self.error(key, f"expected a mapping of arguments, got {args!r}")
            args = dict(args)
            try:
                json.dumps(args, allow_nan=False)
            except (TypeError, ValueError):
                raise self.error(key, "arguments must be plain numbers, strings, lists") from None
            self.drafter_accepts(method, args, key)
            result[method] = args
        return result

    def drafter_accepts(self, method: str, args: dict[str, Any], key: str) -> None:
        # Building the drafter now catches a bad argument before any worker starts.
        from mmspec.methods.registry import UnknownMethodError, get_drafter

        try:
            drafter_cls = get_drafter(method)
        except UnknownMethodError as exc:
            raise self.error(key, str(exc)) from None
        params = drafter_cls.arg_names()
        try:
            drafter_cls(**args)
        except (TypeError, ValueError) as exc:
            raise self.error(key, f"bad arguments for {method}: {exc}", _listing(params)) from None

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
                        f"{key}.builtin", f"unknown builtin workload {builtin!r}", _listing(known)
                    )
                default_name = builtin
            else:
                written = self.text(entry["path"], f"{key}.path")
                resolved = (self.base_dir / Path(written).expanduser()).resolve()
                if not resolved.exists():
                    raise self.error(
                        f"{key}.path",
                        f"workload path {written!r} does not exist (looked at {resolved})",
                        "an existing directory with mmspec.jsonl + images/",
                    )
                path = str(resolved)
                # a split is named by its folder: `test` for /data/MMSpec/test[/mmspec.jsonl]
                folder = resolved.parent if resolved.suffix == ".jsonl" else resolved
                default_name = safe_name(folder.name)
            name = self.name(entry.get("name", default_name), f"{key}.name")
            if any(w.name == name for w in workloads):
                raise self.error(
                    f"{key}.name", f"workload name {name!r} appears twice", "unique names"
                )
            limit = self.optional_positive_int(entry.get("limit"), f"{key}.limit")
            topics = None
            if "topics" in entry:
                listed = self.items(entry["topics"], f"{key}.topics", _listing(TOPICS))
                for j, topic in enumerate(listed):
                    if topic not in TOPICS:
                        raise self.error(
                            f"{key}.topics[{j}]", f"unknown topic {topic!r}", _listing(TOPICS)
                        )
                topics = tuple(listed)
            workloads.append(WorkloadConfig(name, builtin, path, limit, topics))
        return tuple(workloads)

    def exclude(self, value: Any, grid: Grid) -> tuple[dict[str, Any], ...]:
        if not isinstance(value, list):
            raise self.error("exclude", f"expected a list, got {value!r}")
        choices: dict[str, list[Any]] = {
            "model": [m.id for m in grid.models],
            "method": list(grid.methods),
            "batch_size": list(grid.batch_sizes),
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
                        f"{field_value!r} is not in the grid",
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
