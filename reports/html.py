"""report.html: the report as one self-contained page (inline CSS, inline SVG charts).

Nothing on the page points outside it (no scripts, fonts, images or style sheets to fetch), so
it can be mailed, archived as a CI artefact or opened offline. The verdict comes first twice:
as the file's first line (an HTML comment, for `head -1` and CI logs) and as the banner at the
top of the page.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html import escape
from typing import Any

import polars as pl

from mmspec.reports.acceptance import hist_column, positions, rate_column
from mmspec.reports.answer_import import import_note
from mmspec.reports.families import group_speedups, grouped_methods
from mmspec.reports.formatting import seconds
from mmspec.reports.markdown import (
    DEFINITIONS,
    ERROR_LIMIT,
    FAMILY_NOTE,
    SERVING_DEFINITIONS,
    SERVING_NOTE,
    TAXONOMY_NOTE,
    THROUGHPUT_NOTE,
    all_methods,
    block_rows,
    blocks,
    disagreement_note,
    families,
    headline,
    merged_cells,
    model_blocks,
    run_summary,
    serving_blocks,
    slo_sentence,
)
from mmspec.reports.metrics import ALL_TOPIC, RunDetails
from mmspec.reports.paired import BASELINE
from mmspec.reports.plots import (
    PALETTE,
    Line,
    Segment,
    line_chart,
    method_colors,
    stacked_bars,
)
from mmspec.reports.serving import ServingReport, serving_summary
from mmspec.reports.tables import (
    SERVING_LATENCY_COLUMNS,
    SERVING_THROUGHPUT_COLUMNS,
    Cell,
    CellKind,
    Column,
    Table,
    best_setting_table,
    breakdown_table,
    detail_table,
    disagreement_table,
    environment_table,
    errors_table,
    histogram_table,
    import_table,
    metadata_table,
    mmspec_table,
    packages_table,
    position_table,
    run_fields,
    serving_errors_table,
    serving_table,
    speedup_by_batch_table,
    taxonomy_table,
    throughput_table,
    topic_table,
    variants_table,
    viskip_table,
)
from mmspec.reports.throughput import DISAGREEMENT, disagreements
from mmspec.reports.variants import NOTE as VARIANTS_NOTE
from mmspec.reports.variants import Sweep, VariantGroup, sweeps, variant_groups
from mmspec.reports.viskip import NOTE as VISKIP_NOTE
from mmspec.reports.viskip import grouped, viskip_rows
from mmspec.results.taxonomy import Family

PHASES = [
    # (column of the merged cell frame, legend label, colour)
    ("prefill_s_mean", "prefill", "#8da0cb"),
    ("draft_s_mean", "draft", "#fc8d62"),
    ("verify_s_mean", "verify", "#66c2a5"),
    ("commit_s_mean", "commit", "#e78ac3"),
    ("other_s_mean", "other", "#c8c8c8"),
]

CSS = """
:root { --fail: #b3261e; --pass: #1e6f34; --warn: #8a5a00; --ink: #1f2328; --muted: #59636e;
  --line: #d8dee4; --head: #f2f4f7; }
* { box-sizing: border-box; }
body { margin: 0; background: #f8f9fb; color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", sans-serif; }
.verdict { margin: 0; padding: 14px 28px; color: #fff; font-size: 16px; }
.verdict.fail { background: var(--fail); }
.verdict.pass { background: var(--pass); }
.verdict.warn { background: var(--warn); }
main { max-width: 1240px; margin: 0 auto; padding: 8px 28px 56px; }
h1 { font-size: 24px; margin: 18px 0 2px; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-top: 8px; border-top: 2px solid var(--line); }
h3 { font-size: 16px; margin: 26px 0 8px; }
.sub, .note, figcaption { color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px;
  min-width: 118px; }
.card b { display: block; font-size: 20px; }
.card.bad b { color: var(--fail); }
nav ul { columns: 2; margin: 6px 0; padding-left: 20px; }
a { color: #0b5cad; }
.scroll { overflow-x: auto; max-width: 100%; margin: 4px 0 12px; }
p.note { margin: 10px 0 2px; }
table { border-collapse: collapse; background: #fff; border: 1px solid var(--line);
  font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 8px; border-bottom: 1px solid #edf0f2; text-align: right;
  white-space: nowrap; vertical-align: middle; }
th { background: var(--head); font-weight: 600; white-space: normal; min-width: 4.5em;
  vertical-align: bottom; }
th.text, td.text { text-align: left; }
td.wrap { white-space: normal; max-width: 560px; overflow-wrap: anywhere; }
tr:hover td { background: #f6f9ff; }
td.topic span { display: block; line-height: 1.25; }
td.topic .mat { font-size: 15px; font-weight: 600; }
td.topic .sp { font-size: 12px; }
td.best .sp { font-weight: 700; }
td.best { font-weight: 700; }
th.pooled, td.pooled { border-left: 2px solid var(--line); }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
  margin-right: 7px; }
.fail-text { color: var(--fail); font-weight: 700; }
.ok-text { color: var(--pass); }
.na { color: var(--muted); font-style: italic; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr));
  gap: 14px; margin: 8px 0 12px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 6px 8px 8px; }
figure.wide { max-width: 820px; }
figcaption { font-size: 12px; padding: 2px 4px 0; }
svg.plot { display: block; width: 100%; height: auto; }
svg.plot text { font: 12px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  fill: #333; }
svg.plot .plot-title { font-size: 13px; font-weight: 600; }
svg.plot .axis-label { fill: #555; }
svg.plot .point-label { font-size: 9px; }
dl.legend dt { font-weight: 600; margin-top: 8px; }
dl.legend dd { margin: 0 0 0 18px; color: #333; max-width: 900px; }
pre { background: #fff; border: 1px solid var(--line); padding: 10px; overflow-x: auto; }
"""


# ---------------------------------------------------------------- small pieces


def _inline(text: str) -> str:
    """Escape text; `code` and **bold** from the shared markdown strings become tags."""
    out = escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _method_html(cell: Cell, colors: dict[str, str]) -> str:
    color = colors.get(cell.text, "#999")
    return f'<span class="swatch" style="background:{color}"></span>{escape(cell.text)}'


def _lossless_html(cell: Cell, colors: dict[str, str]) -> str:
    if cell.value is None:
        return cell.text
    if cell.value < 1.0:
        return f'<span class="fail-text">{cell.text} ✗</span>'
    return f'<span class="ok-text">{cell.text} ✓</span>'


def _errors_html(cell: Cell, colors: dict[str, str]) -> str:
    # Error rows are left out of every other number: a non-zero count must catch the eye.
    return f'<span class="fail-text">{cell.text}</span>' if cell.value else "0"


# How a cell's text is dressed inside its <td>, by kind; a kind not listed ("plain"): the
# text, escaped.
_CONTENT: dict[CellKind, Callable[[Cell, dict[str, str]], str]] = {
    "method": _method_html,
    "count": lambda cell, _: f"{cell.value:,}",
    "errors": _errors_html,
    "lossless": _lossless_html,
    "missing": lambda cell, _: f'<span class="na">{escape(cell.text)}</span>',
    "message": lambda cell, _: escape(cell.value or "(no message)"),
    "code": lambda cell, _: f"<code>{escape(cell.text)}</code>",
}
_WRAPPED = {"message", "code"}  # long free text may wrap; a number never does


def _class_attr(flags: dict[str, bool]) -> str:
    """` class="a b"` of the names whose flag is set, in order; "" when none is."""
    names = " ".join(name for name, on in flags.items() if on)
    return f' class="{names}"' if names else ""


def _topic_td(cell: Cell, column: Column) -> str:
    """MAT over speedup, shaded by the speedup; bold where it is the column's best."""
    classes = _class_attr({"topic": True, "pooled": column.pooled, "best": cell.best})
    if not cell.parts:
        return f"<td{classes}>{cell.text}</td>"
    mat, speedup = cell.parts
    return (
        f'<td{classes} style="{_speedup_shade(cell.value)}" '
        f'title="{escape(cell.note)}"><span class="mat">{mat}</span>'
        f'<span class="sp">{speedup}</span></td>'
    )


def _td(cell: Cell, column: Column, colors: dict[str, str]) -> str:
    if cell.kind == "topic":
        return _topic_td(cell, column)
    content = _CONTENT.get(cell.kind)
    html = escape(cell.text) if content is None else content(cell, colors)
    flags = {"text": column.text, "wrap": cell.kind in _WRAPPED, "best": cell.best}
    title = f' title="{escape(cell.note)}"' if cell.note else ""
    return f"<td{_class_attr(flags)}{title}>{html}</td>"


def _th(column: Column) -> str:
    classes = _class_attr({"pooled": column.pooled, "text": column.text})
    return f"<th{classes}>{escape(column.html_label or column.label)}</th>"


def _table(table: Table, caption: str = "", colors: dict[str, str] | None = None) -> str:
    """A report table; `caption` (HTML) goes above it, `colors` are the methods' swatches."""
    colors = colors or {}
    head = "".join(_th(column) for column in table.columns)
    body = "".join(
        "<tr>"
        + "".join(_td(cell, column, colors) for cell, column in zip(row, table.columns))
        + "</tr>"
        for row in table.rows
    )
    # A note above rather than a <caption>: a caption wraps to the table's width.
    note = f'<p class="note">{caption}</p>' if caption else ""
    return (
        f'{note}<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _speedup_shade(speedup: float | None) -> str:
    # Green the faster, red the slower than ar; the strength saturates at 2.5x / 0.5x.
    if speedup is None:
        return ""
    if speedup >= 1:
        alpha = min(1.0, (speedup - 1) / 1.5) * 0.38
        return f"background:rgba(46,160,67,{alpha:.3f})"
    alpha = min(1.0, (1 - speedup) / 0.5) * 0.32
    return f"background:rgba(207,34,46,{alpha:.3f})"


def _verdict_class(metrics: pl.DataFrame, serving: pl.DataFrame | None = None) -> str:
    """fail: a lossless check failed; pass: checks ran, all passed, no error rows; else warn.
    Serving cells count as static ones do."""
    pooled = metrics.filter(pl.col("topic") == ALL_TOPIC)
    cells = [pooled, *([serving] if serving is not None else [])]
    columns = ["method", "temperature", "lossless", "errors"]
    every = pl.concat([c.select(columns) for c in cells], how="vertical_relaxed")
    greedy = every.filter((pl.col("method") != BASELINE) & (pl.col("temperature") == 0))
    checked = greedy.filter(pl.col("lossless").is_not_null())
    if checked.filter(pl.col("lossless") < 1.0).height:
        return "fail"
    if checked.height and int(every["errors"].sum()) == 0:
        return "pass"
    return "warn"


# ---------------------------------------------------------------- sections


def _cards(metrics: pl.DataFrame, details: RunDetails) -> str:
    pooled = metrics.filter(pl.col("topic") == ALL_TOPIC)
    errors = int(pooled["errors"].sum()) if pooled.height else 0
    greedy = pooled.filter((pl.col("method") != BASELINE) & (pl.col("temperature") == 0))
    failed = greedy.filter(pl.col("lossless") < 1.0).height

    def uniq(col: str) -> int:
        return pooled[col].n_unique() if pooled.height else 0

    cards = [
        ("Rows", f"{details.rows:,}", False),
        ("Error rows", f"{errors:,}", errors > 0),
        ("Lossless failures", str(failed), failed > 0),
        ("Models", str(uniq("model")), False),
        ("Methods", str(uniq("method")), False),
        ("Batch sizes", str(uniq("batch_size")), False),
        ("Temperatures", str(uniq("temperature")), False),
    ]
    items = "".join(
        f'<div class="card{" bad" if bad else ""}"><b>{escape(v)}</b>{escape(k)}</div>'
        for k, v, bad in cards
    )
    return f'<div class="cards">{items}</div>'


def _errors(details: RunDetails, limit: int = ERROR_LIMIT) -> str:
    if details.errors.height == 0:
        return ""
    more = details.errors.height - limit
    note = (
        f'<p class="note">… and {more} more (cell, message) pairs; every cell\'s error count '
        "is in its table below.</p>"
        if more > 0
        else ""
    )
    caption = "Error rows by cell and message, most frequent first."
    table = _table(errors_table(details.errors.head(limit)), caption)
    return f'<section id="errors"><h2>Errors</h2>{table}{note}</section>'


def _by_batch_chart(lines: list[Line], title: str, y_label: str, sizes: list[float]) -> str:
    """A speedup (y) against batch size (x, log2) chart, with ar's 1× marked."""
    return line_chart(
        lines,
        title=title,
        x_label="Batch size",
        y_label=y_label,
        x_log2=True,
        x_ticks=sizes,
        x_fmt=lambda v: f"{v:g}",
        y_fmt=lambda v: f"{v:.2f}×",
        reference_y=(1.0, "ar = 1×"),
    )


def _speedup_plot(
    pooled: pl.DataFrame, methods: list[str], colors: dict[str, str], title: str
) -> str:
    sizes = sorted(set(pooled["batch_size"].to_list()))
    lines = []
    for method in methods:
        if method == BASELINE:
            continue
        part = pooled.filter(
            (pl.col("method") == method) & pl.col("speedup_global").is_not_null()
        ).sort("batch_size")
        if part.height:
            xs = [float(b) for b in part["batch_size"].to_list()]
            lines.append(Line(method, xs, part["speedup_global"].to_list(), colors[method]))
    if not lines:
        return (
            '<p class="note">No speedup to plot: no method shares ok samples with an '
            "<code>ar</code> baseline here.</p>"
        )
    svg = _by_batch_chart(lines, title, "Speedup vs ar (×)", [float(b) for b in sizes])
    return (
        f'<figure class="wide">{svg}<figcaption>Speedup (global) of each method over '
        "<code>ar</code> at the same batch size; all topics pooled.</figcaption></figure>"
    )


def _cdf_plot(latency: pl.DataFrame, methods: list[str], colors: dict[str, str], title: str) -> str:
    curves = {
        m: latency.filter(pl.col("method") == m).sort("quantile")
        for m in methods
        if latency.filter(pl.col("method") == m).height
    }
    if not curves:
        return '<p class="note">No latency to plot: no row finished ok.</p>'
    p99 = max(c.filter(pl.col("quantile") <= 0.99)["latency_s"].max() for c in curves.values())
    slowest = max(c["latency_s"].max() for c in curves.values())
    # A long tail squeezes every curve into the left edge: the axis ends near the slowest
    # method's p99 instead, and the caption says so.
    cut = slowest > 1.3 * p99 > 0
    x_hi = 1.05 * p99 if cut else slowest
    lines = []
    for method, curve in curves.items():
        kept = curve.filter(pl.col("latency_s") <= x_hi)
        lines.append(
            Line(
                method,
                kept["latency_s"].to_list(),
                kept["quantile"].to_list(),
                colors[method],
                dashed=method == BASELINE,
            )
        )
    svg = line_chart(
        lines,
        title=title,
        x_label="Latency per row (s)",
        y_label="Rows finished",
        x_range=(0.0, x_hi),
        y_range=(0.0, 1.0),
        y_fmt=lambda v: f"{100 * v:.0f}%",
        markers=False,
    )
    note = (
        f" The axis ends just past the slowest method's p99 ({seconds(p99)}); the slowest row "
        f"took {seconds(slowest)}."
        if cut
        else ""
    )
    return (
        f"<figure>{svg}<figcaption>Share of rows (y) that finished within a latency (x), "
        f"batch start to row end; further left is faster.{note}</figcaption></figure>"
    )


def _breakdown_plot(
    block: pl.DataFrame, methods: list[str], colors: dict[str, str], title: str
) -> str:
    rows = {r["method"]: r for r in block.iter_rows(named=True)}
    present = [m for m in methods if m in rows and rows[m]["total_s_mean"] is not None]
    if not present:
        return '<p class="note">No latency breakdown: no row finished ok.</p>'
    values = [[rows[m][col] or 0.0 for col, _, _ in PHASES] for m in present]
    svg = stacked_bars(
        present,
        [colors[m] for m in present],
        [Segment(label, color) for _, label, color in PHASES],
        values,
        title=title,
        x_label="Mean latency per row",
        value_fmt=seconds,
    )
    return (
        f"<figure>{svg}<figcaption>Where a row's time goes (means over ok rows); other = "
        "total − prefill − draft − verify − commit.</figcaption></figure>"
    )


# The taxonomy groups' lines: vision-aware solid, vision-agnostic dashed, unknown grey.
_GROUP_STYLE = {"vision-aware": ("#b5179e", False), "vision-agnostic": ("#4361ee", True)}


def _family_plot(
    pooled: pl.DataFrame, methods: list[str], found: dict[str, Family | None], title: str
) -> str:
    """MMSpec's second finding: each taxonomy group's geometric-mean speedup vs batch size."""
    lines = []
    for group, members in grouped_methods(methods, found).items():
        points = group_speedups(pooled, members)
        if not points:
            continue
        color, dashed = _GROUP_STYLE.get(group, ("#999999", True))
        lines.append(
            Line(
                f"{group} ({len(members)})",
                [float(p.batch_size) for p in points],
                [p.speedup for p in points],
                color,
                dashed=dashed,
            )
        )
    if not lines:
        return ""
    svg = _by_batch_chart(
        lines,
        title,
        "Speedup vs ar (geometric mean, ×)",
        sorted({float(b) for b in pooled["batch_size"].to_list()}),
    )
    return (
        f"<figure>{svg}<figcaption>{escape(FAMILY_NOTE)} Geometric mean of the speedups "
        "(global) of each group's methods (how many in brackets).</figcaption></figure>"
    )


def _throughput_plot(
    pooled: pl.DataFrame, methods: list[str], colors: dict[str, str], title: str
) -> str:
    """Throughput speedup (y) against latency speedup (x), one line per method through its
    batch sizes; on the diagonal the two agree."""
    lines = []
    for method in methods:
        part = pooled.filter(
            (pl.col("method") == method)
            & pl.col("throughput_speedup").is_not_null()
            & pl.col("latency_speedup").is_not_null()
        ).sort("batch_size")
        if method == BASELINE or part.height == 0:
            continue
        lines.append(
            Line(
                method,
                part["latency_speedup"].to_list(),
                part["throughput_speedup"].to_list(),
                colors[method],
                point_labels=[f"b{b}" for b in part["batch_size"].to_list()],
            )
        )
    if not lines:
        return ""
    values = [v for ln in lines for v in (*ln.xs, *ln.ys)]
    lo, hi = min(*values, 1.0), max(*values, 1.0)
    pad = 0.06 * (hi - lo) or 0.1
    span = (max(0.0, lo - pad), hi + pad)
    svg = line_chart(
        lines,
        title=title,
        x_label="Latency speedup vs ar (per request, ×)",
        y_label="Throughput speedup vs ar (×)",
        x_range=span,
        y_range=span,
        x_fmt=lambda v: f"{v:.2f}×",
        y_fmt=lambda v: f"{v:.2f}×",
        diagonal=("throughput = latency", DISAGREEMENT),
    )
    return (
        f'<figure class="wide">{svg}<figcaption>Each point a cell (b = batch size): above the '
        "diagonal the system gains more throughput than a request gains latency, below it "
        f"less; outside the dotted lines the two differ by more than {100 * DISAGREEMENT:.0f}%."
        "</figcaption></figure>"
    )


def _acceptance_plots(
    cells: pl.DataFrame, methods: list[str], colors: dict[str, str], label: str
) -> str:
    """Acceptance rate per draft position and the acceptance-length histogram, per method."""
    longest = positions(cells.columns)
    rows = {r["method"]: r for r in cells.iter_rows(named=True) if r.get("drafting_steps")}
    present = [m for m in methods if m in rows]
    if longest == 0 or not present:
        return ""
    ks = list(range(1, longest + 1))
    js = list(range(longest + 1))

    def line(method: str, xs: list[int], column: Callable[[int], str]) -> Line:
        ys = [rows[method].get(column(x)) or 0.0 for x in xs]
        return Line(method, [float(x) for x in xs], ys, colors[method])

    ticks = None if longest > 16 else [float(k) for k in js]
    common = {"y_range": (0.0, 1.0), "y_fmt": lambda v: f"{100 * v:.0f}%", "x_fmt": _int_tick}
    rates = line_chart(
        [line(m, ks, rate_column) for m in present],
        title=f"Acceptance per draft position · {label}",
        x_label="Draft position k",
        y_label="Steps accepting ≥ k drafts",
        x_ticks=None if ticks is None else ticks[1:],
        **common,
    )
    hist = line_chart(
        [line(m, js, hist_column) for m in present],
        title=f"Acceptance-length histogram · {label}",
        x_label="Drafts accepted in a step (j)",
        y_label="Share of drafting steps",
        x_ticks=ticks,
        **common,
    )
    return (
        f"<figure>{rates}<figcaption>vLLM's acceptance rate per position: the share of "
        "drafting steps that accepted at least k drafts.</figcaption></figure>"
        f"<figure>{hist}<figcaption>The share of drafting steps that accepted exactly j "
        "drafts.</figcaption></figure>"
    )


def _int_tick(value: float) -> str:
    return f"{value:g}"


def _topic_table(block: pl.DataFrame, methods: list[str], colors: dict[str, str]) -> str:
    caption = (
        "Each cell: MAT (accepted drafts per step, bonus excluded) over speedup (global) vs "
        "<code>ar</code>; greener is faster, bold is the fastest method of the column."
    )
    return _table(topic_table(block, methods), caption, colors)


def _model_section(
    index: int,
    model: str,
    temperature: float,
    merged: pl.DataFrame,
    metrics: pl.DataFrame,
    details: RunDetails,
    methods: list[str],
    colors: dict[str, str],
    found: dict[str, Family | None],
) -> tuple[str, list[tuple[str, str]]]:
    """One model at one temperature: speedup vs batch size (per method, per taxonomy group),
    throughput against latency, then one block per batch size."""
    anchor = f"m{index}"
    where = f"{model} · T={temperature:g}"
    pooled = merged.filter((pl.col("model") == model) & (pl.col("temperature") == temperature))
    parts = [f'<section id="{anchor}"><h2>{escape(where)}</h2>']
    parts.append('<div class="charts">')
    parts.append(_speedup_plot(pooled, methods, colors, f"Speedup vs batch size · {where}"))
    parts.append(_family_plot(pooled, methods, found, f"Vision-aware vs vision-agnostic · {where}"))
    parts.append("</div>")
    table = speedup_by_batch_table(pooled, methods, found)
    parts.append(_table(table, "Speedup (global) per batch size, by MMSpec's taxonomy.", colors))
    toc = [(anchor, where)]
    sub = f"{anchor}-tl"
    toc.append((sub, "throughput vs latency"))
    parts.append(f'<h3 id="{sub}">{escape(f"Throughput vs latency · {where}")}</h3>')
    parts.append(f'<p class="note">{_inline(THROUGHPUT_NOTE)}</p>')
    parts.append(
        _throughput_plot(pooled, methods, colors, f"Throughput vs latency speedup · {where}")
    )
    parts.append(_table(throughput_table(pooled, methods), colors=colors))
    gaps = disagreements(pooled)
    note = _inline(disagreement_note(gaps, pooled))
    parts.append(_table(disagreement_table(gaps), note, colors) if gaps.height else note)
    sizes = sorted(b for m, t, b in blocks(metrics) if m == model and t == temperature)
    for batch_size in sizes:
        block = block_rows(metrics, model, temperature, batch_size)
        present = [m for m in methods if m in set(block["method"].to_list())]
        cells = block_rows(merged, model, temperature, batch_size)
        latency = block_rows(details.latency, model, temperature, batch_size)
        sub = f"{anchor}-b{batch_size}"
        label = f"{where} · batch size {batch_size}"
        toc.append((sub, f"batch size {batch_size}"))
        parts.append(f'<h3 id="{sub}">{escape(label)}</h3>')
        parts.append(_topic_table(block, present, colors))
        parts.append('<div class="charts">')
        parts.append(_cdf_plot(latency, present, colors, f"Latency CDF · {label}"))
        parts.append(_breakdown_plot(cells, present, colors, f"Latency breakdown · {label}"))
        parts.append("</div>")
        table = detail_table(cells, present, "html")
        parts.append(_table(table, "Per method, all topics pooled.", colors))
        table = breakdown_table(cells, present, "html")
        parts.append(_table(table, "Latency breakdown: mean seconds per row.", colors))
        caption = "By MMSpec's definitions (<code>evaluation/summarize_metrics.py</code>)."
        parts.append(_table(mmspec_table(cells, present), caption, colors))
        positions_, histogram = position_table(cells, present), histogram_table(cells, present)
        if positions_ is not None and histogram is not None:
            parts.append('<div class="charts">')
            parts.append(_acceptance_plots(cells, present, colors, label))
            parts.append("</div>")
            caption = "Acceptance per draft position (vLLM's definition)."
            parts.append(_table(positions_, caption, colors))
            caption = "Acceptance-length histogram: share of drafting steps per accepted length."
            parts.append(_table(histogram, caption, colors))
    parts.append("</section>")
    return "\n".join(parts), toc


def _viskip(merged: pl.DataFrame, colors: dict[str, str]) -> str:
    """The ViSkip section (empty for a run without `viskip+X` cells next to X)."""
    rows = viskip_rows(merged)
    if not rows:
        return ""
    parts = ['<section id="viskip"><h2>ViSkip</h2>']
    for (model, temperature), part in grouped(rows).items():
        caption = f"{escape(model)} · T={temperature:g}. {_inline(VISKIP_NOTE)}"
        parts.append(_table(viskip_table(part), caption, colors))
    parts.append("</section>")
    return "\n".join(parts)


def _sweep_plot(sweep: Sweep) -> str:
    """Speedup (y) over one swept argument (x), a line per batch size (and per setting of the
    group's other varying arguments)."""
    group = sweep.group
    lines = [
        Line(ln.label, ln.xs, ln.ys, PALETTE[i % len(PALETTE)]) for i, ln in enumerate(sweep.lines)
    ]
    ticks = sorted({x for ln in lines for x in ln.xs})
    svg = line_chart(
        lines,
        title=f"{group.model} · T={group.temperature:g} · {group.method}: speedup over {sweep.arg}",
        x_label=sweep.arg,
        y_label="Speedup vs ar (×)",
        x_ticks=ticks if len(ticks) <= 12 else None,
        x_fmt=lambda v: f"{v:g}",
        y_fmt=lambda v: f"{v:.2f}×",
        reference_y=(1.0, "ar = 1×"),
    )
    return (
        f"<figure>{svg}<figcaption>Speedup (global) of {escape(group.method)} over "
        f"<code>ar</code> against its argument <code>{escape(sweep.arg)}</code>, one line per "
        "batch size; all topics pooled.</figcaption></figure>"
    )


def _variant_group(group: VariantGroup, colors: dict[str, str]) -> str:
    where = f"{escape(group.model)} · T={group.temperature:g} · {escape(group.method)}"
    parts = [f"<h3>{where}</h3>"]
    caption = "Speedup (global) of each setting per batch size; the best in bold."
    parts.append(_table(variants_table(group), caption, colors))
    parts.append(_table(best_setting_table(group), "Best setting per batch size.", colors))
    charts = [_sweep_plot(sweep) for sweep in sweeps(group)]
    if charts:
        parts.append(f'<div class="charts">{"".join(charts)}</div>')
    return "\n".join(parts)


def _variants(metrics: pl.DataFrame, methods: list[str], colors: dict[str, str]) -> str:
    """The Method variants section (empty for a run without a method under several names)."""
    groups = [g for _, _, part in model_blocks(metrics) for g in variant_groups(part, methods)]
    if not groups:
        return ""
    body = "\n".join(_variant_group(g, colors) for g in groups)
    return (
        f'<section id="variants"><h2>Method variants</h2><p class="note">'
        f"{_inline(VARIANTS_NOTE)}</p>{body}</section>"
    )


def _taxonomy(methods: list[str], found: dict[str, Family | None], colors: dict[str, str]) -> str:
    """The Methods section: MMSpec's taxonomy of each method (empty for a run of `ar` alone)."""
    if not any(m != BASELINE for m in methods):
        return ""
    table = _table(taxonomy_table(methods, found), _inline(TAXONOMY_NOTE), colors)
    return f'<section id="methods"><h2>Methods</h2>{table}</section>'


def _baseline_line(method: str, xs: list[float], ys: list[float], colors: dict[str, str]) -> Line:
    # `ar` is the reference every method is read against: dark grey, dashed, named so.
    if method == BASELINE:
        return Line(f"{BASELINE} (baseline)", xs, ys, colors[method], dashed=True)
    return Line(method, xs, ys, colors[method])


def _serving_lines(
    cells: pl.DataFrame, methods: list[str], colors: dict[str, str], x: str, y: str
) -> list[Line]:
    """A line per method of `cells` through its (x, y) points, x ascending."""
    lines = []
    for method in methods:
        part = cells.filter((pl.col("method") == method) & pl.col(y).is_not_null()).sort(x)
        if part.height:
            xs = [float(v) for v in part[x].to_list()]
            lines.append(_baseline_line(method, xs, part[y].to_list(), colors))
    return lines


def _serving_throughput_plot(
    cells: pl.DataFrame, methods: list[str], colors: dict[str, str], where: str
) -> str:
    """System throughput (y) against concurrency (x, log2) of the continuous cells."""
    continuous = cells.filter(pl.col("scenario") == "continuous")
    lines = _serving_lines(continuous, methods, colors, "batch_size", "system_tokens_per_s")
    if not lines:
        return ""
    svg = line_chart(
        lines,
        title=f"System throughput vs concurrency · {where}",
        x_label="Concurrency",
        y_label="System tokens/s",
        x_log2=True,
        x_ticks=sorted({float(b) for b in continuous["batch_size"].to_list()}),
        x_fmt=lambda v: f"{v:g}",
    )
    return (
        f"<figure>{svg}<figcaption>Continuous batching: the ok requests' tokens per second of "
        "stream wall time at each concurrency cap; <code>ar</code> dashed.</figcaption></figure>"
    )


# The latencies drawn against the arrival rate: (column, what it is)
_RATE_LATENCIES = (("ttft_p50_s", "TTFT p50"), ("e2e_p50_s", "E2E p50"), ("e2e_p99_s", "E2E p99"))


def _serving_latency_plots(
    cells: pl.DataFrame, methods: list[str], colors: dict[str, str], where: str
) -> str:
    """TTFT p50, E2E p50 and E2E p99 (y) against the arrival rate (x) of the poisson cells."""
    poisson = cells.filter((pl.col("scenario") == "poisson") & pl.col("rate").is_not_null())
    rates = sorted(set(poisson["rate"].to_list()))
    figures = []
    for column, name in _RATE_LATENCIES:
        lines = _serving_lines(poisson, methods, colors, "rate", column)
        if not lines:
            continue
        svg = line_chart(
            lines,
            title=f"{name} vs arrival rate · {where}",
            x_label="Arrival rate (requests/s)",
            y_label=f"{name} (s)",
            x_ticks=rates if len(rates) <= 12 else None,
            x_fmt=lambda v: f"{v:g}",
        )
        figures.append(
            f"<figure>{svg}<figcaption>Poisson arrivals: {name} of the ok requests at each "
            "arrival rate (the same arrival times for every method); <code>ar</code> dashed."
            "</figcaption></figure>"
        )
    return "".join(figures)


def _serving(
    serving: ServingReport | None,
    methods: list[str],
    colors: dict[str, str],
    limit: int = ERROR_LIMIT,
) -> tuple[str, list[tuple[str, str]]]:
    """The Serving section and its contents entries (empty for a run without serving cells)."""
    if serving is None:
        return "", []
    parts = [
        '<section id="serving"><h2>Serving</h2>',
        f'<p class="note">{_inline(SERVING_NOTE)}</p>',
        f'<p class="note">{_inline(slo_sentence(serving.slo))}</p>',
        f'<p class="sub">{escape(serving_summary(serving.cells))}</p>',
    ]
    if serving.errors.height:
        more = serving.errors.height - limit
        caption = "Error rows by serving cell and message, most frequent first."
        if more > 0:
            caption += f" … and {more} more (cell, message) pairs."
        parts.append(_table(serving_errors_table(serving.errors.head(limit)), caption))
    toc = [("serving", "Serving")]
    for index, (model, temperature, cells) in enumerate(serving_blocks(serving.cells)):
        where = f"{model} · T={temperature:g}"
        anchor = f"serving{index}"
        toc.append((anchor, where))
        parts.append(f'<h3 id="{anchor}">{escape(where)}</h3>')
        charts = _serving_throughput_plot(cells, methods, colors, where)
        charts += _serving_latency_plots(cells, methods, colors, where)
        if charts:
            parts.append(f'<div class="charts">{charts}</div>')
        table = serving_table(cells, methods, SERVING_THROUGHPUT_COLUMNS)
        parts.append(_table(table, "Throughput and goodput per serving cell.", colors))
        table = serving_table(cells, methods, SERVING_LATENCY_COLUMNS)
        parts.append(_table(table, "Latency percentiles, seconds, over ok requests.", colors))
    items = "".join(
        f"<dt>{escape(term)}</dt><dd>{_inline(text)}</dd>" for term, text in SERVING_DEFINITIONS
    )
    parts.append(f'<dl class="legend">{items}</dl></section>')
    return "\n".join(parts), toc


def _legend() -> str:
    items = "".join(
        f"<dt>{escape(term)}</dt><dd>{_inline(text)}</dd>" for term, text in DEFINITIONS
    )
    return f'<section id="legend"><h2>Legend</h2><dl class="legend">{items}</dl></section>'


def _metadata(manifest: dict[str, Any]) -> str:
    parts = [
        '<section id="metadata"><h2>Run metadata</h2>',
        _table(metadata_table(run_fields(manifest, "html"))),
    ]
    packages = packages_table(manifest)
    if packages is not None:
        parts.append(_table(packages))
    environment = environment_table(manifest)
    if environment is not None:
        parts.append(_table(environment, "Environment: the machine the run ran on."))
    if manifest.get("grid_text"):
        parts.append(
            f"<details><summary>Grid file as written</summary>"
            f"<pre>{escape(manifest['grid_text'])}</pre></details>"
        )
    return "\n".join([*parts, "</section>"])


def _imported(manifest: dict[str, Any], colors: dict[str, str]) -> str:
    """The Imported section: where an imported run's numbers come from (empty for ours)."""
    note, table = import_note(manifest), import_table(manifest)
    if note is None or table is None:
        return ""
    return (
        f'<section id="imported"><h2>Imported run</h2><p class="note">{_inline(note)}</p>'
        f"{_table(table, colors=colors)}</section>"
    )


def _comment(text: str) -> str:
    # "--" may not appear inside an HTML comment.
    return "<!-- " + text.replace("--", "- -") + " -->"


def render_html(
    metrics: pl.DataFrame,
    manifest: dict[str, Any],
    details: RunDetails,
    serving: ServingReport | None = None,
) -> str:
    """The whole page; inputs as for markdown.render_markdown (details required here)."""
    cells = None if serving is None else serving.cells
    verdict = headline(metrics, cells)
    plain = verdict.replace("**", "")
    run_id = str(manifest.get("run_id", "unknown run"))
    methods = all_methods(metrics, manifest, cells)
    colors = method_colors(methods, BASELINE)
    body = [
        f'<header class="verdict {_verdict_class(metrics, cells)}" id="verdict">'
        f"{_inline(verdict)}</header>",
        "<main>",
        f"<h1>MMSpec report: {escape(run_id)}</h1>",
    ]
    started, sha = manifest.get("started_at"), manifest.get("git_sha")
    sub = " · ".join(
        x
        for x in (
            f"started {started}" if started else "",
            f"git {sha[:12]}" if sha else "",
            f"host {manifest['host']}" if manifest.get("host") else "",
        )
        if x
    )
    if sub:
        body.append(f'<p class="sub">{escape(sub)}</p>')
    sections: list[str] = []
    toc: list[tuple[str, str, int]] = []
    imported = _imported(manifest, colors)
    if imported:
        sections.append(imported)
        toc.append(("imported", "Imported run", 0))
    if metrics.height:
        body.append(f'<p class="sub">{escape(run_summary(metrics, details))}</p>')
        body.append(_cards(metrics, details))
        errors = _errors(details)
        if errors:
            sections.append(errors)
            toc.append(("errors", "Errors", 0))
        merged = merged_cells(metrics, details)
        found = families(metrics, manifest)
        taxonomy = _taxonomy(methods, found, colors)
        if taxonomy:
            sections.append(taxonomy)
            toc.append(("methods", "Methods", 0))
        variants = _variants(metrics, methods, colors)
        if variants:
            sections.append(variants)
            toc.append(("variants", "Method variants", 0))
        viskip = _viskip(merged, colors)
        if viskip:
            sections.append(viskip)
            toc.append(("viskip", "ViSkip", 0))
        pairs = metrics.select("model", "temperature").unique().sort(pl.all()).iter_rows()
        for index, (model, temperature) in enumerate(pairs):
            html, entries = _model_section(
                index, model, temperature, merged, metrics, details, methods, colors, found
            )
            sections.append(html)
            toc += [(a, t, 0 if i == 0 else 1) for i, (a, t) in enumerate(entries)]
    elif serving is None:
        body.append('<p class="note">This run has no result rows yet.</p>')
    html, entries = _serving(serving, methods, colors)
    if html:
        sections.append(html)
        toc += [(a, t, 0 if i == 0 else 1) for i, (a, t) in enumerate(entries)]
    sections += [_legend(), _metadata(manifest)]
    toc += [("legend", "Legend", 0), ("metadata", "Run metadata", 0)]
    links = "".join(
        f'<li>{"&nbsp;&nbsp;↳ " if level else ""}<a href="#{a}">{escape(t)}</a></li>'
        for a, t, level in toc
    )
    body.append(f"<nav><h2>Contents</h2><ul>{links}</ul></nav>")
    body += sections
    body.append("</main>")
    return "\n".join(
        [
            _comment(plain),
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(plain[:120])} · {escape(run_id)}</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )
