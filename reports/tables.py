"""What each table of report.md and report.html holds, built once from the cell metrics.

A `Table` is plain data: columns, and rows of cells. A cell carries its text as report.md prints
it, plus what report.html needs to dress it (what kind of value it is, the value itself, a
tooltip), so `markdown.py` and `html.py` only render. Where the two reports split the same
numbers differently between tables, the column lists below say which format shows what.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

from mmspec.reports.acceptance import hist_column, positions, rate_column
from mmspec.reports.answer_import import import_info
from mmspec.reports.families import group_speedups, grouped_methods
from mmspec.reports.formatting import (
    DASH,
    NOT_MEASURED,
    UNAVAILABLE,
    efficiency,
    energy_per_token,
    gib,
    num,
    pct,
    signed_pct,
    speedup,
    transition,
)
from mmspec.reports.metrics import ALL_TOPIC
from mmspec.reports.paired import BASELINE
from mmspec.reports.serving import LATENCY_COLUMNS
from mmspec.reports.variants import VariantGroup, best_per_batch
from mmspec.reports.viskip import ViSkipRow
from mmspec.results.environment import Environment
from mmspec.results.taxonomy import Family

Format = Literal["markdown", "html"]
Row = dict[str, Any]

# What a cell holds, for report.html to dress it (report.md prints every cell's text as is):
#   plain     text as is
#   method    a method name (the page puts the method's colour swatch before it)
#   count     an integer (the page adds thousands separators)
#   errors    an error-row count (the page marks a non-zero count)
#   lossless  a lossless share (the page marks a pass or a failure)
#   missing   a placeholder for a value that does not exist ("not measured")
#   message   free text, `value` holding it raw (the page wraps long lines)
#   code      a literal such as a hash or a path (the page sets it as code and wraps it)
#   topic     MAT and speedup of a (method, topic), `parts` holding each text apart
CellKind = Literal[
    "plain", "method", "count", "errors", "lossless", "missing", "message", "code", "topic"
]


@dataclass(frozen=True)
class Column:
    """A table's column: its header and how the page aligns and sets it apart."""

    label: str  # the header, as report.md prints it
    html_label: str = ""  # the page's wording, where it differs from report.md's
    text: bool = False  # words, left-aligned on the page (numbers are right-aligned)
    pooled: bool = False  # the all-topics column, set apart on the page


@dataclass(frozen=True)
class Cell:
    """One cell: its text, and what the page may dress it by."""

    text: str  # as report.md prints it
    kind: CellKind = "plain"
    value: Any = None  # the datum behind `text`: a number the page shades or flags, raw text
    parts: tuple[str, ...] = ()  # `text` in pieces the page lays out apart
    note: str = ""  # more precise numbers than `text`, for a tooltip
    best: bool = False  # the best value of its column


@dataclass(frozen=True)
class Table:
    """A report table: `rows` hold one Cell per column."""

    columns: list[Column]
    rows: list[list[Cell]] = field(default_factory=list)


METHOD = Column("Method", text=True)


def _method(name: str) -> Cell:
    return Cell(name, "method")


def _count(value: int) -> Cell:
    return Cell(str(value), "count", value)


# ---------------------------------------------------------------- MAT / speedup per topic


def _best_speedups(by_key: dict[tuple[str, str], Row]) -> dict[str, float]:
    """The fastest method's speedup per topic (`ar` itself is not a contender)."""
    best: dict[str, float] = {}
    for (method, topic), r in by_key.items():
        if method != BASELINE and r["speedup_global"] is not None:
            best[topic] = max(best.get(topic, 0.0), r["speedup_global"])
    return best


def _topic_cell(method: str, topic: str, r: Row | None, best: float | None) -> Cell:
    if r is None:
        return Cell(DASH, "topic")
    mat, speedup = r["MAT"], r["speedup_global"]
    parts = (num(mat, ".2f"), num(speedup, ".2f", "×"))
    return Cell(
        " / ".join(parts),
        "topic",
        value=speedup,
        parts=parts,
        note=f"{method} · {topic}: MAT {num(mat, '.3f')}, speedup {num(speedup, '.3f')}",
        best=method != BASELINE and speedup is not None and speedup == best,
    )


def topic_table(block: pl.DataFrame, methods: Sequence[str]) -> Table:
    """One block's MAT and speedup (global) per method and topic, the pooled topic last."""
    topics = [*sorted(set(block["topic"].to_list()) - {ALL_TOPIC}), ALL_TOPIC]
    by_key = {(r["method"], r["topic"]): r for r in block.iter_rows(named=True)}
    best = _best_speedups(by_key)
    pooled = Column(f"{ALL_TOPIC} (pooled)", html_label="All (pooled)", pooled=True)
    columns = [METHOD, *[pooled if t == ALL_TOPIC else Column(t) for t in topics]]
    rows = [
        [
            _method(method),
            *[_topic_cell(method, t, by_key.get((method, t)), best.get(t)) for t in topics],
        ]
        for method in methods
    ]
    return Table(columns, rows)


# ---------------------------------------------------------------- per-method pooled numbers


def _number(column: str, spec: str, suffix: str = "") -> Callable[[Row], Cell]:
    return lambda r: Cell(num(r[column], spec, suffix))


def _measured(text: str) -> Cell:
    return Cell(text, "missing" if text in (NOT_MEASURED, UNAVAILABLE) else "plain")


def _speedup(column: str, decimals: int = 2) -> Callable[[Row], Cell]:
    return lambda r: _measured(speedup(r.get(column), decimals))


def _ideal(r: Row) -> Cell:
    ideal, ratio = r.get("ideal_speedup"), r.get("verify_cost_ratio")
    if ideal is None:
        return _measured(NOT_MEASURED)
    note = (
        f"MAT incl. bonus {num(r['MAT_with_bonus'], '.3f')} / t(T)/t(1) {num(ratio, '.3f')} "
        f"at T = {num(r.get('verify_tokens_mean'), '.1f')} tokens verified per step"
    )
    return Cell(speedup(ideal), value=ideal, note=note)


# Every column the per-method tables can show: key -> (header, the cell of a pooled cell row).
# Keys name the metric column they read, where there is one.
POOLED_COLUMNS: dict[str, tuple[Column, Callable[[Row], Cell]]] = {
    "method": (METHOD, lambda r: _method(r["method"])),
    "samples": (Column("Samples"), lambda r: _count(r["samples"])),
    "errors": (Column("Errors"), lambda r: Cell(str(r["errors"]), "errors", r["errors"])),
    "MAT": (Column("MAT"), _number("MAT", ".2f")),
    "MAT_with_bonus": (Column("MAT incl. bonus"), _number("MAT_with_bonus", ".2f")),
    "accept_rate": (Column("Accept rate"), lambda r: Cell(pct(r["accept_rate"]))),
    "tokens_per_s": (Column("Tokens/s"), _number("tokens_per_s", ".1f")),
    "speedup_global": (Column("Speedup (global)"), _speedup("speedup_global")),
    "speedup_paired": (Column("Speedup (paired)"), _speedup("speedup_paired")),
    "ideal_speedup": (Column("Ideal speedup"), _ideal),
    "implementation_efficiency": (
        Column("Implementation efficiency"),
        lambda r: _measured(efficiency(r)),
    ),
    "paired_keys": (Column("Paired keys"), lambda r: _count(r["paired_keys"])),
    "latency_p50_s": (Column("p50 s"), _number("latency_p50_s", ".3f")),
    "latency_p90_s": (Column("p90 s"), _number("latency_p90_s", ".3f")),
    "latency_p99_s": (Column("p99 s"), _number("latency_p99_s", ".3f")),
    "lossless": (
        Column("Lossless"),
        lambda r: Cell(pct(r["lossless"]), "lossless", r["lossless"]),
    ),
    "total_s_mean": (Column("Latency mean s"), _number("total_s_mean", ".4f")),
    "prefill_s_mean": (Column("Prefill s", "prefill s"), _number("prefill_s_mean", ".4f")),
    "draft_s_mean": (Column("Draft s", "draft s"), _number("draft_s_mean", ".4f")),
    "verify_s_mean": (Column("Verify s", "verify s"), _number("verify_s_mean", ".4f")),
    "commit_s_mean": (Column("Commit s", "commit s"), _number("commit_s_mean", ".4f")),
    "other_s_mean": (Column("Other s", "other s"), _number("other_s_mean", ".4f")),
    "energy": (Column("Energy / token"), lambda r: _measured(energy_per_token(r))),
    "peak_mem_bytes": (Column("Peak memory"), lambda r: _measured(gib(r["peak_mem_bytes"]))),
    # MMSpec's definitions (evaluation/summarize_metrics.py)
    "MAT_mmspec": (Column("MAT (MMSpec)"), _number("MAT_mmspec", ".3f")),
    "draft_accept_mean": (Column("draft_accept_mean"), _number("draft_accept_mean", ".3f")),
    # to 3 decimals, as summary.csv is read
    "speedup_paired_mmspec": (
        Column("Speedup paired (MMSpec)"),
        _speedup("speedup_paired_mmspec", 3),
    ),
    "speedup_global_mmspec": (
        Column("Speedup global (MMSpec)"),
        _speedup("speedup_global_mmspec", 3),
    ),
    # throughput against latency
    "batch_size": (Column("Batch size"), lambda r: Cell(str(r["batch_size"]))),
    "system_tokens_per_s": (Column("System tokens/s"), _number("system_tokens_per_s", ".1f")),
    "throughput_speedup": (Column("Throughput speedup"), _speedup("throughput_speedup")),
    "latency_speedup": (Column("Latency speedup"), _speedup("latency_speedup")),
    "ttft_p50_s": (Column("TTFT p50 s"), _number("ttft_p50_s", ".4f")),
    "ttft_p90_s": (Column("TTFT p90 s"), _number("ttft_p90_s", ".4f")),
    "tpot_p50_s": (Column("TPOT p50 s"), _number("tpot_p50_s", ".4f")),
    "tpot_p90_s": (Column("TPOT p90 s"), _number("tpot_p90_s", ".4f")),
}


_COUNTS_AND_SPEED = (
    "method",
    "samples",
    "errors",
    "MAT",
    "MAT_with_bonus",
    "accept_rate",
    "tokens_per_s",
    "speedup_global",
    "speedup_paired",
    "ideal_speedup",
    "implementation_efficiency",
    "paired_keys",
    "latency_p50_s",
    "latency_p90_s",
)
_PHASES = ("prefill_s_mean", "draft_s_mean", "verify_s_mean", "commit_s_mean")
_TAIL_ENERGY_MEMORY = ("latency_p99_s", "energy", "peak_mem_bytes")

# report.md's per-method table ends on the phase means and its breakdown table on the tail,
# energy and memory; the page puts the phases beside its breakdown chart and the rest in the
# per-method table instead.
DETAIL_COLUMNS: dict[Format, tuple[str, ...]] = {
    "markdown": (*_COUNTS_AND_SPEED, "lossless", *_PHASES),
    "html": (*_COUNTS_AND_SPEED, "latency_p99_s", "lossless", "energy", "peak_mem_bytes"),
}
BREAKDOWN_COLUMNS: dict[Format, tuple[str, ...]] = {
    "markdown": ("method", "total_s_mean", *_PHASES, "other_s_mean", *_TAIL_ENERGY_MEMORY),
    "html": ("method", "total_s_mean", *_PHASES, "other_s_mean"),
}


def _in_method_order(cells: pl.DataFrame, methods: Sequence[str]) -> list[Row]:
    by_method = {r["method"]: r for r in cells.iter_rows(named=True)}
    return [by_method[m] for m in methods if m in by_method]


