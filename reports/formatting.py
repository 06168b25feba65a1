"""Value → text formatters shared by every report (report.md, report.html, compare, history).

Each returns DASH for a missing value, so a table cell is never empty and never "None".
"""

from __future__ import annotations

from typing import Any

DASH = "–"
NOT_MEASURED = "not measured"


def num(value: float | None, spec: str, suffix: str = "") -> str:
    """`value` in format `spec` (".2f", ".4g") followed by `suffix` ("×", " s")."""
    return DASH if value is None else f"{value:{spec}}{suffix}"


def pct(share: float | None) -> str:
    """A share (0.5) as a percentage with one decimal (50.0%)."""
    return num(None if share is None else 100 * share, ".1f", "%")


def signed_pct(change: float | None) -> str:
    """A relative change (-0.031) as a signed percentage (−3.1%)."""
    if change is None:
        return DASH
    # A real minus sign: "−3.1%" reads better than "-3.1%" in a table.
    return f"{100 * change:+.1f}%".replace("-", "−")


def transition(before: float | None, after: float | None, spec: str, suffix: str = "") -> str:
    """Two values of one metric, e.g. BASE → NEW: "1.20 → 1.35"."""
    return f"{num(before, spec, suffix)} → {num(after, spec, suffix)}"


def seconds(value: float) -> str:
    """A duration in the unit that keeps 3 significant digits readable."""
    magnitude = abs(value)
    if magnitude >= 1 or magnitude == 0:
        return f"{value:.3g} s"
    if magnitude >= 1e-3:
        return f"{1e3 * value:.3g} ms"
    return f"{1e6 * value:.3g} µs"


def gib(value: int | None) -> str:
    """Bytes as GiB (MiB below 1 GiB); "not measured" when missing."""
    if value is None:
        return NOT_MEASURED
    if value < 2**30:
        return f"{value / 2**20:.0f} MiB"
    return f"{value / 2**30:.2f} GiB"


def energy_per_token(cell: dict[str, Any] | None) -> str:
    """A cell's energy per token in J (mJ below 1 J), with its coverage when only some rows
    were measured; "not measured" when none was."""
    if cell is None or cell.get("energy_per_token_j") is None:
        return NOT_MEASURED
    value = cell["energy_per_token_j"]
    text = f"{value:.3f} J" if value >= 1 else f"{1000 * value:.1f} mJ"
    if cell["energy_rows"] < cell["samples"]:
        text += f" ({cell['energy_rows']} of {cell['samples']} rows)"
    return text


UNAVAILABLE = "unavailable"


def speedup(value: float | None, decimals: int = 2) -> str:
    """A speedup (1.234) as "1.23×"; "unavailable" where there is none (no `ar` to divide by,
    or no request both ran)."""
    return UNAVAILABLE if value is None else f"{value:.{decimals}f}×"


def efficiency(cell: dict[str, Any]) -> str:
    """A cell's implementation efficiency (measured / ideal speedup) as a percentage; "not
    measured" without an ideal (no t(T) for a method that drafted), "unavailable" without a
    measured speedup."""
    if cell.get("ideal_speedup") is None:
        return NOT_MEASURED
    value = cell.get("implementation_efficiency")
    return UNAVAILABLE if value is None else pct(value)
