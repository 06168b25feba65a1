"""report.md from cell metrics and the run manifest.

The first line is the verdict (lossless checks and error rows) so a glance, a CI log or
`head -1` tells whether the run can be trusted before anyone reads a table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl

from mmspec.reports.metrics import ALL_TOPIC
from mmspec.reports.paired import BASELINE

DASH = "–"

LEGEND = """\
## Legend
- **MAT** (MMSpec convention): accepted draft tokens per verification step, bonus token
  excluded: sum(accepted_tokens) / sum(steps). Plain AR decoding scores 0.
- **MAT incl. bonus** (Spec-Bench convention): (sum(accepted_tokens) + sum(steps)) / sum(steps),
  i.e. tokens committed per target forward. Plain AR decoding scores 1.
- **Speedup (global)**: total AR seconds / total method seconds, summed over the (sample, turn,
  repeat) keys that finished ok under both the method and `ar` (same model, batch size,
  temperature).
- **Speedup (paired)**: mean over those same keys of AR seconds / method seconds.
- **Lossless**: share of those keys whose output tokens (SHA-256) equal `ar`'s; greedy
  (temperature 0) only, blank otherwise.
- **all (pooled)**: every topic of the cell pooled (sums over all rows), not a mean of topics.
- Latency p50/p90: per-row `total_s` (batch start to that row finishing); tokens/s =
  sum(new_tokens) / sum(total_s). Error rows are counted, then left out of every other number.
