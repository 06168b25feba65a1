"""report.md from cell metrics and the run manifest.

The first line is the verdict (lossless checks and error rows) so a glance, a CI log or
`head -1` tells whether the run can be trusted before anyone reads a table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

import polars as pl

from mmspec.reports.answer_import import import_note
from mmspec.reports.formatting import pct
from mmspec.reports.metrics import ALL_TOPIC, CELL_KEYS, RunDetails
from mmspec.reports.paired import BASELINE
from mmspec.reports.serving import ServingReport, Slo, serving_summary
from mmspec.reports.tables import (
    ACCEPT_SHOWN,
    SERVING_LATENCY_COLUMNS,
    SERVING_THROUGHPUT_COLUMNS,
    Table,
    best_setting_table,
    breakdown_table,
    detail_table,
    disagreement_table,
    environment_table,
    errors_table,
    histogram_table,
    import_table,
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
from mmspec.reports.variants import variant_groups
from mmspec.reports.viskip import NOTE as VISKIP_NOTE
from mmspec.reports.viskip import grouped, viskip_rows
from mmspec.results.taxonomy import Family, taxonomy_of
from mmspec.results.variants import variants_of

# (term, definition) pairs: the Legend section of report.md and of report.html.
DEFINITIONS = [
    (
        "MAT",
        "(MMSpec convention) accepted draft tokens per verification step, bonus token excluded: "
        "sum(accepted_tokens) / sum(steps). Plain AR decoding scores 0.",
    ),
    (
        "MAT incl. bonus",
        "(Spec-Bench convention) (sum(accepted_tokens) + sum(steps)) / sum(steps), i.e. tokens "
        "committed per target forward. Plain AR decoding scores 1.",
    ),
    (
        "Speedup (global)",
        "total AR seconds / total method seconds, summed over the (sample, turn, repeat) keys "
        "that finished ok under both the method and `ar` (same model, batch size, temperature).",
    ),
    ("Speedup (paired)", "mean over those same keys of AR seconds / method seconds."),
    (
        "Ideal speedup",
        "the roofline: the speedup if verification were all a method paid for. Per generated "
        "token the method pays t(T) / MAT incl. bonus, `ar` t(1), so ideal = MAT incl. bonus × "
        "t(1) / t(T), with t(T) the seconds of one target forward verifying T tokens per row, "
        "measured by each worker at the cell's batch size before its timed work (the fastest "
        "of 5 rounds after a warm-up, over a fixed short prompt with an image; made "
        "non-decreasing in T, as interference only adds time), and T = 1 + "
        "sum(drafted_tokens) / sum(steps) (T = 1, 2, 4, …, 64 are measured; linear in "
        "between, along the last segment past 64). A cell run by several workers weighs each "
        "one's t(T) / t(1) by the steps it verified. `ar` (nothing drafted) scores 1; not "
        "measured where rows carry no t(T) (runs before schema 3, imports). In `metrics.csv`: "
        "`verify_tokens_mean`, `verify_cost_ratio` = t(T) / t(1), `ideal_speedup`.",
    ),
    (
        "Implementation efficiency",
        "Speedup (global) / Ideal speedup (`implementation_efficiency`): the share of the "
        "roofline the implementation reaches. Drafting, acceptance, KV commit, Python between "
        "steps and padding of ragged trees in a batch make up the rest.",
    ),
    (
        "Lossless",
        "share of those keys whose output tokens (SHA-256) equal `ar`'s; greedy "
        "(temperature 0) only, blank otherwise.",
    ),
    (
        "all (pooled)",
        "every topic of the cell pooled (sums over all rows), not a mean of topics; the "
        "table's average column.",
    ),
    (
        "Latency",
        "per-row `total_s`, from the start of the row's batch to that row finishing; "
        "p50/p90/p99 and the CDF are linear-interpolated quantiles of it. Tokens/s = "
        "sum(new_tokens) / sum(total_s).",
    ),
    (
        "Latency breakdown",
        "means per row of prefill (encode the prompt and image, prefill, first token), draft "
        "(the drafter's proposal), verify (one target forward over the draft tree), commit "
        "(acceptance, drafter update, KV-cache commit) and other = total − prefill − draft − "
        "verify − commit: engine bookkeeping between steps and removing finished rows from the "
        "batch. In a batch every row is charged each step it takes part in.",
    ),
    (
        "Energy / token",
        "sum(energy_j) / sum(new_tokens) over the rows with an energy reading (each row holds "
        "its share of its batch's energy); not measured where telemetry had no energy counter.",
    ),
    (
        "Peak memory",
        "the largest `peak_mem_bytes` of the cell's rows (GPU allocator peak, "
        "or the worker's peak RSS on CPU).",
    ),
    (
        "Errors",
        "error rows are counted, then left out of every other number. Messages are grouped "
        "with per-object noise masked (memory addresses as 0x…, Ray ids as …, pid=…).",
    ),
    (
        "MAT (MMSpec)",
        "MMSpec's MAT (`evaluation/summarize_metrics.py`): sum(new_tokens) / sum(steps), tokens "
        "per verification round, the bonus token and the prefill's first token included. "
        "Plain AR decoding scores about 1.",
    ),
    (
        "draft_accept_mean",
        "(MMSpec) the mean of the accepted drafts recorded per round: sum(accepted_tokens) / "
        "sum(steps), our MAT; for files that store one mean per turn (MSD) the mean x rounds, "
        "as MMSpec weighs them. Blank for `ar`, which drafts nothing.",
    ),
    (
        "Speedup paired (MMSpec)",
        "mean over the (sample, turn, repeat) keys that finished ok under both the method and "
        "`ar` of (method tokens / s) / (`ar` tokens / s), per key; pairs where either took no "
        "time or `ar` made no token are skipped. Equals Speedup (paired) when the two made the "
        "same number of tokens.",
    ),
    (
        "Speedup global (MMSpec)",
        "the method's tokens / s over `ar`'s, each over all its ok rows of the cell "
        "(sum(new_tokens) / sum(total_s)): a throughput ratio, where ours is a time ratio over "
        "common keys; the two agree when outputs do.",
    ),
    (
        "System tokens/s",
        "system throughput: the tokens of the cell's batches / the sum of their wall times "
        "(`batch_s`; a batch is the rows of a shard sharing a `batch_index`); per cell, topics "
        "pooled (a batch mixes topics).",
    ),
    (
        "Throughput speedup",
        "System tokens/s of the method / that of `ar` at the same model, batch size and "
        "temperature.",
    ),
    (
        "Latency speedup",
        "per request: `ar`'s mean latency / the method's, over the requests both finished ok; "
        "the same number as Speedup (global). Throughput and latency speedup disagree when "
        "the slowest row of a batch holds its wall time, or outputs differ in length; "
        f"disagreements beyond {100 * DISAGREEMENT:.0f}% of the latency speedup are listed.",
    ),
    (
        "TTFT",
        "time to first token: a row's `prefill_s` (the batch's prefill, which ends with every "
        "row's first token); p50/p90 over the cell's rows.",
    ),
    (
        "TPOT",
        "time per output token after the first: (total_s - prefill_s) / (new_tokens - 1), per "
        "row with at least 2 tokens; p50/p90 over the cell's rows.",
    ),
    (
        "Acceptance per position",
        "(vLLM's definition) at position k, the share of drafting steps that accepted at least "
        "k draft tokens; k = 1 .. the longest accepted draft of the run (all in `metrics.csv` "
        f"as `accept_rate_pos_<k>`, the first {ACCEPT_SHOWN} in the tables). Drafting steps: "
        "the steps recorded less ViSkip's skipped ones; a step with nothing to propose counts "
        "with 0 accepted. The rates add up to the MAT of the drafting steps.",
    ),
    (
        "Acceptance-length histogram",
        "the share of drafting steps that accepted exactly j drafts, j = 0 .. the longest "
        "(`accept_hist_<j>`); a table's last column pools every longer one.",
    ),
    (
        "Drafting / Vision / Training",
        "MMSpec's taxonomy: a linear chain or a tree of draft tokens per step; vision-aware "
        "(drafting, or ViSkip's decision to draft, reads the image) or vision-agnostic; "
        "training-based (a trained draft head) or training-free. Group rows give the "
        "geometric mean of their methods' speedups (how many in brackets).",
    ),
    (
        "Variant",
        "a registered method run with one setting of its arguments: a named variant of the "
        "grid, or one value of a list-valued argument (`viskip+pld[viskip_threshold=0.2]`). "
        "Its rows record the registered method (`base_method`) and every argument it ran "
        "with, defaults included (`method_args`); the best setting at a batch size is the one "
        "with the highest Speedup (global) there.",
    ),
    (
        "unavailable",
        "a speedup with nothing to divide by: no `ar` cell at the same model, batch size and "
        "temperature (an imported run without a baseline), or no request both finished.",
    ),
]

LEGEND = "## Legend\n" + "".join(f"- **{term}**: {text}\n" for term, text in DEFINITIONS)

# The Serving section's own terms (serving.py has the same in its module doc): listed there, so
# the Legend of a run without serving cells stays as it was.
SERVING_DEFINITIONS = [
    (
        "Serving cell",
        "a request stream per (model, method, scenario, concurrency, rate, temperature): "
        "`continuous` keeps up to `concurrency` requests decoding, refilling as they finish; "
        "`poisson` lets requests arrive at `rate` per second (up to the concurrency cap). "
        "Only ok requests count, except in Errors.",
    ),
    (
        "System tokens/s (serving)",
        "the ok requests' new tokens / the wall time of their streams (each stream's "
        "`batch_s` once); Requests/s: ok requests / that wall time. Throughput vs ar: System "
        "tokens/s over `ar`'s in the same model, scenario, concurrency, rate and temperature.",
    ),
    (
        "Goodput",
        "ok requests per second of wall time that met both SLOs: TTFT ≤ the grid's "
        "`slo.ttft_s` and TPOT ≤ `slo.tpot_s` (a one-token request has no TPOT and meets "
        "that part; an objective the grid leaves out is met by all); SLO attainment: the share "
        "of ok requests that met both. Not computed without `slo:` in the grid.",
    ),
    ("TTFT (serving)", "`ttft_s`: from a request's arrival to its first token."),
    (
        "TPOT (serving)",
        "per request with n ≥ 2 tokens: (time of the last token − time of the first) / (n − 1).",
    ),
    (
        "ITL",
        "inter-token latency: the gaps between consecutive distinct emission times of a "
        "request's tokens, pooled over the cell's requests. Tokens a speculative step commits "
        "together share one time, so such a step is one gap: ITL is the wait a streaming "
        "client sees between updates.",
    ),
    ("E2E", "end-to-end latency, `total_s`: from a request's arrival to its last token."),
    (
        "Queue",
        "queueing delay, `queue_s`: from a request's arrival to the start of its encoding "
        "(beside the decoding rows, or in line when none decode).",
    ),
    (
        "Lossless (serving)",
        "share of the requests both the method and `ar` finished ok in the same serving cell "
        "whose output tokens (SHA-256) equal `ar`'s; greedy only.",
    ),
]


def md_text(value: Any) -> str:
    """Text from a run (model names, sample ids, error messages) as report.md holds it: HTML
    escaped, so a Markdown viewer shows `<img onerror=...>` as text instead of running it."""
    return escape(str(value), quote=False)


def markdown_table(
    header: Sequence[Any], rows: Iterable[Sequence[Any]], *, one_line: bool = True
) -> list[str]:
    """Lines of a Markdown table; HTML and pipes inside values are escaped. With `one_line`,
    runs of whitespace become one space: a line break inside a value (an exception message)
    would split the table."""

    def cell(value: Any) -> str:
        text = " ".join(str(value).split()) if one_line else str(value)
        return md_text(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def table_lines(table: Table) -> list[str]:
    """A report table in Markdown: every cell's text as is."""
    header = [column.label for column in table.columns]
    return markdown_table(header, [[cell.text for cell in row] for row in table.rows])


def method_order(metrics: pl.DataFrame, manifest: dict[str, Any]) -> list[str]:
    """Methods in the grid's order (the author's), then any others with `ar` first; each
    method's variants right after the first of them (grouped under their method)."""
    present = set(metrics["method"].to_list())
    recorded = list(variants_of(manifest)) or [
        m["name"] if isinstance(m, dict) else m
        for m in (manifest.get("grid") or {}).get("methods") or []
    ]
    ordered = [m for m in recorded if m in present]
    rest = sorted(present - set(ordered), key=lambda m: (m != BASELINE, m))
    bases = base_methods(metrics)
    first: dict[str, int] = {}
    for i, name in enumerate([*ordered, *rest]):
        first.setdefault(bases.get(name, name), i)
    # stable: within a method its variants keep the grid's order
    return sorted([*ordered, *rest], key=lambda m: first[bases.get(m, m)])


def base_methods(metrics: pl.DataFrame) -> dict[str, str]:
    """Each method name of the run -> the registered method it ran (itself but for variants)."""
    if "base_method" not in metrics.columns:
        return {}
    pairs = metrics.select("method", "base_method").unique().iter_rows()
    return {name: base or name for name, base in pairs}


def _cell_label(row: dict[str, Any]) -> str:
    where = f"batch size {row['batch_size']}, T={row['temperature']:g}"
    if row.get("scenario") is not None:  # a serving cell
        rate = "" if row["rate"] is None else f", {row['rate']:g}/s"
        where = (
            f"{row['scenario']}, concurrency {row['batch_size']}{rate}, T={row['temperature']:g}"
        )
    return f"{md_text(row['method'])} on {md_text(row['model'])} ({where})"


_CHECK_COLUMNS = ["model", "method", "batch_size", "temperature", "lossless", "paired_keys"]


def _lossless_cells(metrics: pl.DataFrame, serving: pl.DataFrame | None) -> pl.DataFrame:
    """The pooled static cells and the serving cells, with what the lossless check reads."""
    totals = metrics.filter(pl.col("topic") == ALL_TOPIC).select(_CHECK_COLUMNS)
    if serving is None or serving.height == 0:
        return totals
    serving_cells = serving.select(*_CHECK_COLUMNS, "scenario", "rate")
    return pl.concat([totals, serving_cells], how="diagonal_relaxed")


def headline(metrics: pl.DataFrame, serving: pl.DataFrame | None = None) -> str:
    """One line: did every lossless check pass (serving cells' too), and how many rows
    errored."""
    totals = metrics.filter(pl.col("topic") == ALL_TOPIC)
    errors = int(totals["errors"].sum()) if totals.height else 0
    if serving is not None and serving.height:
        errors += int(serving["errors"].sum())
    error_part = f"Error rows: {errors}."
    cells = _lossless_cells(metrics, serving)
    if cells.height == 0:
        return f"**No result rows.** {error_part}"
    candidates = cells.filter((pl.col("method") != BASELINE) & (pl.col("temperature") == 0))
    checked = candidates.filter(pl.col("lossless").is_not_null())
    unchecked = candidates.height - checked.height
    failed = checked.filter(pl.col("lossless") < 1.0)
    if checked.height == 0:
        verdict = "**Lossless: not checked** (no greedy cell has ok samples shared with `ar`)."
    elif failed.height:
        parts = [
            f"{_cell_label(r)}: {pct(r['lossless'])} of {r['paired_keys']} identical"
            for r in failed.iter_rows(named=True)
        ]
        verdict = (
            f"**Lossless: FAILED** {failed.height}/{checked.height} — " + "; ".join(parts) + "."
        )
    else:
        verdict = f"**Lossless: all {checked.height} checks passed.**"
    if checked.height and unchecked:
        verdict += f" ({unchecked} greedy cell(s) unchecked: no ok samples shared with `ar`.)"
    return f"{verdict} {error_part}"


def blocks(metrics: pl.DataFrame) -> list[tuple[str, float, int]]:
    """The (model, temperature, batch size) blocks of a report, in order."""
    keys = metrics.select("model", "temperature", "batch_size").unique().sort(pl.all())
    return list(keys.iter_rows())


def block_rows(
    frame: pl.DataFrame, model: str, temperature: float, batch_size: int
) -> pl.DataFrame:
    """The rows of `frame` that belong to one block."""
    return frame.filter(
        (pl.col("model") == model)
        & (pl.col("temperature") == temperature)
        & (pl.col("batch_size") == batch_size)
    )


def merged_cells(metrics: pl.DataFrame, details: RunDetails) -> pl.DataFrame:
    """Pooled cell metrics with the details of the same cell beside them."""
    pooled = metrics.filter(pl.col("topic") == ALL_TOPIC)
    return pooled.join(details.cells, on=CELL_KEYS, how="left")


def model_blocks(metrics: pl.DataFrame) -> list[tuple[str, float, pl.DataFrame]]:
    """(model, temperature, its pooled cells) of a report, in order."""
    pooled = metrics.filter(pl.col("topic") == ALL_TOPIC)
    return [
        (model, temperature, part)
        for (model, temperature), part in sorted(
            pooled.partition_by("model", "temperature", as_dict=True).items()
        )
    ]


