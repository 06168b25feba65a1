"""`mmspec-orch`: submit a grid (or resume a run) and write its report; import the references'
answer files as a run.

A Ray Jobs address (`--address http://HEAD:8265`, or RAY_ADDRESS set to one) submits the run as
a Ray Job instead and prints its run id, which `status`, `logs` and `cancel` take (jobs.py).

Every failure the user can cause or fix is one line on stderr and an exit code, never a
traceback. Exit codes:
  0  done (or submitted).
  1  the run could not finish, or finished with errors: some shards were recorded as error
     rows, the report failed, a followed job did not succeed, or results could not be written
     mid-run (a full disk: the line then ends with the exact `mmspec-orch submit --resume
     RUN_DIR` that finishes it; every shard already written is complete and kept).
  2  input, and nothing was started: the grid, workloads, answer files or run directory are
     invalid, the output folder cannot be written (checked at validation, so `--dry-run` says
     so too), another `submit` holds the run directory (the line names its host and pid), or
     the Jobs server cannot be reached or has no such run.
"""

from __future__ import annotations

import logging
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from mmspec.orchestrator import jobs
from mmspec.orchestrator.grid import (
    Grid,
    GridError,
    check_streams,
    chunk_size,
    expand,
    grid_sha256,
    load_grid,
    make_shards,
    parse_grid,
)
from mmspec.orchestrator.manifest import build_manifest
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.store import (
    RunLock,
    StoreError,
    check_writable,
    create_run_dir,
    os_error_text,
    remove_stale_tmp,
    write_manifest,
    write_shard,
)
from mmspec.orchestrator.workload_config import load_samples, workload_error_types
from mmspec.reports.commands import compare, export, history
from mmspec.results.cells import Cell
from mmspec.results.ids import load_id
from mmspec.results.layout import MANIFEST, LayoutError, completed_shards, read_manifest
from mmspec.results.variants import arg_text, variants_of
from mmspec.workloads.fingerprint import workload_sha256
from mmspec.workloads.sample import Sample

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_INVALID = 2
_PIPE_WIDTH = 200


@dataclass(frozen=True)
class Hooks:
    """What a caller may swap, passed as click's `obj`: `invoke(main, args, obj=Hooks(...))`."""

    runner_cls: type | None = None  # built inside every worker actor; None = ShardRunner


class _Invalid(Exception):
    """Input problem: print the message, exit 2, start nothing."""


class _Unwritable(Exception):
    """Results could not be written mid-run: print the message, exit 1; `--resume` finishes."""


@click.group()
def main() -> None:
    """Benchmark speculative decoding for vision-language models on Ray."""


@main.command()
@click.argument("grid_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--local", is_flag=True, help="Start a private Ray node on 127.0.0.1.")
@click.option(
    "--address",
    help="Join this Ray cluster (default: $RAY_ADDRESS, else local); "
    "an http(s):// address submits a Ray Job there.",
)
@click.option("--dry-run", is_flag=True, help="Print the cells and shards; run nothing.")
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Finish an earlier run: rerun only shards without a result file.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Results root.")
@click.option(
    "--no-upload",
    is_flag=True,
    help="Ray Jobs: do not upload the grid's folder; the cluster sees this machine's paths.",
)
@click.option(
    "--env",
    "env_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Ray Jobs: set this variable for the job (visible in the dashboard: no secrets).",
)
@click.pass_context
def submit(
    ctx: click.Context,
    grid_file: Path | None,
    local: bool,
    address: str | None,
    dry_run: bool,
    resume_dir: Path | None,
    out: Path | None,
    no_upload: bool,
    env_pairs: tuple[str, ...],
) -> None:
    """Validate GRID_FILE, run every shard on Ray, write results and the report."""
    hooks = ctx.obj if isinstance(ctx.obj, Hooks) else Hooks()
    if local and address:
        raise click.UsageError("give --local or --address, not both")
    if grid_file is None and resume_dir is None:
        raise click.UsageError("give a GRID_FILE, or --resume RUN_DIR")
    if resume_dir is not None and out is not None:
        raise click.UsageError("--out does not apply to --resume (the run directory is fixed)")
    jobs_address = jobs.submit_target(local, address)
    if jobs_address is None and (no_upload or env_pairs):
        raise click.UsageError("--no-upload and --env apply to a Ray Jobs address (http://...)")
    env = _env_vars(env_pairs)

    with _cli_logging():
        if jobs_address is not None and not dry_run:
            ctx.exit(_submit_job(jobs_address, grid_file, resume_dir, out, not no_upload, env))
        try:
            grid, grid_text, manifest = _read_grid(grid_file, resume_dir, out)
            check_writable(resume_dir if resume_dir is not None else grid.out)
            samples = _load_workloads(grid)
            check_streams(grid, samples)  # a poisson stream's requests <= samples loaded
            if manifest is not None and workload_sha256(samples) != manifest.get("workload_sha256"):
                raise _Invalid(
                    f"{resume_dir}: the workloads changed since the run started "
                    "(workload_sha256 differs); start a new run instead"
                )
        except (_Invalid, GridError, LayoutError) as exc:
            click.echo(str(exc), err=True)
            ctx.exit(EXIT_INVALID)

        if dry_run:
            run_id = manifest["run_id"] if manifest else "dry-run"
            shards = make_shards(expand(grid), samples, run_id, grid.shard_size)
            done = completed_shards(resume_dir) if resume_dir else set()
            _print_plan(grid, shards, samples, done)
            return

        try:
            lock = _claim_run(resume_dir, grid, grid_text, samples)
        except LayoutError as exc:
            click.echo(str(exc), err=True)
            ctx.exit(EXIT_INVALID)
        with lock:  # from before the first write until the report is written
            ctx.exit(_finish_run(lock, grid, samples, local, address, hooks))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.pass_context
