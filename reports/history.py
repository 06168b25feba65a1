"""A Parquet history of runs' per-cell metrics, trend tables and step-change flags.

Layout: one Parquet file per run, `<store>/<run_id>.parquet`, holding the run's cell metrics
(see metrics.METRIC_COLUMNS) with the run's identity beside every row: run_id, started_at,
git_sha, machine (host unless given), grid name and hash. Adding a run again replaces its file,
so the dataset never holds a run twice; `pl.scan_parquet(f"{store}/*.parquet")` reads it all.

Step changes. A cell's series (one value per run, oldest first, on one machine) is scanned
left to right. Point i is a step when, against the median m of the previous `window` values
of the current segment (at least `min_history` of them),

    |x_i / m - 1| > threshold   and   |x_i - m| > mad_k * 1.4826 * MAD

where MAD is the median absolute deviation of those previous values (1.4826 * MAD estimates
their standard deviation). The first rule ignores changes too small to matter; the second
ignores changes a noisy cell makes on its own. After a step the reference restarts at the
step, so a lasting shift is flagged once, not on every run until the window forgets the old
level. The latest point of a series is judged by the same rule, so a drop in last night's run
is flagged the morning after.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import polars as pl

from mmspec.reports.answer_import import imported_metrics
from mmspec.reports.formatting import DASH, num, signed_pct
from mmspec.reports.markdown import markdown_table
from mmspec.reports.metrics import (
    ALL_TOPIC,
    GROUP_KEYS,
    SETTING_COLUMNS,
    cell_metrics,
    load_rows,
)
from mmspec.results.environment import Environment
from mmspec.results.ids import safe_name
from mmspec.results.layout import manifest_or_empty

RUN_COLUMNS = [
    "run_id",
    "started_at",
    "added_at",
    "git_sha",
    "git_dirty",
    "machine",
    "host",
    "device_name",
    "grid_name",
    "grid_sha256",
]
SERIES_KEYS = ["machine", *GROUP_KEYS]
# What a series is matched on across runs: the method by what ran (registered method and
# resolved arguments, results/variants.py) rather than by what a run called it.
_METHOD, _SETTING = "_series_method", "_series_setting"
_MATCH_KEYS = ["machine", "model", _METHOD, _SETTING, "batch_size", "temperature", "topic"]
DEFAULT_WINDOW = 10
DEFAULT_THRESHOLD = 0.05
DEFAULT_MAD_K = 3.0
MIN_HISTORY = 3
# Metrics where a fall is good news; every other metric is better higher.
LOWER_IS_BETTER = {
    "errors",
    "latency_p50_s",
    "latency_p90_s",
    "latency_p99_s",
    "ttft_p50_s",
    "ttft_p90_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "prefill_s_mean",
    "draft_s_mean",
    "verify_s_mean",
    "commit_s_mean",
}
_SPARK = "▁▂▃▄▅▆▇█"


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp.astimezone(UTC) if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _device_name(run_dir: Path) -> str | None:
    """The device most rows ran on (a GPU model name, or the CPU), if telemetry recorded it."""
    names = (
        load_rows(run_dir)
        .select("device_name")
        .drop_nulls()
        .group_by("device_name")
        .len()
        .sort(["len", "device_name"], descending=[True, False])
        .head(1)
        .collect()
    )
    return names["device_name"][0] if names.height else None


_IDENTITY_SCHEMA = {
    "run_id": pl.String,
    "started_at": pl.Datetime("us", "UTC"),
    "added_at": pl.Datetime("us", "UTC"),
    "git_sha": pl.String,
    "git_dirty": pl.Boolean,
    "machine": pl.String,
    "host": pl.String,
    "device_name": pl.String,
    "grid_name": pl.String,
    "grid_sha256": pl.String,
}
assert list(_IDENTITY_SCHEMA) == RUN_COLUMNS


def run_identity(run_dir: str | Path, machine: str | None = None) -> dict[str, Any]:
    """The RUN_COLUMNS of a run, from its manifest (and its rows, for the device name)."""
    return _identity(Path(run_dir), manifest_or_empty(run_dir), machine)


def _identity(run_dir: Path, manifest: dict[str, Any], machine: str | None) -> dict[str, Any]:
    grid = manifest.get("grid")
    env = Environment.from_manifest(manifest)
    return {
        "run_id": manifest.get("run_id") or run_dir.name,
        "started_at": _parse_time(manifest.get("started_at")),
        "added_at": datetime.now(UTC),
        "git_sha": manifest.get("git_sha"),
        "git_dirty": manifest.get("git_dirty"),
        # Pods of a Kubernetes job get a new host name every night; --machine names the
        # hardware so its nights line up in one series.
        # An imported run has no host: the hardware its importer named stands in for it.
        "machine": machine or manifest.get("host") or (env and env.accelerator) or "unknown",
        "host": manifest.get("host"),
        "device_name": _device_name(run_dir),
        "grid_name": grid.get("name") if isinstance(grid, dict) else None,
        "grid_sha256": manifest.get("grid_sha256"),
    }


def run_history_rows(run_dir: str | Path, machine: str | None = None) -> pl.DataFrame:
    """A run's cell metrics with its identity columns first (the rows `add_run` stores)."""
    return _rows(run_dir, machine)[1]


def _rows(run_dir: str | Path, machine: str | None) -> tuple[dict[str, Any], pl.DataFrame]:
    """The run's identity, and its rows for the store (the manifest read once for both)."""
    manifest = manifest_or_empty(run_dir)
    identity = _identity(Path(run_dir), manifest, machine)
    ids = pl.DataFrame([identity], schema=_IDENTITY_SCHEMA)
    metrics = imported_metrics(cell_metrics(load_rows(run_dir)), manifest)
    return identity, ids.join(metrics, how="cross")


def history_file(store: str | Path, run_id: str) -> Path:
    """Where a run's rows live in the store: one file per run, named by its id."""
    return Path(store) / f"{safe_name(run_id)}.parquet"


def add_run(run_dir: str | Path, store: str | Path, machine: str | None = None) -> Path:
    """Write (or replace) the run's file in the store; returns its path."""
    identity, frame = _rows(run_dir, machine)
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    path = history_file(store, identity["run_id"])
    # Written under a hidden temp name, then renamed: a reader never sees half a file, and the
    # glob of `load_history` skips the temp name.
    fd, tmp = tempfile.mkstemp(dir=store, prefix=".", suffix=".parquet.tmp")
    os.close(fd)
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_history(store: str | Path) -> pl.DataFrame:
    """Every stored run's rows, oldest run first (empty when the store holds none)."""
    files = sorted(p for p in Path(store).glob("*.parquet") if not p.name.startswith("."))
    if not files:
        return pl.DataFrame()
    frame = pl.concat([pl.read_parquet(p) for p in files], how="diagonal_relaxed")
    return frame.sort(
        pl.coalesce("started_at", "added_at"), "run_id", maintain_order=True, nulls_last=True
    )


# ----------------------------------------------------------------------------- step changes


@dataclass(frozen=True)
class StepChange:
    """A point of a series that departs from the level before it (see the module doc)."""

    index: int  # position in the series
    reference: float  # median of the previous values of its segment
    value: float
    change: float  # value / reference - 1


def detect_steps(
    values: Sequence[float],
    window: int = DEFAULT_WINDOW,
    threshold: float = DEFAULT_THRESHOLD,
    mad_k: float = DEFAULT_MAD_K,
    min_history: int = MIN_HISTORY,
) -> list[StepChange]:
    """Step changes of a series, oldest first (the rule is in the module doc)."""
    steps: list[StepChange] = []
    start = 0  # first index of the current segment
    for i, value in enumerate(values):
        previous = values[max(start, i - window) : i]
        if len(previous) < min_history:
            continue
        reference = statistics.median(previous)
        if reference == 0:
            continue
        mad = statistics.median(abs(v - reference) for v in previous)
        change = value / reference - 1
        if abs(change) > threshold and abs(value - reference) > mad_k * 1.4826 * mad:
            steps.append(StepChange(i, float(reference), float(value), float(change)))
            start = i
    return steps


