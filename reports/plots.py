"""Inline SVG charts for the HTML report: line charts and horizontal stacked bars.

Hand-written SVG rather than a plotting library: a report draws a few dozen small charts, and
as text they cost milliseconds, need no files beside the page, stay crisp at any zoom, keep
their text selectable, and show exact values on hover (`<title>`).

Example:
    >>> colors = method_colors(["ar", "pld"])
    >>> svg = line_chart(
    ...     [Line("pld", [1, 4], [1.9, 1.4], colors["pld"])],
    ...     title="Speedup vs batch size", x_label="Batch size", y_label="Speedup (×)",
    ...     x_log2=True,
    ... )
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

# Tableau 10: distinct hues that read well on white and survive most colour-vision deficiencies.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#17becf",
    "#bcbd22",
    "#8c564b",
)
BASELINE_COLOR = "#444444"  # the AR baseline: neutral, so every method's colour stands out
GRID = "#e3e3e3"
AXIS = "#888888"
INK = "#333333"

WIDTH = 680
_CHAR_W = 6.6  # mean glyph width of 12px system-ui text, for laying out labels


def method_colors(methods: Sequence[str], baseline: str = "ar") -> dict[str, str]:
    """One colour per method, the same in every chart of a report (the baseline dark grey)."""
    others = [m for m in methods if m != baseline]
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(others)}
    if baseline in methods:
        colors[baseline] = BASELINE_COLOR
    return colors


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, target)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    value = first
    while value < hi + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt_tick(value: float) -> str:
    text = f"{value:.6g}"
    return text if "e" not in text else f"{value:.1e}"


@dataclass(frozen=True)
class Line:
    """One series of a line chart: points in x order."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str
    dashed: bool = False
    point_labels: Sequence[str] = ()  # a short text beside each point (e.g. its batch size)


@dataclass(frozen=True)
class _Frame:
    """Plot area of a chart and its data-to-pixel mapping."""

    left: float
    top: float
    width: float
    height: float
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    x_log2: bool = False

    def x(self, value: float) -> float:
        lo, hi, v = self.x_lo, self.x_hi, value
        if self.x_log2:
            lo, hi, v = math.log2(lo), math.log2(hi), math.log2(v)
        span = (hi - lo) or 1.0
        return self.left + (v - lo) / span * self.width

    def y(self, value: float) -> float:
        span = (self.y_hi - self.y_lo) or 1.0
        return self.top + self.height - (value - self.y_lo) / span * self.height


def _svg_open(width: float, height: float, title: str, kind: str) -> list[str]:
    return [
        f'<svg class="plot" data-kind="{kind}" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="plot-title" x="{width / 2:.1f}" y="20" text-anchor="middle">'
        f"{escape(title)}</text>",
    ]


def _axes(
    frame: _Frame,
    x_ticks: Sequence[float],
    y_ticks: Sequence[float],
    x_label: str,
    y_label: str,
    x_fmt: Callable[[float], str],
    y_fmt: Callable[[float], str],
) -> list[str]:
    parts = ['<g class="axes">']
    bottom = frame.top + frame.height
    right = frame.left + frame.width
    for t in y_ticks:
        y = frame.y(t)
        parts.append(
            f'<line x1="{frame.left:.1f}" x2="{right:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{GRID}"/>'
        )
        parts.append(
            f'<text x="{frame.left - 6:.1f}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(y_fmt(t))}</text>"
        )
    for t in x_ticks:
        x = frame.x(t)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top:.1f}" y2="{bottom:.1f}" '
            f'stroke="{GRID}"/>'
        )
        parts.append(
            f'<text x="{x:.1f}" y="{bottom + 16:.1f}" text-anchor="middle">'
            f"{escape(x_fmt(t))}</text>"
        )
    parts.append(
        f'<rect x="{frame.left:.1f}" y="{frame.top:.1f}" width="{frame.width:.1f}" '
        f'height="{frame.height:.1f}" fill="none" stroke="{AXIS}"/>'
    )
    parts.append(
        f'<text class="axis-label" x="{frame.left + frame.width / 2:.1f}" '
        f'y="{bottom + 36:.1f}" text-anchor="middle">{escape(x_label)}</text>'
    )
    mid = frame.top + frame.height / 2
    parts.append(
        f'<text class="axis-label" x="14" y="{mid:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {mid:.1f})">{escape(y_label)}</text>'
    )
    return [*parts, "</g>"]