def report(ctx: click.Context, run_dir: Path) -> None:
    """Write RUN_DIR's report and print its markdown."""
    if not _report(run_dir, echo_markdown=True):
        ctx.exit(EXIT_FAILED)


@main.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mmspec", "specbench"]),
    required=True,
    help="Answer layout: MMSpec's (results/<model>/mmspec_<split>/<method>-temperature-<t>"
    ".jsonl) or Spec-Bench's (data/<bench>/model_answer/<model_id>.jsonl).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Results root: the run lands in OUT/<name>-<UTC timestamp>/.",
)
@click.option("--name", help="Run folder prefix (default: <format>-<model>-<workload>).")
@click.option(
    "--model",
    help="Model name for the rows, e.g. llava-1.5-7b to line up with our runs (default, "
    "MMSpec: the folder above mmspec_<split>; Spec-Bench: required).",
)
@click.option(
    "--workload",
    help="Workload name (default: the split, mmspec_test -> test, as our grids name "
    "/data/MMSpec/test; Spec-Bench: data/<bench>/model_answer -> <bench>).",
)
@click.option(
    "--baseline",
    default="baseline",
    show_default=True,
    help="The file name (before -temperature-<t>) of plain decoding, imported as ar.",
)
@click.option(
    "--method",
    "renames",
    multiple=True,
    metavar="NAME=METHOD",
    help="Import the file named NAME as METHOD (repeatable), e.g. "
    "vicuna-7b-v1.3-eagle-float16=eagle.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Temperature of files whose name carries none.",
)
@click.option(
    "--gpu",
    "gpus",
    multiple=True,
    help="GPU the answers were measured on, for the manifest (repeatable; default unknown).",
)
@click.option("--cpu", help="CPU the answers were measured on, for the manifest.")
@click.pass_context
def import_answers(
    ctx: click.Context,
    paths: tuple[Path, ...],
    fmt: str,
    out: Path,
    name: str | None,
    model: str | None,
    workload: str | None,
    baseline: str,
    renames: tuple[str, ...],
    temperature: float,
    gpus: tuple[str, ...],
    cpu: str | None,
) -> None:
    """Import MMSpec or Spec-Bench answer files as a run, then write its report.

    PATHS are .jsonl answer files, or folders whose .jsonl files are taken (one method per
    file). Nothing is written unless every file reads cleanly; a bad file stops the import
    with its path, line and key (exit 2).
    """
    # imported on use: the importer loads polars, which `submit` validation does not need
    from mmspec.reports.answer_import import AnswerFileError, ImportSettings
    from mmspec.reports.answer_import import import_answers as run_import

    settings = ImportSettings(
        fmt=fmt,
        model=model,
        workload=workload,
        baseline=baseline,
        renames=_pairs(renames, "--method", "NAME=METHOD"),
        temperature=temperature,
        name=name,
        gpus=gpus,
        cpu=cpu,
    )
    try:
        result = run_import(paths, out, settings)
    except (AnswerFileError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_INVALID)
    methods = ", ".join(f.method for f in result.files)
    click.echo(f"run: {result.run_dir} ({result.rows:,} rows; methods {methods})", err=True)
    if not result.has_baseline:
        click.echo(
            f"note: no file is named {baseline!r}, so nothing was imported as ar: the report "
            "has no speedups or lossless checks (name the baseline file with --baseline)",
            err=True,
        )
    if not _report(result.run_dir, echo_markdown=False):
        ctx.exit(EXIT_FAILED)