@dataclass(frozen=True)
class Trend:
    """One cell's series of a metric across runs, and its step changes."""

    # machine and the cell's GROUP_KEYS ("method": the latest run's name for it), and
    # "setting": the arguments it ran with ("" for runs that did not record them)
    key: dict[str, Any]
    run_ids: tuple[str, ...]
    values: tuple[float, ...]
    steps: tuple[StepChange, ...]
    window: int
    lower_is_better: bool

    @property
    def reference(self) -> float | None:
        """Median of the (up to `window`) values before the latest one."""
        previous = self.values[-self.window - 1 : -1]
        return statistics.median(previous) if previous else None

    @property
    def change(self) -> float | None:
        ref = self.reference
        return None if not ref else self.values[-1] / ref - 1

    @property
    def recent_step(self) -> StepChange | None:
        """The last step within the latest `window` runs, if any."""
        if self.steps and self.steps[-1].index >= len(self.values) - self.window:
            return self.steps[-1]
        return None

    @property
    def regressed(self) -> bool:
        """A recent step in the bad direction for this metric."""
        step = self.recent_step
        if step is None:
            return False
        return step.change > 0 if self.lower_is_better else step.change < 0


def trends(
    history: pl.DataFrame,
    metric: str = "speedup_global",
    window: int = DEFAULT_WINDOW,
    threshold: float = DEFAULT_THRESHOLD,
    topic: str | None = ALL_TOPIC,
    machine: str | None = None,
    mad_k: float = DEFAULT_MAD_K,
) -> list[Trend]:
    """Per (machine, cell): the metric's series over runs and its step changes.

    `topic=None` keeps every topic; runs where the metric is null (no data) are left out.
    """
    if history.is_empty():
        return []
    if metric not in history.columns:
        raise ValueError(f"unknown metric {metric!r}; stored: {', '.join(history.columns)}")
    frame = history.filter(pl.col(metric).is_not_null())
    if topic is not None:
        frame = frame.filter(pl.col("topic") == topic)
    if machine is not None:
        frame = frame.filter(pl.col("machine") == machine)
    found = []
    # maintain_order keeps the rows of each series in run order (the history is sorted).
    matched = _series_identity(frame)
    for _, part in matched.partition_by(_MATCH_KEYS, as_dict=True, maintain_order=True).items():
        series = [float(v) for v in part[metric]]
        latest = part.row(-1, named=True)
        key = {k: latest[k] for k in SERIES_KEYS}
        found.append(
            Trend(
                key={**key, "setting": latest[_SETTING]},
                run_ids=tuple(part["run_id"]),
                values=tuple(series),
                steps=tuple(detect_steps(series, window, threshold, mad_k)),
                window=window,
                lower_is_better=metric in LOWER_IS_BETTER,
            )
        )
    found.sort(key=lambda t: tuple(str(t.key[k]) for k in [*SERIES_KEYS, "setting"]))
    return found


def _series_identity(history: pl.DataFrame) -> pl.DataFrame:
    """`history` with _MATCH_KEYS' method and setting: the registered method and resolved
    arguments. A run that did not record them (from before variants; stored before this
    column existed) takes those of the next run with the same name for the cell, so a
    nightly series does not break in two where recording began; none after it: the name."""
    missing = [pl.lit(None, pl.String).alias(c) for c in SETTING_COLUMNS if c not in history]
    frame = history.with_columns(missing) if missing else history
    by_name = ["machine", *GROUP_KEYS]
    known = pl.col("method_args").is_not_null()
    base = pl.when(known).then(pl.coalesce("base_method", "method"))
    return frame.with_columns(
        pl.coalesce(base.backward_fill().over(by_name), "method").alias(_METHOD),
        pl.col("method_args").backward_fill().over(by_name).fill_null("").alias(_SETTING),
    )


# ----------------------------------------------------------------------------- output


def sparkline(values: Sequence[float]) -> str:
    """Unicode bars scaled between the series' min and max (flat: a row of middles)."""
    if not values:
        return ""
    low, high = min(values), max(values)
    if high == low:
        return _SPARK[3] * len(values)
    top = len(_SPARK) - 1
    return "".join(_SPARK[round((v - low) / (high - low) * top)] for v in values)