def pooled_table(cells: pl.DataFrame, methods: Sequence[str], keys: Sequence[str]) -> Table:
    """One row per method of `cells` (pooled cells of one block), the columns `keys` of
    POOLED_COLUMNS."""
    chosen = [POOLED_COLUMNS[k] for k in keys]
    rows = [[cell(r) for _, cell in chosen] for r in _in_method_order(cells, methods)]
    return Table([column for column, _ in chosen], rows)


def detail_table(cells: pl.DataFrame, methods: Sequence[str], fmt: Format) -> Table:
    """Per method, all topics pooled: counts, MAT, speed, latency, lossless."""
    return pooled_table(cells, methods, DETAIL_COLUMNS[fmt])


def breakdown_table(cells: pl.DataFrame, methods: Sequence[str], fmt: Format) -> Table:
    """Per method: mean seconds per row of each phase (`cells` merged with the run details)."""
    return pooled_table(cells, methods, BREAKDOWN_COLUMNS[fmt])


MMSPEC_COLUMNS = (
    "method",
    "MAT",
    "MAT_mmspec",
    "draft_accept_mean",
    "speedup_paired_mmspec",
    "speedup_global_mmspec",
)


def mmspec_table(cells: pl.DataFrame, methods: Sequence[str]) -> Table:
    """Per method, MMSpec's own MAT, draft_accept_mean and speedups beside our MAT."""
    return pooled_table(cells, methods, MMSPEC_COLUMNS)


# ---------------------------------------------------------------- MMSpec's taxonomy


FAMILY_COLUMNS = [
    Column("Drafting", text=True),
    Column("Vision", text=True),
    Column("Training", text=True),
]


def _family_cells(family: Family | None) -> list[Cell]:
    if family is None:
        return [Cell("unknown", "missing")] * 3
    return [Cell(family.drafting), Cell(family.vision), Cell(family.training)]


def taxonomy_table(methods: Sequence[str], families: Mapping[str, Family | None]) -> Table:
    """Each method (`ar` aside) with its drafting, vision and training class."""
    rows = [[_method(m), *_family_cells(families.get(m))] for m in methods if m != BASELINE]
    return Table([METHOD, *FAMILY_COLUMNS], rows)


def speedup_by_batch_table(
    pooled: pl.DataFrame, methods: Sequence[str], families: Mapping[str, Family | None]
) -> Table:
    """Speedup (global) per method and batch size, `pooled` being one (model, temperature):
    `ar`, then each taxonomy group (vision-aware first) with its geometric mean after it."""
    sizes = sorted(set(pooled["batch_size"].to_list()))
    by_key = {(r["method"], r["batch_size"]): r for r in pooled.iter_rows(named=True)}
    present = [m for m in methods if any((m, b) in by_key for b in sizes)]
    rows = []

    def speedups(method: str) -> list[Cell]:
        found = [by_key.get((method, b)) for b in sizes]
        return [Cell(DASH) if r is None else _measured(speedup(r["speedup_global"])) for r in found]

    if BASELINE in present:
        rows.append([_method(BASELINE), *[Cell("baseline")] * 3, *speedups(BASELINE)])
    for group, members in grouped_methods(present, families).items():
        for method in members:
            rows.append([_method(method), *_family_cells(families.get(method)), *speedups(method)])
        means = {g.batch_size: g for g in group_speedups(pooled, members)}
        rows.append(
            [
                Cell(f"{group}: geometric mean"),
                *[Cell("")] * 3,
                *[
                    Cell(
                        f"{means[b].speedup:.2f}× ({means[b].methods})",
                        note=f"{means[b].methods} method(s) with a speedup at batch size {b}",
                    )
                    if b in means
                    else Cell(DASH)
                    for b in sizes
                ],
            ]
        )
    columns = [METHOD, *FAMILY_COLUMNS, *[Column(f"batch size {b}") for b in sizes]]
    return Table(columns, rows)


# ---------------------------------------------------------------- throughput against latency