def families(metrics: pl.DataFrame, manifest: dict[str, Any]) -> dict[str, Family | None]:
    """MMSpec's taxonomy of the run's methods (results.taxonomy: the manifest's, else known;
    a variant the manifest does not place, by its registered method)."""
    return taxonomy_of(manifest, metrics["method"].unique().to_list(), base_methods(metrics))


TAXONOMY_NOTE = (
    "MMSpec's taxonomy of the methods (see Legend): how each drafts, whether it reads the "
    "image, whether it is trained."
)
FAMILY_NOTE = (
    "MMSpec's second finding: vision-aware against vision-agnostic methods as batch size grows."
)
THROUGHPUT_NOTE = (
    "MMSpec's third finding, per cell: throughput speedup (system tokens/s against `ar` at the "
    "same batch size) beside latency speedup (per request), with time to first token, time "
    "per output token and per-request latency percentiles."
)


def _taxonomy(methods: list[str], found: dict[str, Family | None]) -> list[str]:
    if not any(m != BASELINE for m in methods):
        return []
    table = taxonomy_table(methods, found)
    return ["## Methods", "", TAXONOMY_NOTE, "", *table_lines(table), ""]


def _speedup_by_batch(
    metrics: pl.DataFrame, methods: list[str], found: dict[str, Family | None]
) -> list[str]:
    lines = ["## Speedup (global) vs batch size", "", FAMILY_NOTE, ""]
    for model, temperature, part in model_blocks(metrics):
        lines += [f"{md_text(model)} · T={temperature:g}:", ""]
        lines += [*table_lines(speedup_by_batch_table(part, methods, found)), ""]
    return lines


def disagreement_note(found: pl.DataFrame, pooled: pl.DataFrame) -> str:
    """The sentence above the disagreement table (or instead of it, when there is none)."""
    compared = pooled.filter(
        (pl.col("method") != BASELINE)
        & pl.col("throughput_speedup").is_not_null()
        & pl.col("latency_speedup").is_not_null()
    )
    if compared.height == 0:
        return (
            "No throughput speedup here to set beside latency: that needs a method and `ar` "
            "at the same batch size, with batch wall times (`batch_s`)."
        )
    limit = f"{100 * DISAGREEMENT:.0f}%"
    if found.height == 0:
        return f"Throughput and latency speedups agree within {limit} in every cell."
    return (
        f"Cells where throughput and latency speedups disagree by more than {limit} of the "
        f"latency speedup ({found.height}):"
    )


def _throughput(metrics: pl.DataFrame, methods: list[str]) -> list[str]:
    lines = ["## Throughput vs latency", "", THROUGHPUT_NOTE, ""]
    for model, temperature, part in model_blocks(metrics):
        lines += [f"{md_text(model)} · T={temperature:g}:", ""]
        lines += [*table_lines(throughput_table(part, methods)), ""]
        found = disagreements(part)
        lines += [disagreement_note(found, part), ""]
        if found.height:
            lines += [*table_lines(disagreement_table(found)), ""]
    return lines


def acceptance_lines(pooled: pl.DataFrame, present: list[str]) -> list[str]:
    """A block's acceptance per position and histogram tables (empty without step lengths)."""
    positions, histogram = position_table(pooled, present), histogram_table(pooled, present)
    if positions is None or histogram is None:
        return []
    return [
        "Acceptance per draft position (vLLM's definition: share of drafting steps that "
        "accepted at least k drafts):",
        "",
        *table_lines(positions),
        "",
        "Acceptance-length histogram (share of drafting steps that accepted exactly j drafts):",
        "",
        *table_lines(histogram),
        "",
    ]


ERROR_LIMIT = 15  # (cell, message) pairs listed up front; every cell's count is in its table


def error_lines(details: RunDetails, limit: int = ERROR_LIMIT) -> list[str]:
    """The Errors section: error rows per cell and message (most frequent first)."""
    if details.errors.height == 0:
        return []
    lines = ["## Errors", ""]
    lines += table_lines(errors_table(details.errors.head(limit)))
    if details.errors.height > limit:
        lines += ["", f"… and {details.errors.height - limit} more (cell, message) pairs."]
    return [*lines, ""]