def render_trends(found: Sequence[Trend], metric: str, window: int, threshold: float) -> str:
    """A Markdown trend table; its first line says whether any cell moved recently."""
    flagged = [t for t in found if t.recent_step is not None]
    bad = [t for t in flagged if t.regressed]
    if not found:
        first = f"**History: no runs with {metric}.**"
    elif bad:
        first = f"**History: {len(bad)} cell(s) regressed in {metric}** (step change)."
    elif flagged:
        first = f"**History: {len(flagged)} cell(s) changed in {metric}**, none for the worse."
    else:
        first = f"**History: {metric} stable** in {len(found)} cell(s)."
    lines = [
        first,
        "",
        f"Step rule: latest vs the median of up to {window} previous runs; a step is a change "
        f"beyond {100 * threshold:g}% and beyond {DEFAULT_MAD_K:g} robust standard deviations "
        "(1.4826 x MAD) of those runs.",
        "",
    ]
    rows = []
    labels = _method_labels(found)
    for t in found:
        step = t.recent_step
        flag = DASH
        if step is not None:
            arrow = "▼" if step.change < 0 else "▲"
            flag = f"{arrow} {signed_pct(step.change)} at {t.run_ids[step.index]}"
            flag += " (regression)" if t.regressed else ""
        ref, change = t.reference, t.change
        rows.append(
            (
                t.key["machine"],
                t.key["model"],
                labels[id(t)],
                t.key["batch_size"],
                f"{t.key['temperature']:g}",
                t.key["topic"],
                len(t.values),
                num(t.values[-1], ".4g"),
                num(ref, ".4g"),
                signed_pct(change),
                sparkline(t.values[-2 * window :]),
                flag,
            )
        )
    header = ("machine", "model", "method", "batch", "T", "topic", "runs", "latest")
    header += (f"median prev {window}", "change", "trend", "step")
    # Names and numbers, printed exactly as the runs spell them.
    lines += markdown_table(header, rows, one_line=False)
    return "\n".join(lines) + "\n"


def _method_labels(found: Sequence[Trend]) -> dict[int, str]:
    """Each trend's method as the table shows it: its name, and where two series share one
    (a method whose arguments changed between runs) a short digest of the arguments."""
    shown = SERIES_KEYS
    counts: dict[tuple[Any, ...], int] = {}
    for t in found:
        key = tuple(t.key[k] for k in shown)
        counts[key] = counts.get(key, 0) + 1
    labels = {}
    for t in found:
        name = str(t.key["method"])
        if counts[tuple(t.key[k] for k in shown)] > 1:
            digest = hashlib.sha256(str(t.key.get("setting", "")).encode()).hexdigest()[:8]
            name += f" (args {digest})"
        labels[id(t)] = name
    return labels


def _panel(t: Trend, x0: int, y0: int, width: int, height: int) -> list[str]:
    """One cell's small chart: frame, title, value range, the series and its steps."""
    pad = 24
    low, high = min(t.values), max(t.values)
    span = (high - low) or abs(high) or 1.0
    last = max(1, len(t.values) - 1)
    points = [
        (
            x0 + pad + (width - 2 * pad) * i / last,
            y0 + pad + (height - 2 * pad) * (1 - (v - low) / span),
        )
        for i, v in enumerate(t.values)
    ]
    k = t.key
    title = f"{k['model']} · {k['method']} · b{k['batch_size']} · T{k['temperature']:g}"
    if k["topic"] != ALL_TOPIC:
        title += f" · {k['topic']}"
    parts = [
        f'<rect x="{x0 + 2}" y="{y0 + 2}" width="{width - 4}" height="{height - 4}" '
        'fill="none" stroke="#ddd"/>',
        f'<text x="{x0 + 8}" y="{y0 + 14}">{escape(title, quote=False)}</text>',
        f'<text x="{x0 + 8}" y="{y0 + height - 8}">{low:.4g} – {high:.4g}</text>',
        '<polyline points="'
        + " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        + '" fill="none" stroke="#1f77b4"/>',
    ]
    for step in t.steps:
        x, y = points[step.index]
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="#d62728"/>')
    return parts


def trend_svg(found: Sequence[Trend], metric: str, columns: int = 3) -> str:
    """Small multiples, one panel per cell: the series, its steps as red dots. Plain SVG."""
    width, height, top = 300, 120, 30
    rows = max(1, -(-len(found) // columns))
    total_w, total_h = columns * width, rows * height + top
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
        f'viewBox="0 0 {total_w} {total_h}" font-family="sans-serif" font-size="10">',
        f'<text x="8" y="18" font-size="14">{escape(metric, quote=False)} per run</text>',
    ]
    for n, t in enumerate(found):
        x0, y0 = (n % columns) * width, top + (n // columns) * height
        parts += _panel(t, x0, y0, width, height)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