_jobs_address_option = click.option(
    "--address", help="The Ray Jobs server, http://HEAD:8265 (default: $RAY_ADDRESS)."
)


@main.command()
@click.argument("run_id")
@_jobs_address_option
@click.pass_context
def status(ctx: click.Context, run_id: str, address: str | None) -> None:
    """Show a Ray Job run's state and where its results are."""
    try:
        found = jobs.run_status(jobs.query_target(address), run_id)
    except jobs.JobsError as exc:
        click.echo(str(exc), err=True)
        ctx.exit(EXIT_INVALID)
    message = f" ({found.message})" if found.message else ""
    click.echo(f"run:        {found.run_id}")
    click.echo(f"status:     {found.status}{message}")
    click.echo(f"entrypoint: {found.entrypoint}")
    click.echo(f"started:    {_when(found.start_time)}")
    click.echo(f"ended:      {_when(found.end_time)}")
    click.echo(f"results:    {found.run_dir or '-'}")


@main.command()
@click.argument("run_id")
@_jobs_address_option
@click.option("--follow", is_flag=True, help="Stream the log until the run ends.")
@click.pass_context
def logs(ctx: click.Context, run_id: str, address: str | None, follow: bool) -> None:
    """Print a Ray Job run's log (its driver's stdout and stderr)."""
    try:
        target = jobs.query_target(address)
        if not follow:
            click.echo(jobs.run_logs(target, run_id), nl=False)
            return
        final = jobs.follow_logs(target, run_id, lambda chunk: click.echo(chunk, nl=False))
    except jobs.JobsError as exc:
        click.echo(str(exc), err=True)
        ctx.exit(EXIT_INVALID)
    click.echo(f"{run_id}: {final}", err=True)
    if final != "SUCCEEDED":
        ctx.exit(EXIT_FAILED)


@main.command()
@click.argument("run_id")
@_jobs_address_option
@click.pass_context
def cancel(ctx: click.Context, run_id: str, address: str | None) -> None:
    """Stop a Ray Job run; finished shards stay on disk for `submit --resume`."""
    try:
        stopped = jobs.cancel_run(jobs.query_target(address), run_id)
    except jobs.JobsError as exc:
        click.echo(str(exc), err=True)
        ctx.exit(EXIT_INVALID)
    if stopped:
        click.echo(f"{run_id}: stop requested; finish it later with `submit --resume RUN_DIR`")
    else:
        click.echo(f"{run_id}: not running, nothing to stop")


# ----------------------------------------------------------------------------- steps


def _read_grid(
    grid_file: Path | None, resume_dir: Path | None, out: Path | None
) -> tuple[Grid, str | None, dict[str, Any] | None]:
    """(grid, its text, the manifest when resuming); a resumed run's grid is its manifest's."""
    if resume_dir is None:
        assert grid_file is not None
        grid = load_grid(grid_file)
        if out is not None:
            grid = replace(grid, out=str(out))
        return grid, grid_file.read_text(encoding="utf-8"), None
    manifest = read_manifest(resume_dir)
    from mmspec.reports.answer_import import IMPORTED  # on use: it loads polars

    if IMPORTED in manifest:
        raise _Invalid(f"{resume_dir}: an imported run, complete as imported; nothing to resume")
    grid = parse_grid(manifest.get("grid"), source=str(resume_dir / MANIFEST))
    if grid_file is not None and grid_sha256(load_grid(grid_file)) != manifest.get("grid_sha256"):
        raise _Invalid(f"{grid_file}: differs from the grid of {resume_dir}; cannot resume with it")
    _check_settings(resume_dir, grid, manifest)
    return grid, None, manifest