THROUGHPUT_COLUMNS = (
    "method",
    "batch_size",
    "system_tokens_per_s",
    "throughput_speedup",
    "latency_speedup",
    "ttft_p50_s",
    "ttft_p90_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "latency_p50_s",
    "latency_p90_s",
    "latency_p99_s",
)


def throughput_table(pooled: pl.DataFrame, methods: Sequence[str]) -> Table:
    """Per method and batch size of `pooled` (one model and temperature, topics pooled):
    system throughput and its speedup beside the latency speedup, TTFT, TPOT and the
    per-request latency percentiles."""
    chosen = [POOLED_COLUMNS[k] for k in THROUGHPUT_COLUMNS]
    order = {m: i for i, m in enumerate(methods)}
    found = sorted(
        (r for r in pooled.iter_rows(named=True) if r["method"] in order),
        key=lambda r: (order[r["method"]], r["batch_size"]),
    )
    return Table([c for c, _ in chosen], [[cell(r) for _, cell in chosen] for r in found])


def disagreement_table(found: pl.DataFrame) -> Table:
    """throughput.disagreements()'s cells: where throughput speedup is not latency speedup."""
    columns = [
        Column("Model", text=True),
        Column("T"),
        METHOD,
        Column("Batch size"),
        Column("Throughput speedup"),
        Column("Latency speedup"),
        Column("Throughput vs latency"),
    ]
    rows = [
        [
            Cell(r["model"]),
            Cell(f"{r['temperature']:g}"),
            _method(r["method"]),
            Cell(str(r["batch_size"])),
            Cell(speedup(r["throughput_speedup"])),
            Cell(speedup(r["latency_speedup"])),
            Cell(signed_pct(r["gap"])),
        ]
        for r in found.iter_rows(named=True)
    ]
    return Table(columns, rows)


# ---------------------------------------------------------------- serving


NO_SLO = "no SLO"


def _with_slo(column: str, text: Callable[[float | None], str]) -> Callable[[Row], Cell]:
    # Goodput and attainment exist only against an SLO; without one the grid set none.
    def cell(r: Row) -> Cell:
        if r["slo_ttft_s"] is None and r["slo_tpot_s"] is None:
            return Cell(NO_SLO, "missing")
        return Cell(text(r[column]))

    return cell


def _latency_label(column: str) -> str:
    name, percentile, _ = column.split("_")
    return f"{name.upper() if name != 'queue' else 'Queue'} {percentile} s"


SERVING_CELLS: dict[str, tuple[Column, Callable[[Row], Cell]]] = {
    "scenario": (Column("Scenario", text=True), lambda r: Cell(r["scenario"])),
    "batch_size": (Column("Concurrency"), lambda r: Cell(str(r["batch_size"]))),
    "rate": (Column("Rate /s"), lambda r: Cell(num(r["rate"], "g"))),
    "method": POOLED_COLUMNS["method"],
    "requests": (Column("Requests"), lambda r: _count(r["requests"])),
    "errors": POOLED_COLUMNS["errors"],
    "output_tokens": (Column("Output tokens"), lambda r: _count(r["output_tokens"])),
    "system_tokens_per_s": POOLED_COLUMNS["system_tokens_per_s"],
    "throughput_speedup": (Column("Throughput vs ar"), _speedup("throughput_speedup")),
    "requests_per_s": (Column("Requests/s"), _number("requests_per_s", ".3f")),
    "goodput_requests_per_s": (
        Column("Goodput req/s"),
        _with_slo("goodput_requests_per_s", lambda v: num(v, ".3f")),
    ),
    "slo_attainment": (Column("SLO attainment"), _with_slo("slo_attainment", pct)),
    "lossless": POOLED_COLUMNS["lossless"],
    **{c: (Column(_latency_label(c)), _number(c, ".4f")) for c in LATENCY_COLUMNS},
}
_SERVING_CELL = ("scenario", "batch_size", "rate", "method")
SERVING_THROUGHPUT_COLUMNS = (
    *_SERVING_CELL,
    "requests",
    "errors",
    "output_tokens",
    "system_tokens_per_s",
    "throughput_speedup",
    "requests_per_s",
    "goodput_requests_per_s",
    "slo_attainment",
    "lossless",
)
SERVING_LATENCY_COLUMNS = (*_SERVING_CELL, *LATENCY_COLUMNS)


