"""Click commands for `mmspec-orch`: compare, history (add, show) and export.

The CLI mounts them with `main.add_command(...)`. Heavy imports (polars, numpy) happen inside
the commands, so `mmspec-orch --help` and `submit` do not pay for them.

Exit codes: 0 fine; 1 a regression or hard failure (compare), a step change for the worse
(`history show --fail-on-step`); 2 unreadable input (not a run, another schema version).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

EXIT_REGRESSION = 1
EXIT_INVALID = 2

_RUN_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def _invalid(ctx: click.Context, exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    ctx.exit(EXIT_INVALID)


def _input_errors() -> tuple[type[Exception], ...]:
    import polars as pl

    # What reading a run can raise: a bad manifest, a foreign schema version, a broken file.
    return (OSError, ValueError, pl.exceptions.PolarsError)


@click.command()
@click.argument("base", type=_RUN_DIR)
@click.argument("new", type=_RUN_DIR)
@click.option(
    "--threshold",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    help="Relative change a regression must exceed (0.05 = 5%).",
)
@click.option(
    "--min-samples",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Rows per side below which a cell is 'insufficient data', never a regression.",
)
@click.option(
    "--confidence",
    type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Chance that two runs of the same code pass: intervals are Bonferroni-adjusted.",
)
@click.option(
    "--resamples",
    type=click.IntRange(min=100),
    default=1000,
    show_default=True,
    help="Bootstrap resamples (cells under 500 rows; larger ones use closed forms).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option(
    "--allow-missing",
    is_flag=True,
    help="A cell of BASE that NEW lacks is listed, not a failure (runs of different grids).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the Markdown summary to this file.",
)
@click.pass_context
def compare(
    ctx: click.Context,
    base: Path,
    new: Path,
    threshold: float,
    min_samples: int,
    confidence: float,
    resamples: int,
    seed: int,
    allow_missing: bool,
    out: Path | None,
) -> None:
    """Compare run NEW with run BASE cell by cell; exit 1 on a regression or hard failure.

    A regression is a change of speedup, MAT, tokens/s, latency p50/p90/p99 or energy per
    token worse than --threshold whose interval excludes "no change". Hard
    failures: a greedy output of NEW that differs from ar's, more error rows than BASE, a
    cell of BASE missing from NEW (unless --allow-missing).
    """
    from mmspec.reports.compare import compare_runs, render_comparison

    try:
        result = compare_runs(
            base,
            new,
            threshold=threshold,
            min_samples=min_samples,
            resamples=resamples,
            confidence=confidence,
            seed=seed,
            allow_missing=allow_missing,
        )
    except _input_errors() as exc:
        _invalid(ctx, exc)
        return
    text = render_comparison(result)
    click.echo(text, nl=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    if result.failed:
        ctx.exit(EXIT_REGRESSION)


@click.group()
def history() -> None:
    """A Parquet history of runs' cell metrics: trends and step changes."""


_STORE = click.option(
    "--store",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the history dataset (one Parquet file per run).",
)


@history.command("add")
@click.argument("run_dir", type=_RUN_DIR)
@_STORE
@click.option("--machine", help="Name of the machine (default: the run's host).")
@click.pass_context
def history_add(ctx: click.Context, run_dir: Path, store: Path, machine: str | None) -> None:
    """Add RUN_DIR's per-cell metrics to the history (adding it again replaces it)."""
    from mmspec.reports.history import add_run

    try:
        path = add_run(run_dir, store, machine)
    except _input_errors() as exc:
        _invalid(ctx, exc)
        return
    click.echo(f"history: {path}")


@history.command("show")
@_STORE
@click.option("--metric", default="speedup_global", show_default=True)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Previous runs the latest is judged against.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    help="Relative change a step must exceed.",
)
@click.option("--topic", default="all", show_default=True, help="Topic to show; '*' for every one.")
@click.option("--machine", help="Only this machine's runs.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the trends as an SVG file.",
)
@click.option("--fail-on-step", is_flag=True, help="Exit 1 if a cell stepped for the worse.")
@click.pass_context
def history_show(
    ctx: click.Context,
    store: Path,
    metric: str,
    window: int,
    threshold: float,
    topic: str,
    machine: str | None,
    plot: Path | None,
    fail_on_step: bool,
) -> None:
    """Print a trend table per cell and flag step changes (rule: `mmspec.reports.history`)."""
    from mmspec.reports.history import load_history, render_trends, trend_svg, trends

    try:
        found = trends(
            load_history(store),
            metric,
            window=window,
            threshold=threshold,
            topic=None if topic == "*" else topic,
            machine=machine,
        )
    except _input_errors() as exc:
        _invalid(ctx, exc)
        return
    click.echo(render_trends(found, metric, window, threshold), nl=False)
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_text(trend_svg(found, metric), encoding="utf-8")
        click.echo(f"plot: {plot}", err=True)
    if fail_on_step and any(t.regressed for t in found):
        ctx.exit(EXIT_REGRESSION)


@click.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["specbench", "mmspec"]),
    required=True,
    help="Answer layout of Spec-Bench or of MMSpec.",
)
@click.option(
    "--out",
    help="An existing folder or a path without a suffix: one <model_id>.jsonl per (model, "
    "method, batch size, temperature, repeat); a file path (x.jsonl): all in one; -: stdout. "
    "Default: RUN_DIR/export/<format>/.",
)
@click.pass_context
def export(ctx: click.Context, run_dir: Path, fmt: str, out: str | None) -> None:
    """Write RUN_DIR's answers as JSONL in Spec-Bench's or MMSpec's layout."""
    from mmspec.reports.export import export_run

    try:
        if out == "-":
            result = export_run(run_dir, fmt, stream=sys.stdout)
        else:
            result = export_run(run_dir, fmt, out)
    except _input_errors() as exc:
        _invalid(ctx, exc)
        return
    for path in result.files:
        click.echo(f"export: {path}", err=True)
    note = f", {result.skipped_samples} samples left out (errors)" if result.skipped_samples else ""
    click.echo(f"{result.records} records{note}", err=True)