def _check_settings(resume_dir: Path, grid: Grid, manifest: dict[str, Any]) -> None:
    """A resumed run's methods must run with the arguments its first part ran with: a default
    changed since (an upgrade) would file rows of another setting under the same cells."""
    recorded = variants_of(manifest)  # {} for a run from before variants: nothing to check
    for variant in grid.variants:
        before = recorded.get(variant.name)
        if before is None or before.resolved_json == variant.resolved_json:
            continue
        then, now = before.resolved, variant.resolved
        name = next(k for k in [*then, *now] if then.get(k, ...) != now.get(k, ...))
        raise _Invalid(
            f"{resume_dir}: {variant.name} would run with other arguments than the run started "
            f"with ({name}: {_brief(then.get(name, '(none)'))} then, "
            f"{_brief(now.get(name, '(none)'))} now; a default changed?); start a new run instead"
        )


def _brief(value: Any) -> str:
    text = arg_text(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _claim_run(
    resume_dir: Path | None, grid: Grid, grid_text: str | None, samples: dict[str, list[Sample]]
) -> RunLock:
    """The run directory, locked by this process: the resumed one (its stale temp files
    removed), or a new one with its manifest. StoreError (one line) if it cannot be."""
    if resume_dir is not None:
        lock = RunLock(resume_dir).acquire()
        try:
            remove_stale_tmp(lock)
        except OSError as exc:
            lock.release()
            raise StoreError(f"cannot write in {resume_dir}: {os_error_text(exc)}") from None
        return lock
    try:
        run_dir = create_run_dir(grid.out, grid.name)
    except OSError as exc:
        raise StoreError(f"cannot write results in {grid.out}: {os_error_text(exc)}") from None
    lock = RunLock(run_dir)
    try:
        lock.acquire()
        write_manifest(run_dir, build_manifest(run_dir.name, grid, samples, grid_text))
    except (OSError, StoreError) as exc:
        # nothing ran and nothing can resume a run without its manifest: leave no husk
        lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)
        reason = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        raise StoreError(f"cannot start a run in {grid.out}: {reason}") from None
    return lock


def _finish_run(
    lock: RunLock,
    grid: Grid,
    samples: dict[str, list[Sample]],
    local: bool,
    address: str | None,
    hooks: Hooks,
) -> int:
    """Run the shards the locked run directory lacks, then write its report; the exit code."""
    run_dir = lock.run_dir
    shards = make_shards(expand(grid), samples, run_dir.name, grid.shard_size)
    done = completed_shards(run_dir)
    todo = [s for s in shards if s.shard_id not in done]
    click.echo(f"run: {run_dir} ({len(todo)} of {len(shards)} shards to run)", err=True)
    try:
        failed = _run_shards(todo, grid, run_dir, local, address, hooks) if todo else 0
    except _Invalid as exc:
        click.echo(str(exc), err=True)
        return EXIT_INVALID
    except _Unwritable as exc:
        click.echo(str(exc), err=True)
        return EXIT_FAILED
    report_ok = _report(run_dir, echo_markdown=False)
    return EXIT_FAILED if failed or not report_ok else 0


def _resume_command(run_dir: Path) -> str:
    return f"mmspec-orch submit --resume {shlex.quote(str(run_dir))}"


def _load_workloads(grid: Grid) -> dict[str, list[Sample]]:
    """Every workload's samples, loaded once in the driver."""
    samples: dict[str, list[Sample]] = {}
    for i, config in enumerate(grid.workloads):
        try:
            loaded = load_samples(config)
        except workload_error_types() as exc:
            raise _Invalid(f"{grid.source}: workloads[{i}]: {exc}") from None
        if not loaded:
            raise _Invalid(f"{grid.source}: workloads[{i}]: workload {config.name!r} is empty")
        samples[config.name] = loaded
    return samples