def serving_errors_table(errors: pl.DataFrame) -> Table:
    """Error rows per (serving cell, message), in the order of `errors`
    (serving.serving_errors())."""
    return errors_table(errors, [SERVING_CELLS[k] for k in ("scenario", "batch_size", "rate")])


def serving_table(cells: pl.DataFrame, methods: Sequence[str], keys: Sequence[str]) -> Table:
    """One row per serving cell of `cells` (one model and temperature of serving_metrics()),
    the columns `keys` of SERVING_CELLS: continuous cells by concurrency, then poisson cells by
    rate, each setting's methods in `methods`' order."""
    chosen = [SERVING_CELLS[k] for k in keys]
    order = {m: i for i, m in enumerate(methods)}
    found = sorted(
        (r for r in cells.iter_rows(named=True) if r["method"] in order),
        key=lambda r: (r["scenario"], r["batch_size"], r["rate"] or 0.0, order[r["method"]]),
    )
    return Table([c for c, _ in chosen], [[cell(r) for _, cell in chosen] for r in found])


# ---------------------------------------------------------------- acceptance per position


ACCEPT_SHOWN = 10  # positions (and histogram buckets) a table shows; metrics.csv has them all


def _accepting(cells: pl.DataFrame, methods: Sequence[str]) -> list[Row]:
    rows = _in_method_order(cells, methods)
    return [r for r in rows if r.get("drafting_steps")]


def position_table(cells: pl.DataFrame, methods: Sequence[str]) -> Table | None:
    """Per method: drafting steps and the share of them that accepted at least k drafts,
    k = 1 .. ACCEPT_SHOWN (vLLM's per-position acceptance rate); None when no method of
    `cells` recorded step lengths."""
    longest = positions(cells.columns)
    rows = _accepting(cells, methods)
    if longest == 0 or not rows:
        return None
    shown = range(1, min(longest, ACCEPT_SHOWN) + 1)
    columns = [METHOD, Column("Drafting steps"), *[Column(f"k={k}") for k in shown]]
    body = [
        [
            _method(r["method"]),
            _count(r["drafting_steps"]),
            *[Cell(pct(r.get(rate_column(k)))) for k in shown],
        ]
        for r in rows
    ]
    return Table(columns, body)


def histogram_table(cells: pl.DataFrame, methods: Sequence[str]) -> Table | None:
    """Per method: the share of drafting steps that accepted exactly j drafts, j = 0 ..
    ACCEPT_SHOWN, the last column pooling everything longer; None as position_table."""
    longest = positions(cells.columns)
    rows = _accepting(cells, methods)
    if longest == 0 or not rows:
        return None
    last = min(longest, ACCEPT_SHOWN)
    pooled_tail = longest > last  # the last column then holds j >= last: the rate at `last`
    labels = [str(j) for j in range(last)] + [f"≥{last}" if pooled_tail else str(last)]

    def share(r: Row, j: int) -> float | None:
        return r.get(rate_column(j) if j == last and pooled_tail else hist_column(j))

    body = [
        [_method(r["method"]), *[Cell(pct(share(r, j))) for j in range(last + 1)]] for r in rows
    ]
    return Table([METHOD, *[Column(label) for label in labels]], body)


# ---------------------------------------------------------------- ViSkip


VISKIP_COLUMNS = [
    METHOD,
    Column("Batch size"),
    Column("Skipped steps"),
    Column("MAT"),
    Column("Draft s / row"),
    Column("Verify s / row"),
    Column("Latency p50"),
    Column("Speedup vs ar"),
    Column("ViSkip vs method"),
]