def run_summary(metrics: pl.DataFrame, details: RunDetails | None) -> str:
    """One line: how many rows, models, methods, batch sizes and temperatures the run holds."""
    pooled = metrics.filter(pl.col("topic") == ALL_TOPIC)
    errors = int(pooled["errors"].sum()) if pooled.height else 0
    total = details.rows if details is not None else int(pooled["samples"].sum()) + errors

    def listed(col: str, fmt: str = "") -> str:
        return ", ".join(md_text(f"{v:{fmt}}") for v in sorted(set(pooled[col].to_list())))

    return (
        f"{total:,} rows ({errors:,} errors) · models: {listed('model')} · "
        f"batch sizes: {listed('batch_size')} · temperatures: {listed('temperature', 'g')}"
    )


def _sections(
    metrics: pl.DataFrame, manifest: dict[str, Any], merged: pl.DataFrame | None
) -> list[str]:
    lines: list[str] = []
    methods = method_order(metrics, manifest)
    for model, temperature, batch_size in blocks(metrics):
        block = block_rows(metrics, model, temperature, batch_size)
        present = [m for m in methods if m in set(block["method"].to_list())]
        lines += [f"## {md_text(model)} · T={temperature:g} · batch size {batch_size}", ""]
        lines += ["MAT / speedup (global) per topic:", ""]
        lines += [*table_lines(topic_table(block, present)), ""]
        lines += ["Per method, all topics pooled:", ""]
        pooled = block.filter(pl.col("topic") == ALL_TOPIC)
        lines += [*table_lines(detail_table(pooled, present, "markdown")), ""]
        lines += ["By MMSpec's definitions (`evaluation/summarize_metrics.py`):", ""]
        lines += [*table_lines(mmspec_table(pooled, present)), ""]
        lines += acceptance_lines(pooled, present)
        if merged is not None:
            lines += ["Latency breakdown (mean seconds per row), tail, energy and memory:", ""]
            cells = block_rows(merged, model, temperature, batch_size)
            lines += [*table_lines(breakdown_table(cells, present, "markdown")), ""]
    return lines


def variant_lines(metrics: pl.DataFrame, methods: list[str]) -> list[str]:
    """The Method variants section (only for a run with a method under several names)."""
    lines: list[str] = []
    for model, temperature, part in model_blocks(metrics):
        for group in variant_groups(part, methods):
            where = f"{md_text(model)} · T={temperature:g} · {md_text(group.method)}"
            lines += [f"{where}: speedup (global) per setting and batch size:", ""]
            lines += [*table_lines(variants_table(group)), ""]
            lines += [f"{where}: best setting per batch size:", ""]
            lines += [*table_lines(best_setting_table(group)), ""]
    return ["## Method variants", "", VARIANTS_NOTE, "", *lines] if lines else []


def viskip_lines(merged: pl.DataFrame) -> list[str]:
    """The ViSkip section (only for a run with `viskip+X` cells next to X)."""
    rows = viskip_rows(merged)
    if not rows:
        return []
    lines = ["## ViSkip", "", VISKIP_NOTE, ""]
    for (model, temperature), part in grouped(rows).items():
        lines += [f"{md_text(model)} · T={temperature:g}:", ""]
        lines += [*table_lines(viskip_table(part)), ""]
    return lines


def import_lines(manifest: dict[str, Any]) -> list[str]:
    """The Imported section: where an imported run's numbers come from (empty for ours)."""
    note, table = import_note(manifest), import_table(manifest)
    if note is None or table is None:
        return []
    return ["## Imported run", "", note, "", *table_lines(table), ""]


SERVING_NOTE = (
    "Requests served by continuous batching at a concurrency cap (`continuous`) or arriving "
    "as a Poisson process (`poisson`), every method beside `ar` (definitions below). These "
    "cells are not in the static tables above: a serving cell's concurrency is not a batch "
    "size."
)


def slo_sentence(slo: Slo | None) -> str:
    """What the goodput columns are measured against."""
    if slo is None:
        return "No SLO in the grid (`slo:`): goodput and SLO attainment are not computed."
    limits = [
        f"{name} ≤ {limit:g} s"
        for name, limit in (("TTFT", slo.ttft_s), ("TPOT", slo.tpot_s))
        if limit is not None
    ]
    return f"SLO (the grid's `slo:`): {' and '.join(limits)} per request."