def _print_plan(
    grid: Grid, shards: list[Shard], samples: dict[str, list[Sample]], done: set[str]
) -> None:
    per_cell: dict[str, int] = {}
    samples_of: dict[str, int] = {}  # a poisson stream runs only its first `requests`
    for shard in shards:
        per_cell[shard.cell.cell_id] = per_cell.get(shard.cell.cell_id, 0) + 1
        samples_of[shard.cell.cell_id] = samples_of.get(shard.cell.cell_id, 0) + len(shard.samples)
    cells = expand(grid)
    table = Table(title=f"grid {grid.name}: cells")
    for column in ("model", "method", "batch", "temp", "repeat", "workload", "samples", "shards"):
        justify = "right" if column in ("samples", "shards") else "left"
        table.add_column(column, justify=justify, overflow="fold")  # never crop an id
    for cell in cells:
        table.add_row(
            escape(cell.model.id),
            escape(cell.method),
            # a serving cell's load as its id spells it: cc4, poisson2x8
            load_id(cell.scenario, cell.batch_size, cell.rate)
            if cell.serving
            else str(cell.batch_size),
            f"{cell.temperature:g}",
            str(cell.repeat),
            escape(cell.workload),
            str(samples_of.get(cell.cell_id, len(samples[cell.workload]))),
            str(per_cell.get(cell.cell_id, 0)),
        )
    console = Console()
    if not console.is_terminal:  # a log or a pipe: no reason to squeeze into 80 columns
        console.width = max(console.width, _PIPE_WIDTH)
    console.print(table)
    swept = [v for v in grid.variants if v.name != v.method]
    if swept:
        console.print(_variant_table(grid, cells, per_cell))
    todo = sum(s.shard_id not in done for s in shards)
    sizes = sorted({chunk_size(grid.shard_size, b) for b in grid.batch_sizes})
    variants = f"; {len(swept)} method variants" if swept else ""
    click.echo(
        f"{len(per_cell)} cells, {len(shards)} shards ({todo} to run), "
        f"samples per shard: {', '.join(map(str, sizes))}{variants}"
    )


def _variant_table(grid: Grid, cells: list[Cell], per_cell: dict[str, int]) -> Table:
    """The variants the grid expands to: what each runs, with which arguments, in how many
    cells and shards."""
    table = Table(title=f"grid {grid.name}: method variants")
    for column in ("variant", "method", "arguments", "cells", "shards"):
        justify = "right" if column in ("cells", "shards") else "left"
        table.add_column(column, justify=justify, overflow="fold")
    for variant in grid.variants:
        if variant.name == variant.method:
            continue
        mine = [c for c in cells if c.method == variant.name]
        args = ", ".join(f"{k}={arg_text(v)}" for k, v in variant.args.items())
        table.add_row(
            escape(variant.name),
            escape(variant.method),
            escape(args or "(defaults)"),
            str(len(mine)),
            str(sum(per_cell.get(c.cell_id, 0) for c in mine)),
        )
    return table


def _run_shards(
    shards: list[Shard], grid: Grid, run_dir: Path, local: bool, address: str | None, hooks: Hooks
) -> int:
    """Run the shards on Ray, writing each result as it arrives; returns failed shards."""
    from mmspec.orchestrator.progress import ShardProgress
    from mmspec.orchestrator.ray_session import ray_session

    if hooks.runner_cls is None:
        _prepare_models(grid)
    with ray_session(local=local, address=address) as session:
        # imported here: Ray must be imported after ray_session chose the node address
        from mmspec.orchestrator.scheduler import (
            Scheduler,
            SchedulerSettings,
            SchedulingError,
            plan_slots,
        )

        try:
            slots, use_gpu = plan_slots(
                session.resources,
                grid.workers,
                grid.threads_per_worker,
                grid.gpus_per_worker,
                session.nodes,
            )
        except SchedulingError as exc:
            raise _Invalid(
                f"{exc}. Nothing ran; the run directory {run_dir} is kept: "
                f"`{_resume_command(run_dir)}` on a cluster that fits"
            ) from None
        log.info("ray %s: %d worker slot(s), %s", session.mode, slots, "GPU" if use_gpu else "CPU")
        settings = SchedulerSettings(
            slots,
            use_gpu,
            grid.threads_per_worker,
            gpus_per_worker=grid.gpus_per_worker,
            shard_timeout_s=grid.shard_timeout_s,
        )
        with ShardProgress(shards) as progress:

            def sink(shard: Shard, table: pa.Table, telemetry: pa.Table | None) -> None:
                try:
                    write_shard(run_dir, shard, table, telemetry)
                except OSError as exc:  # the disk, not the shard: stop; every file is whole
                    raise _Unwritable(
                        f"cannot write results in {run_dir}: {os_error_text(exc)}; every shard "
                        f"written so far is complete and kept: once that is fixed, finish the "
                        f"run with `{_resume_command(run_dir)}`"
                    ) from None
                progress.advance(shard, table)

            summary = Scheduler(settings, runner_cls=_runner_cls(hooks)).run(shards, sink)
    click.echo(
        f"{summary.shards} shards written, {summary.failed} failed, "
        f"{summary.retries} retries, {summary.actors_started} model loads",
        err=True,
    )
    return summary.failed


