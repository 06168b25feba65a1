"""The ViSkip section: each `viskip+X` cell beside the cell of X it wraps.

ViSkip only decides, step by step, whether X drafts; so the question a reader has is what
skipping changed against X itself (same model, batch size and temperature): how many steps
were skipped, what that cost in accepted tokens, and what it saved in draft time and
wall-clock. `tables.viskip_table` lays the rows built here out for both report formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from mmspec.results.ids import VISKIP_PREFIX as PREFIX
from mmspec.results.variants import canonical_args

VISKIP_ARGS = "viskip_"  # ViSkip's own arguments; the rest are the wrapped method's

NOTE = (
    "Each `viskip+X` cell against X (same model, batch size, temperature; X run with the "
    "arguments viskip+X hands it): X → viskip+X. "
    "Skipped steps: share of verification steps where ViSkip did not draft (a plain AR step). "
    "ViSkip vs method: tokens/s of viskip+X / tokens/s of X (>1: skipping paid off)."
)


@dataclass(frozen=True)
class ViSkipRow:
    """One base method at one batch size: the wrapped cell and the cell of the method alone."""

    model: str
    temperature: float
    batch_size: int
    method: str  # X
    name: str  # what the run calls the viskip+X cell (a variant's name, where one ran)
    base: dict[str, Any]  # pooled cell of X (merged metrics + details)
    skip: dict[str, Any]  # pooled cell of viskip+X

    @property
    def skipped_share(self) -> float | None:
        steps = self.skip.get("steps") or 0
        return self.skip["skipped_steps"] / steps if steps else None

    @property
    def throughput_ratio(self) -> float | None:
        base, skip = self.base.get("tokens_per_s"), self.skip.get("tokens_per_s")
        return skip / base if base and skip is not None else None


def _wrapped_setting(recorded: str | None) -> str | None:
    """The arguments a `viskip+X` cell handed to X (ViSkip's own are `viskip_`-prefixed), as
    X's cells record theirs; None where the run recorded none."""
    if not recorded:
        return None
    args = json.loads(recorded)
    return canonical_args({k: v for k, v in args.items() if not k.startswith(VISKIP_ARGS)})


def _partner(skip: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cell of X that a `viskip+X` cell wraps: X run with the same arguments; by name
    (`viskip+X` beside `X`) for a run that recorded no arguments."""
    inner = (skip["base_method"] or skip["method"]).removeprefix(PREFIX)
    setting = _wrapped_setting(skip["method_args"])
    for cell in cells:
        if (cell["base_method"] or cell["method"]) != inner:
            continue
        if setting is None or cell["method_args"] is None:
            if cell["method"] == skip["method"].removeprefix(PREFIX):
                return cell
        elif canonical_args(json.loads(cell["method_args"])) == setting:
            return cell
    return None


def viskip_rows(merged: pl.DataFrame) -> list[ViSkipRow]:
    """Pairs of pooled cells (see `markdown.merged_cells`), in (model, T, method, batch) order;
    a `viskip+X` cell whose X is not in the run (with the same arguments for X) is left out
    (nothing to compare with). Every setting of a ViSkip sweep gets its row."""
    blocks: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for r in merged.iter_rows(named=True):
        blocks.setdefault((r["model"], r["temperature"], r["batch_size"]), []).append(r)
    rows = []
    for (model, temperature, batch_size), cells in blocks.items():
        for skip in cells:
            if not (skip["base_method"] or skip["method"]).startswith(PREFIX):
                continue
            base = _partner(skip, cells)
            if base is not None:
                name = skip["method"]
                rows.append(
                    ViSkipRow(model, temperature, batch_size, base["method"], name, base, skip)
                )
    return sorted(rows, key=lambda r: (r.model, r.temperature, r.method, r.name, r.batch_size))


def grouped(rows: list[ViSkipRow]) -> dict[tuple[str, float], list[ViSkipRow]]:
    """The rows per (model, temperature), in order."""
    out: dict[tuple[str, float], list[ViSkipRow]] = {}
    for row in rows:
        out.setdefault((row.model, row.temperature), []).append(row)
    return out