def _viskip_cells(row: ViSkipRow) -> list[Cell]:
    base, skip = row.base, row.skip

    def change(column: str, spec: str, suffix: str = "") -> Cell:
        return Cell(transition(base.get(column), skip.get(column), spec, suffix))

    return [
        _method(row.name),
        Cell(str(row.batch_size)),
        Cell(pct(row.skipped_share)),
        change("MAT", ".2f"),
        change("draft_s_mean", ".4f"),
        change("verify_s_mean", ".4f"),
        change("latency_p50_s", ".3f", " s"),
        change("speedup_global", ".2f", "×"),
        Cell(num(row.throughput_ratio, ".2f", "×")),
    ]


def viskip_table(rows: Sequence[ViSkipRow]) -> Table:
    """Each `viskip+X` cell against X: X → viskip+X per metric."""
    return Table(VISKIP_COLUMNS, [_viskip_cells(r) for r in rows])


# ---------------------------------------------------------------- method variants


ARGUMENTS = Column("Arguments", text=True)


def variants_table(group: VariantGroup) -> Table:
    """A method's settings (rows) and their speedup (global) per batch size, the best at each
    batch size marked."""
    sizes = group.batch_sizes
    best = {b.batch_size: b.name for b in best_per_batch(group)}

    def cell(name: str, batch_size: int) -> Cell:
        r = group.cells.get((name, batch_size))
        if r is None:
            return Cell(DASH)
        value = r["speedup_global"]
        return Cell(speedup(value), value=value, best=best.get(batch_size) == name)

    rows = [
        [_method(name), Cell(group.label(name) or DASH), *[cell(name, b) for b in sizes]]
        for name in group.names
    ]
    return Table([METHOD, ARGUMENTS, *[Column(f"batch size {b}") for b in sizes]], rows)


def best_setting_table(group: VariantGroup) -> Table:
    """Per batch size: the setting of the method with the highest speedup (global), with its
    MAT and latency."""
    columns = [
        Column("Batch size"),
        Column("Best setting", text=True),
        ARGUMENTS,
        Column("Speedup (global)"),
        Column("MAT"),
        Column("p50 s"),
        Column("p90 s"),
        Column("Settings"),
    ]
    rows = [
        [
            Cell(str(b.batch_size)),
            _method(b.name),
            Cell(group.label(b.name) or DASH),
            _measured(speedup(b.row["speedup_global"])),
            Cell(num(b.row["MAT"], ".2f")),
            Cell(num(b.row["latency_p50_s"], ".3f")),
            Cell(num(b.row["latency_p90_s"], ".3f")),
            Cell(str(b.settings), note=f"settings with a speedup at batch size {b.batch_size}"),
        ]
        for b in best_per_batch(group)
    ]
    return Table(columns, rows)


# ---------------------------------------------------------------- errors and run metadata


def errors_table(
    errors: pl.DataFrame, cell: Sequence[tuple[Column, Callable[[Row], Cell]]] | None = None
) -> Table:
    """Error rows per (cell, message), in the order of `errors` (run_details().errors); `cell`:
    the columns naming a cell between method and temperature (default: the batch size)."""
    cell = cell or [(Column("Batch size"), lambda r: Cell(str(r["batch_size"])))]
    columns = [
        Column("Model", text=True),
        Column("Method", text=True),
        *[column for column, _ in cell],
        Column("T"),
        Column("Error", text=True),
        Column("Rows"),
    ]
    rows = [
        [
            Cell(r["model"]),
            Cell(r["method"]),
            *[value(r) for _, value in cell],
            Cell(f"{r['temperature']:g}"),
            Cell(str(r["error"]), "message", r["error"]),
            _count(r["rows"]),
        ]
        for r in errors.iter_rows(named=True)
    ]
    return Table(columns, rows)


