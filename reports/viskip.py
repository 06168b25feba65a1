"""The ViSkip section: each `viskip+X` cell beside the cell of X it wraps.

ViSkip only decides, step by step, whether X drafts; so the question a reader has is what
skipping changed against X itself (same model, batch size and temperature): how many steps
were skipped, what that cost in accepted tokens, and what it saved in draft time and
wall-clock. `tables.viskip_table` lays the rows built here out for both report formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from mmspec.results.ids import VISKIP_PREFIX as PREFIX

NOTE = (
    "Each `viskip+X` cell against X (same model, batch size, temperature): X → viskip+X. "
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


def viskip_rows(merged: pl.DataFrame) -> list[ViSkipRow]:
    """Pairs of pooled cells (see `markdown.merged_cells`), in (model, T, method, batch) order;
    a `viskip+X` cell whose X is not in the run is left out (nothing to compare with)."""
    cells = {
        (r["model"], r["temperature"], r["batch_size"], r["method"]): r
        for r in merged.iter_rows(named=True)
    }
    rows = []
    for (model, temperature, batch_size, method), skip in cells.items():
        if not method.startswith(PREFIX):
            continue
        inner = method[len(PREFIX) :]
        base = cells.get((model, temperature, batch_size, inner))
        if base is not None:
            rows.append(ViSkipRow(model, temperature, batch_size, inner, base, skip))
    return sorted(rows, key=lambda r: (r.model, r.temperature, r.method, r.batch_size))


def grouped(rows: list[ViSkipRow]) -> dict[tuple[str, float], list[ViSkipRow]]:
    """The rows per (model, temperature), in order."""
    out: dict[tuple[str, float], list[ViSkipRow]] = {}
    for row in rows:
        out.setdefault((row.model, row.temperature), []).append(row)
    return out