def _legend(entries: Sequence[tuple[str, str, bool]], x: float, y: float) -> list[str]:
    """Legend rows (label, colour, dashed) stacked downwards from (x, y)."""
    parts = ['<g class="legend">']
    for i, (label, color, dashed) in enumerate(entries):
        row = y + i * 18
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        parts.append(
            f'<line x1="{x:.1f}" x2="{x + 20:.1f}" y1="{row:.1f}" y2="{row:.1f}" '
            f'stroke="{color}" stroke-width="2.5"{dash}/>'
        )
        parts.append(f'<text x="{x + 26:.1f}" y="{row + 4:.1f}">{escape(label)}</text>')
    return [*parts, "</g>"]


def line_chart(
    lines: Sequence[Line],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_log2: bool = False,
    x_ticks: Sequence[float] | None = None,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    x_fmt: Callable[[float], str] = _fmt_tick,
    y_fmt: Callable[[float], str] = _fmt_tick,
    markers: bool = True,
    reference_y: tuple[float, str] | None = None,
    diagonal: tuple[str, float] | None = None,
) -> str:
    """A line chart with a legend on the right; `reference_y` draws a labelled dashed level,
    `diagonal` (label, band) the labelled dashed line y = x (where x and y measure the same
    thing) and, for a band > 0, dotted lines y = (1 ± band) x around it.

    x_log2 spaces x by powers of two (batch sizes); x_ticks then defaults to the data's xs.
    """
    drawn = [ln for ln in lines if len(ln.xs)]
    xs = [x for ln in drawn for x in ln.xs]
    ys = [y for ln in drawn for y in ln.ys]
    if reference_y is not None:
        ys.append(reference_y[0])
    x_lo, x_hi = x_range or ((min(xs), max(xs)) if xs else (0.0, 1.0))
    if y_range is not None:
        y_lo, y_hi = y_range
    else:
        y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        pad = (y_hi - y_lo) * 0.08 or abs(y_hi) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    if x_log2:
        x_lo, x_hi = max(x_lo, 1e-9), max(x_hi, 1e-9)
        if x_hi <= x_lo:
            x_lo, x_hi = x_lo / 2, x_hi * 2  # a single batch size sits mid-chart
        ticks_x = list(x_ticks) if x_ticks is not None else sorted(set(xs))
    else:
        if x_hi <= x_lo:
            x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
        ticks_x = list(x_ticks) if x_ticks is not None else nice_ticks(x_lo, x_hi)
        x_lo, x_hi = min(x_lo, *ticks_x), max(x_hi, *ticks_x)
    ticks_y = nice_ticks(y_lo, y_hi)
    if y_range is None:
        y_lo, y_hi = min(y_lo, ticks_y[0]), max(y_hi, ticks_y[-1])
    ticks_y = [t for t in ticks_y if y_lo - 1e-9 <= t <= y_hi + 1e-9]

    entries = [(ln.label, ln.color, ln.dashed) for ln in drawn]
    if diagonal is not None:
        # in the legend rather than on the line, where the points crowd
        label, band = diagonal
        entries.append((label, BASELINE_COLOR, True))
        if band > 0:
            entries.append((f"± {100 * band:g}%", BASELINE_COLOR, True))
    legend_w = 26 + _CHAR_W * max([len(label) for label, _, _ in entries] or [4]) + 12
    height = max(300.0, 96 + 18 * len(entries))
    frame = _Frame(
        left=64,
        top=36,
        width=WIDTH - 64 - legend_w - 16,
        height=height - 36 - 52,
        x_lo=x_lo,
        x_hi=x_hi,
        y_lo=y_lo,
        y_hi=y_hi,
        x_log2=x_log2,
    )
    parts = _svg_open(WIDTH, height, title, "line")
    parts += _axes(frame, ticks_x, ticks_y, x_label, y_label, x_fmt, y_fmt)
    if reference_y is not None:
        value, label = reference_y
        y = frame.y(value)
        parts.append(
            f'<line class="reference" x1="{frame.left:.1f}" x2="{frame.left + frame.width:.1f}" '
            f'y1="{y:.1f}" y2="{y:.1f}" stroke="{BASELINE_COLOR}" stroke-dasharray="6 4"/>'
        )
        # at the left edge, under the line: series mostly start above the baseline there
        parts.append(
            f'<text x="{frame.left + 5:.1f}" y="{y + 15:.1f}" fill="{BASELINE_COLOR}">'
            f"{escape(label)}</text>"
        )
    if diagonal is not None:
        parts += _diagonal(frame, diagonal[1])
    for ln in drawn:
        points = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in zip(ln.xs, ln.ys))
        dash = ' stroke-dasharray="6 4"' if ln.dashed else ""
        parts.append(f'<g class="series" data-label="{escape(ln.label)}">')
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{ln.color}" stroke-width="2.2" '
            f'stroke-linejoin="round"{dash}/>'
        )
        if markers:
            for x, y in zip(ln.xs, ln.ys):
                tip = f"{ln.label}: {x_label} {x_fmt(x)}, {y_label} {y_fmt(y)}"
                parts.append(
                    f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3.6" '
                    f'fill="{ln.color}"><title>{escape(tip)}</title></circle>'
                )
        for x, y, text in zip(ln.xs, ln.ys, ln.point_labels):
            parts.append(
                f'<text class="point-label" x="{frame.x(x) + 5:.1f}" y="{frame.y(y) - 5:.1f}" '
                f'fill="{ln.color}">{escape(text)}</text>'
            )
        parts.append("</g>")
    parts += _legend(entries, frame.left + frame.width + 16, frame.top + 8)
    return "\n".join([*parts, "</svg>"])