def serving_blocks(serving: pl.DataFrame) -> list[tuple[str, float, pl.DataFrame]]:
    """(model, temperature, its serving cells) of a report, in order."""
    return [
        (model, temperature, part)
        for (model, temperature), part in sorted(
            serving.partition_by("model", "temperature", as_dict=True).items()
        )
    ]


def serving_lines(
    serving: ServingReport | None, methods: list[str], limit: int = ERROR_LIMIT
) -> list[str]:
    """The Serving section (only for a run with serving cells)."""
    if serving is None:
        return []
    lines = ["## Serving", "", SERVING_NOTE, "", slo_sentence(serving.slo), ""]
    lines += [md_text(serving_summary(serving.cells)), ""]
    if serving.errors.height:
        lines += ["Error rows by serving cell and message, most frequent first:", ""]
        lines += [*table_lines(serving_errors_table(serving.errors.head(limit))), ""]
        if serving.errors.height > limit:
            lines += [f"… and {serving.errors.height - limit} more (cell, message) pairs.", ""]
    for model, temperature, part in serving_blocks(serving.cells):
        where = f"{md_text(model)} · T={temperature:g}"
        lines += [f"{where}: throughput and goodput:", ""]
        lines += [*table_lines(serving_table(part, methods, SERVING_THROUGHPUT_COLUMNS)), ""]
        lines += [f"{where}: latency percentiles (seconds, ok requests):", ""]
        lines += [*table_lines(serving_table(part, methods, SERVING_LATENCY_COLUMNS)), ""]
    lines += ["Serving terms:", ""]
    lines += [f"- **{term}**: {text}" for term, text in SERVING_DEFINITIONS]
    return [*lines, ""]


def _metadata(manifest: dict[str, Any]) -> list[str]:
    lines = ["## Run metadata", ""]
    lines += [
        f"- {name}: `{value if value is not None else 'unknown'}`"
        for name, value in run_fields(manifest, "markdown")
    ]
    packages = packages_table(manifest)
    if packages is not None:
        lines += ["", *table_lines(packages)]
    environment = environment_table(manifest)
    if environment is not None:
        lines += ["", "Environment:", "", *table_lines(environment)]
    return [*lines, ""]


def all_methods(
    metrics: pl.DataFrame, manifest: dict[str, Any], serving: pl.DataFrame | None
) -> list[str]:
    """method_order() over the static and the serving cells together."""
    if serving is None or serving.height == 0:
        return method_order(metrics, manifest)
    names = ["method", "base_method"]
    return method_order(pl.concat([metrics.select(names), serving.select(names)]), manifest)


def render_markdown(
    metrics: pl.DataFrame,
    manifest: dict[str, Any],
    details: RunDetails | None = None,
    serving: ServingReport | None = None,
) -> str:
    """The whole report; `metrics` is cell_metrics()'s frame, `manifest` the run's manifest.json,
    `details` run_details()'s (without it the breakdown, energy and error sections are left out),
    `serving` serving.serving_report()'s (the Serving section; none without it).
    """
    run_id = manifest.get("run_id", "unknown run")
    cells = None if serving is None else serving.cells
    lines = [headline(metrics, cells), "", f"# MMSpec report: {md_text(run_id)}", ""]
    if metrics.height:
        lines += [run_summary(metrics, details), ""]
    lines += import_lines(manifest)
    if details is not None:
        lines += error_lines(details)
    merged = merged_cells(metrics, details) if details is not None else None
    if metrics.height:
        methods, found = method_order(metrics, manifest), families(metrics, manifest)
        lines += _taxonomy(methods, found)
        lines += variant_lines(metrics, methods)
        lines += _speedup_by_batch(metrics, methods, found)
        lines += _throughput(metrics, methods)
    if metrics.height and merged is not None:
        lines += viskip_lines(merged)
    lines += _sections(metrics, manifest, merged)
    lines += serving_lines(serving, all_methods(metrics, manifest, cells))
    lines += [LEGEND]
    lines += _metadata(manifest)
    return "\n".join(lines).rstrip() + "\n"