"""


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None:
        return DASH
    return f"{value:{spec}}{suffix}"


def _pct(value: float | None) -> str:
    return _fmt(None if value is None else 100 * value, ".1f", "%")


def _cell(text: Any) -> str:
    # A pipe inside a value would split the table cell.
    return str(text).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _method_order(metrics: pl.DataFrame, manifest: dict[str, Any]) -> list[str]:
    present = set(metrics["method"].to_list())
    grid_methods = (manifest.get("grid") or {}).get("methods") or []
    # The grid's order is the author's order; methods not in it (or no grid) follow, ar first.
    ordered = [m for m in grid_methods if m in present]
    rest = sorted(present - set(ordered), key=lambda m: (m != BASELINE, m))
    return ordered + rest


def _cell_label(row: dict[str, Any]) -> str:
    where = f"batch size {row['batch_size']}, T={row['temperature']:g}"
    return f"{row['method']} on {row['model']} ({where})"


def headline(metrics: pl.DataFrame) -> str:
    """One line: did every lossless check pass, and how many rows errored."""
    totals = metrics.filter(pl.col("topic") == ALL_TOPIC)
    errors = int(totals["errors"].sum()) if totals.height else 0
    error_part = f"Error rows: {errors}."
    if totals.height == 0:
        return f"**No result rows.** {error_part}"
    candidates = totals.filter((pl.col("method") != BASELINE) & (pl.col("temperature") == 0))
    checked = candidates.filter(pl.col("lossless").is_not_null())
    unchecked = candidates.height - checked.height
    failed = checked.filter(pl.col("lossless") < 1.0)
    if checked.height == 0:
        verdict = "**Lossless: not checked** (no greedy cell has ok samples shared with `ar`)."
    elif failed.height:
        parts = [
            f"{_cell_label(r)}: {_pct(r['lossless'])} of {r['paired_keys']} identical"
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


def _topic_table(block: pl.DataFrame, methods: list[str]) -> list[str]:
    topics = [*sorted(set(block["topic"].to_list()) - {ALL_TOPIC}), ALL_TOPIC]
    by_key = {(r["method"], r["topic"]): r for r in block.iter_rows(named=True)}
    header = ["Method", *[f"{ALL_TOPIC} (pooled)" if t == ALL_TOPIC else t for t in topics]]
    rows = []
    for method in methods:
        cells = []
        for topic in topics:
            r = by_key.get((method, topic))
            if r is None:
                cells.append(DASH)
            else:
                cells.append(f"{_fmt(r['MAT'], '.2f')} / {_fmt(r['speedup_global'], '.2f', '×')}")
        rows.append([method, *cells])
    return _table(header, rows)


DETAIL_HEADER = [
    "Method",
    "Samples",
    "Errors",
    "MAT",
    "MAT incl. bonus",
    "Accept rate",
    "Tokens/s",
    "Speedup (global)",
    "Speedup (paired)",
    "Paired keys",
    "p50 s",
    "p90 s",
    "Lossless",
    "Prefill s",
    "Draft s",
    "Verify s",
    "Commit s",
]


def _detail_row(r: dict[str, Any]) -> list[str]:
    return [
        r["method"],
        str(r["samples"]),
        str(r["errors"]),
        _fmt(r["MAT"], ".2f"),
        _fmt(r["MAT_with_bonus"], ".2f"),
        _pct(r["accept_rate"]),
        _fmt(r["tokens_per_s"], ".1f"),
        _fmt(r["speedup_global"], ".2f", "×"),
        _fmt(r["speedup_paired"], ".2f", "×"),
        str(r["paired_keys"]),
        _fmt(r["latency_p50_s"], ".3f"),
        _fmt(r["latency_p90_s"], ".3f"),
        _pct(r["lossless"]),
        _fmt(r["prefill_s_mean"], ".4f"),
        _fmt(r["draft_s_mean"], ".4f"),
        _fmt(r["verify_s_mean"], ".4f"),
        _fmt(r["commit_s_mean"], ".4f"),
    ]


def _detail_table(block: pl.DataFrame, methods: list[str]) -> list[str]:
    totals = {
        r["method"]: r for r in block.filter(pl.col("topic") == ALL_TOPIC).iter_rows(named=True)
    }
    return _table(DETAIL_HEADER, [_detail_row(totals[m]) for m in methods if m in totals])


def _sections(metrics: pl.DataFrame, manifest: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    methods = _method_order(metrics, manifest)
    blocks = metrics.select("model", "temperature", "batch_size").unique().sort(pl.all())
    for model, temperature, batch_size in blocks.iter_rows():
        block = metrics.filter(
            (pl.col("model") == model)
            & (pl.col("temperature") == temperature)
            & (pl.col("batch_size") == batch_size)
        )
        present = [m for m in methods if m in set(block["method"].to_list())]
        lines += [f"## {model} · T={temperature:g} · batch size {batch_size}", ""]
        lines += ["MAT / speedup (global) per topic:", ""]
        lines += [*_topic_table(block, present), ""]
        lines += ["Per method, all topics pooled:", ""]
        lines += [*_detail_table(block, present), ""]
    return lines


def _metadata(manifest: dict[str, Any]) -> list[str]:
    fields = [
        ("Run id", manifest.get("run_id")),
        ("Git sha", manifest.get("git_sha")),
        ("Uncommitted changes", manifest.get("git_dirty")),
        ("Grid sha256", manifest.get("grid_sha256")),
        ("Workload sha256", manifest.get("workload_sha256")),
        ("Host", manifest.get("host")),
        ("Python", manifest.get("python")),
        ("Started at", manifest.get("started_at")),
    ]
    lines = ["## Run metadata", ""]
    lines += [f"- {name}: `{value if value is not None else 'unknown'}`" for name, value in fields]
    packages = manifest.get("packages") or {}
    if packages:
        versions = [(name, v or "not installed") for name, v in sorted(packages.items())]
        lines += ["", *_table(["Package", "Version"], versions)]
    return [*lines, ""]


def render_markdown(metrics: pl.DataFrame, manifest: dict[str, Any]) -> str:
    """The whole report; `metrics` is cell_metrics()'s frame, `manifest` the run's manifest.json."""
    run_id = manifest.get("run_id", "unknown run")
    lines = [headline(metrics), "", f"# MMSpec report: {run_id}", ""]
    lines += _sections(metrics, manifest)
    lines += [LEGEND]
    lines += _metadata(manifest)
    return "\n".join(lines).rstrip() + "\n"
