"""Method variants in a report: a method run with several settings, grouped under it.

A grid may run one registered method several times: named variants and list-valued arguments
(results/variants.py). The question a reader has is which setting pays at each batch size (a
wide tree at batch size 1 rarely wins at 8), so per method the report sets its variants side
by side, picks the best one per batch size by speedup, and charts speedup over an argument the
grid swept. Variants are told apart by the arguments whose values differ between them, read
from the `method_args` each cell recorded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from mmspec.results.variants import arg_text, varying_args

NOTE = (
    "Methods the grid ran with several settings (named variants, or a list of values for an "
    "argument): each setting's speedup (global) per batch size, then the best setting at each "
    "batch size. Arguments: those whose value differs between the settings (defaults included)."
)
Row = dict[str, Any]


@dataclass(frozen=True)
class VariantGroup:
    """One registered method's settings in one (model, temperature) of a run."""

    model: str
    temperature: float
    method: str  # the registered method
    names: tuple[str, ...]  # what the run calls each setting, in report order
    args: Mapping[str, Mapping[str, Any]]  # name -> its value of each of `varying`
    varying: tuple[str, ...]  # the arguments that tell the settings apart
    cells: Mapping[tuple[str, int], Row]  # (name, batch size) -> pooled metrics row

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({b for _, b in self.cells})

    def label(self, name: str) -> str:
        """A setting's arguments that tell it apart, in one line: `depth=5, top_k=10` (empty
        where its run did not record them)."""
        values = self.args.get(name, {})
        return ", ".join(f"{k}={arg_text(values[k])}" for k in self.varying if k in values)


@dataclass(frozen=True)
class Best:
    """The fastest setting of a group at one batch size."""

    batch_size: int
    name: str
    row: Row  # its pooled metrics
    settings: int  # how many settings had a speedup there


@dataclass(frozen=True)
class SweepLine:
    """Speedup against one argument's value, the other arguments and batch size fixed."""

    label: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]


@dataclass(frozen=True)
class Sweep:
    """Speedup over one swept argument of a group: one line per batch size (and per value of
    the group's other varying arguments)."""

    group: VariantGroup
    arg: str
    lines: tuple[SweepLine, ...]


def variant_groups(pooled: pl.DataFrame, order: Sequence[str]) -> list[VariantGroup]:
    """The methods of `pooled` (pooled cells of one model and temperature, with `base_method`
    and `method_args`) that ran under more than one name, in `order` (method names)."""
    rank = {name: i for i, name in enumerate(order)}
    rows = sorted(pooled.iter_rows(named=True), key=lambda r: rank.get(r["method"], len(rank)))
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r["base_method"] or r["method"], []).append(r)
    groups = []
    for method, members in by_method.items():
        names = tuple(dict.fromkeys(r["method"] for r in members))
        if len(names) < 2:
            continue
        settings = {r["method"]: _arguments(r["method_args"]) for r in members}
        varying = tuple(varying_args(list(settings.values())))
        first = members[0]
        groups.append(
            VariantGroup(
                model=first["model"],
                temperature=first["temperature"],
                method=method,
                names=names,
                args={n: {k: settings[n][k] for k in varying if k in settings[n]} for n in names},
                varying=varying,
                cells={(r["method"], r["batch_size"]): r for r in members},
            )
        )
    return groups


def _arguments(recorded: str | None) -> dict[str, Any]:
    # null where the run did not record them (an imported run): nothing to tell apart by
    if not recorded:
        return {}
    parsed = json.loads(recorded)
    return parsed if isinstance(parsed, dict) else {}


def best_per_batch(group: VariantGroup, column: str = "speedup_global") -> list[Best]:
    """Per batch size, the setting with the highest `column` (the first in order on a tie);
    batch sizes where no setting has one are left out."""
    found = []
    for batch_size in group.batch_sizes:
        scored = [
            (r[column], name)
            for name in group.names
            if (r := group.cells.get((name, batch_size))) is not None and r[column] is not None
        ]
        if not scored:
            continue
        best = max(scored, key=lambda s: s[0])  # max keeps the first of equal values
        found.append(Best(batch_size, best[1], group.cells[(best[1], batch_size)], len(scored)))
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def sweeps(group: VariantGroup, column: str = "speedup_global") -> list[Sweep]:
    """For each numeric argument that varies, `column` over its values: one line per batch
    size and per setting of the other varying arguments that has two values or more."""
    found = []
    for arg in group.varying:
        values = [group.args[n].get(arg) for n in group.names]
        if not all(_is_number(v) for v in values):
            continue
        others = [k for k in group.varying if k != arg]
        fixed: dict[tuple[str, ...], list[str]] = {}
        for name in group.names:
            rest = tuple(f"{k}={arg_text(group.args[name].get(k))}" for k in others)
            fixed.setdefault(rest, []).append(name)
        lines = [
            line
            for rest, names in fixed.items()
            for b in group.batch_sizes
            if (line := _line(group, arg, names, b, rest, column)) is not None
        ]
        if lines:
            found.append(Sweep(group, arg, tuple(lines)))
    return found


def _line(
    group: VariantGroup,
    arg: str,
    names: Sequence[str],
    batch_size: int,
    rest: tuple[str, ...],
    column: str,
) -> SweepLine | None:
    points = sorted(
        (float(group.args[n][arg]), r[column])
        for n in names
        if (r := group.cells.get((n, batch_size))) is not None and r[column] is not None
    )
    if len(points) < 2:
        return None
    label = " · ".join([f"batch size {batch_size}", *rest])
    return SweepLine(label, tuple(x for x, _ in points), tuple(y for _, y in points))