# (label, manifest key, in report.md too): report.md lists the fields that tell runs apart,
# the page every one.
_RUN_FIELDS = [
    ("Run id", "run_id", True),
    ("Git sha", "git_sha", True),
    ("Uncommitted changes", "git_dirty", True),
    ("Grid sha256", "grid_sha256", True),
    ("Workload sha256", "workload_sha256", True),
    ("Host", "host", True),
    ("Python", "python", True),
    ("Platform", "platform", False),
    ("Started at", "started_at", True),
    ("Schema version", "schema_version", False),
]
_GRID_FIELDS = ("methods", "batch_sizes", "temperatures", "max_new_tokens", "repeats", "seed")


def run_fields(manifest: dict[str, Any], fmt: Format) -> list[tuple[str, Any]]:
    """(label, value) of the run's metadata; None where the manifest lacks it."""
    fields = [
        (label, manifest.get(key))
        for label, key, in_markdown in _RUN_FIELDS
        if in_markdown or fmt == "html"
    ]
    if fmt == "html":
        grid = manifest.get("grid") or {}
        for key in (k for k in _GRID_FIELDS if k in grid):
            value = grid[key]
            if isinstance(value, list):  # a named variant: by its name
                value = [v.get("name", v) if isinstance(v, dict) else v for v in value]
            text = ", ".join(map(str, value)) if isinstance(value, list) else value
            fields.append((f"Grid {key.replace('_', ' ')}", text))
    return fields


def metadata_table(fields: Sequence[tuple[str, Any]]) -> Table:
    """run_fields() as a two-column table."""
    rows = [
        [Cell(name), Cell("unknown", "missing") if value is None else Cell(str(value), "code")]
        for name, value in fields
    ]
    return Table([Column("Field", text=True), Column("Value", text=True)], rows)


def packages_table(manifest: dict[str, Any]) -> Table | None:
    """The versions of the packages the run recorded; None when it recorded none."""
    packages = manifest.get("packages") or {}
    if not packages:
        return None
    rows = [
        [Cell(name), Cell(version) if version else Cell("not installed", "missing")]
        for name, version in sorted(packages.items())
    ]
    return Table([Column("Package", text=True), Column("Version", text=True)], rows)


def environment_table(manifest: dict[str, Any]) -> Table | None:
    """The machine the run ran on (manifest "environment"); None for a run recorded before
    manifests had one."""
    env = Environment.from_manifest(manifest)
    if env is None:
        return None
    source = (
        "probed on the driver when the run started"
        if env.source == "probed"
        else "stated when the run was imported"
    )
    gpus = "; ".join(
        gpu.name + ("" if gpu.memory_bytes is None else f" ({gib(gpu.memory_bytes)})")
        for gpu in env.gpus
    )
    fields: list[tuple[str, Any]] = [
        ("Source", source),
        ("GPUs", gpus or ("none" if env.source == "probed" else None)),
        ("GPU driver", env.gpu_driver),
        ("CUDA (driver)", env.cuda_driver),
        ("CPU", env.cpu),
        ("CPU cores", env.cpu_cores),
        ("Memory", None if env.memory_bytes is None else gib(env.memory_bytes)),
    ]
    return metadata_table(fields)


def import_table(manifest: dict[str, Any]) -> Table | None:
    """The answer files an imported run was made from, one row per file (method); None for a
    run of ours."""
    info = import_info(manifest)
    if info is None:
        return None
    columns = [
        METHOD,
        Column("Source name", text=True),
        Column("T"),
        Column("Records"),
        Column("Rows"),
        Column("Error rows"),
        Column("Not recorded", text=True),
        Column("File", text=True),
        Column("SHA-256", text=True),
    ]
    rows = [
        [
            _method(f["method"]),
            Cell(f["name"]),
            Cell(f"{f['temperature']:g}"),
            _count(f["records"]),
            _count(f["rows"]),
            Cell(str(f["error_rows"]), "errors", f["error_rows"]),
            Cell(", ".join(f["not_recorded"]) or DASH, "message", ", ".join(f["not_recorded"])),
            Cell(f["path"], "code"),
            Cell(f["sha256"][:16], "code", note=f["sha256"]),
        ]
        for f in info.get("files") or []
    ]
    return Table(columns, rows)
