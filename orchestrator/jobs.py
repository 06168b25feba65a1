"""Runs as Ray Jobs: submit a grid to a cluster's Jobs API, then follow it by its run id.

`mmspec-orch submit grid.yaml --address http://HEAD:8265` validates the grid here, uploads the
grid's folder as the job's working directory and runs `mmspec-orch submit <grid>` on the head
node. There Ray points RAY_ADDRESS at the cluster itself, so the job's driver joins the cluster
directly and runs the grid exactly as a direct submit would. The run id is the job's
submission id (`mmspec-<grid name>-<UTC timestamp>`); `status`, `logs` and `cancel` take it.

Authentication is Ray's own token authentication, read from the environment as every Ray
client reads it: RAY_AUTH_MODE=token, and the cluster's token in RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. Nothing here stores, prints or forwards a token.

Ray is imported on first use: `--local` must set its loopback switch before Ray is imported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mmspec.orchestrator.grid import Grid, grid_sha256
from mmspec.orchestrator.grid_text import read_yaml
from mmspec.results.ids import safe_name
from mmspec.results.layout import run_names

log = logging.getLogger(__name__)

JOBS_SCHEMES = ("http://", "https://")
COMMAND = "mmspec-orch"  # must be on the cluster's PATH (cluster/README.md)
# Never uploaded with a grid's folder: environments, caches, VCS data and earlier results.
UPLOAD_EXCLUDES = (".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray lets these override the address a JobSubmissionClient is given; ours is already chosen.
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# `submit` prints this line first; it is how `status` finds the run directory in the job's log.
_RUN_LINE = re.compile(r"^run: (?P<run_dir>.+) \(\d+ of \d+ shards to run\)$", re.MULTILINE)
_ID_ATTEMPTS = 20


class JobsError(Exception):
    """The run cannot be submitted to, or found on, the Jobs server; the message says why."""


@dataclass(frozen=True)
class JobSpec:
    """What one submission sends to the Jobs API."""

    submission_id: str  # the run id users type later: mmspec-<grid>-<timestamp>
    entrypoint: str  # shell command the head node runs
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED
    message: str
    entrypoint: str
    start_time: datetime | None
    end_time: datetime | None
    run_dir: str | None  # results directory on the cluster, once the job has printed it


# ----------------------------------------------------------------------------- addresses


def is_jobs_address(address: str | None) -> bool:
    """True for a Jobs API URL (http(s)://HEAD:8265); ray:// and host:port join Ray directly."""
    return address is not None and address.lower().startswith(JOBS_SCHEMES)


def submit_target(local: bool, address: str | None) -> str | None:
    """The Jobs API address a `submit` goes to, or None for a direct Ray session."""
    if local:
        return None
    chosen = address or os.environ.get("RAY_ADDRESS") or None
    return chosen if is_jobs_address(chosen) else None


def query_target(address: str | None) -> str:
    """The Jobs server for status/logs/cancel: --address, else RAY_ADDRESS."""
    chosen = address or os.environ.get("RAY_ADDRESS")
    if not chosen:
        raise JobsError("no Ray Jobs server: give --address http://HEAD:8265 or set RAY_ADDRESS")
    return chosen


# ----------------------------------------------------------------------------- job specs


def grid_job(
    grid: Grid,
    grid_file: Path,
    out: Path | None = None,
    upload: bool = True,
    env: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> JobSpec:
    """The job that runs a validated grid on the cluster.

    upload=True ships the grid's folder as the working directory, so the grid and any data
    beside it travel with the job; a relative `out` then lands under the head node's home
    (the working directory is a temporary copy). upload=False sends nothing: the cluster must
    see this machine's paths (a shared filesystem, or submitting on the head node itself).
    """
    grid_file = Path(grid_file)
    runtime_env: dict[str, Any] = {}
    if upload:
        folder = grid_file.resolve().parent
        _check_travels(grid_file, folder)
        grid_arg = shlex.quote(grid_file.name)
        runtime_env["working_dir"] = str(folder)
        runtime_env["excludes"] = list(UPLOAD_EXCLUDES)
        if out is not None and not out.is_absolute():
            raise JobsError(
                f"--out {out}: give an absolute path on the cluster; a relative one would land "
                "in the job's temporary copy of the grid's folder"
            )
        out_arg = _out_argument(out, grid.out)
    else:
        grid_arg = shlex.quote(str(grid_file.resolve()))
        out_arg = shlex.quote(str(Path(out if out is not None else grid.out).absolute()))
    if env:
        runtime_env["env_vars"] = dict(env)
    entrypoint = f"{COMMAND} submit {grid_arg}"
    if out_arg is not None:
        entrypoint += f" --out {out_arg}"
    metadata = {
        "mmspec_grid": grid.name,
        "mmspec_grid_sha256": grid_sha256(grid),
        "mmspec_orch_version": _own_version(),
    }
    return JobSpec(_run_id(grid.name, now), entrypoint, runtime_env, metadata)


def resume_job(
    run_dir: Path, env: Mapping[str, str] | None = None, now: datetime | None = None
) -> JobSpec:
    """The job that finishes an earlier run in place, from its directory on the cluster."""
    if not run_dir.is_absolute():
        raise JobsError(
            f"--resume {run_dir}: give the run directory's absolute path on the cluster "
            f"(`{COMMAND} status RUN` shows it)"
        )
    runtime_env: dict[str, Any] = {"env_vars": dict(env)} if env else {}
    return JobSpec(
        _run_id(f"{safe_name(run_dir.name)}-resume", now),
        f"{COMMAND} submit --resume {shlex.quote(str(run_dir))}",
        runtime_env,
        {"mmspec_resume": str(run_dir), "mmspec_orch_version": _own_version()},
    )


def _check_travels(grid_file: Path, folder: Path) -> None:
    """Refuse relative workload paths that leave the uploaded folder: the job cannot see them.

    The validated Grid holds resolved paths only, so the file is read again for what was written.
    """
    data = read_yaml(grid_file.read_text(encoding="utf-8"), str(grid_file))
    for i, entry in enumerate(data.get("workloads") or []):
        written = entry.get("path") if isinstance(entry, Mapping) else None
        if not isinstance(written, str) or written.startswith(("/", "~")):
            continue  # builtin, or absolute: the same path is used on the cluster
        if not (folder / written).resolve().is_relative_to(folder):
            raise JobsError(
                f"{grid_file}: workloads[{i}].path: {written!r} leaves {folder}, the folder the "
                "job uploads, so the cluster would not find it; use a path that exists on the "
                "cluster (absolute), keep the data under the grid's folder, or give --no-upload "
                "if the cluster sees this machine's paths"
            )


def _out_argument(out: Path | None, grid_out: str) -> str | None:
    if out is not None:
        return shlex.quote(str(out))
    if Path(grid_out).is_absolute():
        return None  # the grid's own `out` already names a place on the cluster
    # "$HOME" is left for the head node's shell to expand: its home, not this machine's.
    return '"$HOME"/' + shlex.quote(grid_out)


def _run_id(stem: str, now: datetime | None) -> str:
    return next(run_names(f"mmspec-{stem}", now or datetime.now(UTC)))


def _own_version() -> str:
    try:
        return version("mmspec-orch")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- the Jobs API


def submit(address: str, spec: JobSpec) -> str:
    """Submit the job; returns its run id (with a -2, -3... suffix if that second is taken)."""
    with _jobs_server(address) as client:
        for attempt in range(1, _ID_ATTEMPTS + 1):
            run_id = spec.submission_id if attempt == 1 else f"{spec.submission_id}-{attempt}"
            try:
                return client.submit_job(
                    entrypoint=spec.entrypoint,
                    submission_id=run_id,
                    runtime_env=spec.runtime_env,
                    metadata=spec.metadata,
                )
            except RuntimeError as exc:
                if "already exists" not in str(exc):
                    raise
    raise JobsError(f"{address}: run ids {spec.submission_id}[-N] are all taken")


def run_status(address: str, run_id: str) -> RunStatus:
    with _jobs_server(address, run_id) as client:
        info = client.get_job_info(run_id)
        found = _RUN_LINE.search(client.get_job_logs(run_id))
    return RunStatus(
        run_id=run_id,
        status=_status_name(info.status),
        message=info.message or "",
        entrypoint=info.entrypoint or "",
        start_time=_from_ms(info.start_time),
        end_time=_from_ms(info.end_time),
        run_dir=found["run_dir"] if found else None,
    )


def run_logs(address: str, run_id: str) -> str:
    with _jobs_server(address, run_id) as client:
        return client.get_job_logs(run_id)


def follow_logs(
    address: str, run_id: str, write: Callable[[str], None], poll_s: float = 2.0
) -> str:
    """Stream the job's log to `write` until the job ends; returns its final status.

    The stream is a websocket; where it breaks (proxies and port-forwards drop long
    connections), the rest of the log is polled instead, without repeating what was shown.
    """
    from aiohttp import ClientError

    with _jobs_server(address, run_id) as client:
        client.get_job_info(run_id)  # an unknown run fails here, clearly, not in the websocket
        shown = 0

        async def pump() -> None:
            nonlocal shown
            async for chunk in client.tail_job_logs(run_id):
                write(chunk)
                shown += len(chunk)

        try:
            asyncio.run(pump())
        except (RuntimeError, OSError, ClientError) as exc:
            log.warning("log stream from %s broke (%s); polling it instead", address, exc)
        while True:
            status = _status_name(client.get_job_status(run_id))
            text = client.get_job_logs(run_id)  # read after the status: complete once it is final
            write(text[shown:])
            shown = len(text)
            if status in TERMINAL:
                return status
            time.sleep(poll_s)


def cancel_run(address: str, run_id: str) -> bool:
    """Ask the cluster to stop the run; False if it was no longer running."""
    with _jobs_server(address, run_id) as client:
        return bool(client.stop_job(run_id))


@contextmanager
def _jobs_server(address: str, run_id: str | None = None) -> Iterator[Any]:
    """A connected JobSubmissionClient; Ray's errors become JobsError naming the address."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        with _address_env_cleared():
            client = JobSubmissionClient(address)
        yield client
    except AuthenticationError as exc:
        raise JobsError(
            f"the Ray Jobs server at {address} refused the request: "
            f"{str(exc).splitlines()[0]}\nset RAY_AUTH_MODE=token and the cluster's token "
            "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; "
            "`ray get-auth-token` on the head node prints it)"
        ) from None
    except OSError as exc:  # ConnectionError, and every requests/aiohttp connection failure
        raise JobsError(
            f"cannot reach the Ray Jobs server at {address}: {exc}\n"
            "is the head node up, with its dashboard on that port (default 8265)?"
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if run_id is not None and ("does not exist" in text or "404" in text):
            raise JobsError(f"no run {run_id!r} on the Ray Jobs server at {address}") from None
        raise JobsError(f"the Ray Jobs server at {address} failed: {text}") from None


@contextmanager
def _address_env_cleared() -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in _ADDRESS_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def _from_ms(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, UTC) if value else None