def _submit_job(
    address: str,
    grid_file: Path | None,
    resume_dir: Path | None,
    out: Path | None,
    upload: bool,
    env: dict[str, str],
) -> int:
    """Validate here, submit as a Ray Job, print the run id (stdout) and how to follow it."""
    try:
        if resume_dir is not None:
            if grid_file is not None:
                raise _Invalid("with a Ray Jobs address give --resume RUN_DIR alone (no GRID_FILE)")
            spec = jobs.resume_job(resume_dir, env)
        else:
            assert grid_file is not None
            grid, _, _ = _read_grid(grid_file, None, None)
            _load_workloads(grid)
            spec = jobs.grid_job(grid, grid_file, out, upload, env)
        run_id = jobs.submit(address, spec)
    except (_Invalid, GridError, jobs.JobsError) as exc:
        click.echo(str(exc), err=True)
        return EXIT_INVALID
    click.echo(run_id)
    click.echo(
        f"submitted to {address}: {spec.entrypoint}\n"
        f"follow it: mmspec-orch status {run_id} --address {address}\n"
        f"           mmspec-orch logs {run_id} --follow --address {address}",
        err=True,
    )
    return 0


def _env_vars(pairs: tuple[str, ...]) -> dict[str, str]:
    return _pairs(pairs, "--env", "KEY=VALUE")


def _pairs(pairs: tuple[str, ...], option: str, form: str) -> dict[str, str]:
    """`A=B` option values as a dict; a usage error (exit 2) for one without `=` or a key."""
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"{option} {pair!r}: expected {form}")
        found[key] = value
    return found


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def _prepare_models(grid: Grid) -> None:
    """Build the tiny models once here, not concurrently in every worker of this node."""
    from mmspec.models.loader import resolve_model_source

    for model in grid.models:
        resolve_model_source(model.id)


def _runner_cls(hooks: Hooks) -> type:
    if hooks.runner_cls is not None:
        return hooks.runner_cls
    # imported on use: it pulls in torch and transformers, which validation does not need
    from mmspec.orchestrator.runner import ShardRunner

    return ShardRunner


def _report(run_dir: Path, echo_markdown: bool) -> bool:
    """Call mmspec.reports.write_report; print the report's path (or its markdown)."""
    try:
        from mmspec.reports import write_report
    except ImportError:
        click.echo(f"reports are not available in this install; results are in {run_dir}", err=True)
        return False
    try:
        result = write_report(run_dir)
    except Exception as exc:  # the results are safe on disk; say how to retry
        click.echo(f"report failed: {exc}\nretry with: mmspec-orch report {run_dir}", err=True)
        return False
    path = _markdown_path(result, run_dir)
    html = path.with_name("report.html")
    if echo_markdown:
        click.echo(path.read_text(encoding="utf-8"))
        click.echo(f"html: {html}", err=True)  # stdout stays exactly the markdown
    else:
        click.echo(f"report: {path}")
        click.echo(f"report: {html}")
    return True


def _markdown_path(result: object, run_dir: Path) -> Path:
    path = Path(result) if isinstance(result, str | Path) else run_dir
    if path.is_dir():
        return path / "report.md"
    return path if path.suffix == ".md" else path.with_name("report.md")


@contextmanager
def _cli_logging() -> Iterator[None]:
    """Show mmspec's info logs on stderr for the command, then put logging back as it was."""
    logger = logging.getLogger("mmspec")
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# Report-side commands live with the reports; registered here so there is one CLI.
main.add_command(compare)
main.add_command(history)
main.add_command(export)


@main.command(
    "train-drafter",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def train_drafter(ctx: click.Context) -> None:
    """Train a draft head (EAGLE, EAGLE-3, ViSpec, MSD, Medusa) on its target's own answers.

    Options: see `mmspec-orch train-drafter --help`.
    """
    # imported here: the trainer loads torch, which every other command starts without
    from mmspec.training.train_drafter import train_drafter_command

    train_drafter_command.main(args=ctx.args, prog_name="mmspec-orch train-drafter")