def _diagonal(frame: _Frame, band: float) -> list[str]:
    """y = x (dashed) and y = (1 ± band) x (dotted) inside the plot area."""
    if frame.x_log2:
        return []
    parts = []
    for factor in (1.0, 1.0 + band, 1.0 - band) if band > 0 else (1.0,):
        if factor <= 0:
            continue
        # the stretch of y = factor * x that lies inside both axes' ranges
        lo = max(frame.x_lo, frame.y_lo / factor)
        hi = min(frame.x_hi, frame.y_hi / factor)
        if hi <= lo:
            continue
        x0, y0, x1, y1 = frame.x(lo), frame.y(factor * lo), frame.x(hi), frame.y(factor * hi)
        dash = "6 4" if factor == 1.0 else "2 3"
        parts.append(
            f'<line class="reference" x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" '
            f'stroke="{BASELINE_COLOR}" stroke-dasharray="{dash}"/>'
        )
    return parts


@dataclass(frozen=True)
class Segment:
    """One stacked part of every bar (e.g. the prefill share of latency)."""

    label: str
    color: str


def stacked_bars(
    labels: Sequence[str],
    label_colors: Sequence[str],
    segments: Sequence[Segment],
    values: Sequence[Sequence[float]],
    *,
    title: str,
    x_label: str,
    value_fmt: Callable[[float], str] = _fmt_tick,
) -> str:
    """Horizontal bars, one per label, stacked from `segments`; values[i][j] is bar i, part j.

    Negative parts (timer noise) are drawn as zero; the total is written at each bar's end.
    """
    totals = [sum(max(0.0, v) for v in row) for row in values]
    ticks = nice_ticks(0.0, max(totals, default=0.0) or 1.0)
    label_w = 34 + _CHAR_W * max([len(s) for s in labels] or [4])
    bar, gap = 22, 10
    legend_h = 26
    top = 36 + legend_h
    height = top + len(labels) * (bar + gap) + 52
    frame = _Frame(
        left=label_w,
        top=top,
        width=WIDTH - label_w - 70,
        height=len(labels) * (bar + gap) or 1,
        x_lo=0.0,
        x_hi=ticks[-1],
        y_lo=0.0,
        y_hi=1.0,
    )
    parts = _svg_open(WIDTH, height, title, "bars")
    parts += _axes(frame, ticks, [], x_label, "", value_fmt, value_fmt)
    # segment legend in one row under the title
    x = frame.left
    parts.append('<g class="legend">')
    for seg in segments:
        parts.append(f'<rect x="{x:.1f}" y="{36:.1f}" width="12" height="12" fill="{seg.color}"/>')
        parts.append(f'<text x="{x + 16:.1f}" y="{46:.1f}">{escape(seg.label)}</text>')
        x += 16 + _CHAR_W * len(seg.label) + 18
    parts.append("</g>")
    for i, (label, color, row, total) in enumerate(zip(labels, label_colors, values, totals)):
        y = frame.top + i * (bar + gap) + gap / 2
        parts.append(f'<g class="bar" data-label="{escape(label)}">')
        parts.append(
            f'<rect x="{8:.1f}" y="{y + bar / 2 - 5:.1f}" width="10" height="10" '
            f'fill="{color}" rx="2"/>'
        )
        parts.append(f'<text x="{24:.1f}" y="{y + bar / 2 + 4:.1f}">{escape(label)}</text>')
        start = 0.0
        for seg, value in zip(segments, row):
            width_v = max(0.0, value)
            x0, x1 = frame.x(start), frame.x(start + width_v)
            tip = f"{label} · {seg.label}: {value_fmt(value)}"
            parts.append(
                f'<rect x="{x0:.2f}" y="{y:.1f}" width="{max(0.0, x1 - x0):.2f}" '
                f'height="{bar}" fill="{seg.color}"><title>{escape(tip)}</title></rect>'
            )
            start += width_v
        parts.append(
            f'<text x="{frame.x(total) + 5:.1f}" y="{y + bar / 2 + 4:.1f}">'
            f"{escape(value_fmt(total))}</text>"
        )
        parts.append("</g>")
    return "\n".join([*parts, "</svg>"])
