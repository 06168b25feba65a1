"""Ray Jobs: `submit --address http://...`, `status`, `logs`, `cancel`, and the cluster recipes.

Most tests swap Ray's JobSubmissionClient for a scripted one; one test runs a real Ray head
with its Jobs server on 127.0.0.1 (token authentication on) and a real tiny grid through it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import psutil
import pytest
import requests
import yaml
from click.testing import CliRunner

from mmspec.cli.main import Hooks, main
from mmspec.methods.registry import method_names
from mmspec.orchestrator import jobs
from mmspec.orchestrator import ray_session as ray_session_module
from mmspec.orchestrator.grid import load_grid
from tests.conftest import mmspec_split
from tests.fake_runner import FakeRunner

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
FULL = ROOT / "examples" / "full-mmspec.yaml"
RUN_ID = re.compile(r"^mmspec-tiny-\d{8}T\d{6}Z$")
ADDRESS = "http://head.example:8265"


def write_grid(folder: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": "tiny",
        "workloads": [{"builtin": "synthetic", "limit": 2}],
        "models": [{"id": "tiny-qwen2.5-vl"}],
        "methods": ["ar"],
        "max_new_tokens": 8,
    }
    data.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), obj=Hooks(runner_cls=FakeRunner))


# ----------------------------------------------------------------------------- fake Jobs API


@dataclass
class FakeServer:
    """What the fake clients see and record; one per test."""

    reachable: bool = True
    auth_ok: bool = True
    taken: set[str] = field(default_factory=set)  # submission ids that already exist
    status: str = "RUNNING"
    log: str = "run: /home/ray/runs/tiny-20261125T120001Z (1 of 1 shards to run)\nmore\n"
    clients: list[dict[str, Any]] = field(default_factory=list)  # address + env at creation
    submitted: list[dict[str, Any]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    stream_breaks_at: int | None = None  # the log line where tail_job_logs' websocket drops


class FakeClient:
    server: ClassVar[FakeServer]

    def __init__(self, address: str) -> None:
        from ray.exceptions import AuthenticationError

        self.server.clients.append(
            {"address": address, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS")}
        )
        if not self.server.reachable:
            raise ConnectionError(f"Failed to connect to Ray at address: {address}.")
        if not self.server.auth_ok:
            raise AuthenticationError("Authentication required: Unauthorized\n\nmore text")

    def _known(self, run_id: str) -> None:
        if run_id not in self.server.taken:
            raise RuntimeError(f"Request failed with status code 404: Job {run_id} does not exist.")

    def submit_job(self, **kwargs: Any) -> str:
        run_id = kwargs["submission_id"]
        if run_id in self.server.taken:
            raise RuntimeError(f"Request failed with status code 500: ... {run_id} already exists.")
        self.server.taken.add(run_id)
        self.server.submitted.append(kwargs)
        return run_id

    def get_job_info(self, run_id: str) -> SimpleNamespace:
        self._known(run_id)
        return SimpleNamespace(
            status=self.server.status,
            message="Job is currently running.",
            entrypoint="mmspec-orch submit grid.yaml",
            start_time=1_790_000_000_000,
            end_time=None,
        )

    def get_job_status(self, run_id: str) -> str:
        self._known(run_id)
        return self.server.status

    def get_job_logs(self, run_id: str) -> str:
        self._known(run_id)
        return self.server.log

    async def tail_job_logs(self, run_id: str) -> AsyncIterator[str]:
        for i, line in enumerate(self.server.log.splitlines(keepends=True)):
            if i == self.server.stream_breaks_at:
                raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")
            yield line

    def stop_job(self, run_id: str) -> bool:
        self._known(run_id)
        self.server.stopped.append(run_id)
        return self.server.status == "RUNNING"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    import ray.job_submission

    fake = FakeServer()
    monkeypatch.setattr(FakeClient, "server", fake, raising=False)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return fake


class DirectRay(Exception):
    """Raised by the stand-in ray_session: the direct path was taken, with these arguments."""


@pytest.fixture
def direct_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def record(**kwargs: Any) -> None:
        calls.append(kwargs)
        raise DirectRay

    monkeypatch.setattr(ray_session_module, "ray_session", record)
    return calls


# ----------------------------------------------------------------------------- submit


def test_submit_to_jobs_api(server: FakeServer, direct_calls: list, tmp_path: Path) -> None:
    grid = write_grid(tmp_path / "g")
    result = invoke("submit", str(grid), "--address", ADDRESS, "--env", "HF_HUB_OFFLINE=1")
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip()
    assert RUN_ID.match(run_id)
    assert f"mmspec-orch logs {run_id} --follow --address {ADDRESS}" in result.stderr
    assert direct_calls == []
    assert server.clients == [{"address": ADDRESS, "RAY_ADDRESS": None}]
    [job] = server.submitted
    assert job["submission_id"] == run_id
    # the grid's `out` is relative: the head node's home, expanded by the head's shell
    assert job["entrypoint"] == 'mmspec-orch submit grid.yaml --out "$HOME"/runs'
    env = job["runtime_env"]
    assert env["working_dir"] == str(tmp_path / "g")
    assert {".git", ".venv", "runs"} <= set(env["excludes"])
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1"}
    assert job["metadata"]["mmspec_grid"] == "tiny"
    assert job["metadata"]["mmspec_grid_sha256"]


def test_ray_address_http_routes_to_jobs(
    server: FakeServer, direct_calls: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", ADDRESS)
    grid = write_grid(tmp_path, out="/shared/runs")
    result = invoke("submit", str(grid))
    assert result.exit_code == 0, result.output
    # Ray would let RAY_ADDRESS override the client's address: it is hidden while connecting
    assert server.clients == [{"address": ADDRESS, "RAY_ADDRESS": None}]
    assert os.environ["RAY_ADDRESS"] == ADDRESS
    assert server.submitted[0]["entrypoint"] == "mmspec-orch submit grid.yaml"  # out is absolute


@pytest.mark.parametrize(
    ("args", "ray_address", "expected"),
    [
        (["--address", "ray://head:10001"], None, {"local": False, "address": "ray://head:10001"}),
        (["--address", "head:6379"], ADDRESS, {"local": False, "address": "head:6379"}),
        ([], "127.0.0.1:6379", {"local": False, "address": None}),
        (["--local"], ADDRESS, {"local": True, "address": None}),
    ],
)
def test_other_addresses_join_ray_directly(
    server: FakeServer,
    direct_calls: list,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    ray_address: str | None,
    expected: dict[str, Any],
) -> None:
    if ray_address:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    result = invoke("submit", str(write_grid(tmp_path, out=str(tmp_path / "runs"))), *args)
    assert isinstance(result.exception, DirectRay), result.output
    assert direct_calls == [expected]
    assert server.clients == []


def test_out_and_no_upload(server: FakeServer, tmp_path: Path) -> None:
    grid = write_grid(tmp_path / "g")
    result = invoke("submit", str(grid), "--address", ADDRESS, "--out", "rel/runs")
    assert result.exit_code == 2 and "absolute path on the cluster" in result.stderr

    result = invoke("submit", str(grid), "--address", ADDRESS, "--out", "/mnt/results runs")
    assert result.exit_code == 0, result.output
    assert server.submitted[-1]["entrypoint"].endswith("--out '/mnt/results runs'")

    # --no-upload: no working directory; absolute grid and results paths, taken as they are here
    result = invoke("submit", str(grid), "--address", ADDRESS, "--no-upload")
    assert result.exit_code == 0, result.output
    job = server.submitted[-1]
    assert job["runtime_env"] == {}
    assert job["entrypoint"] == f"mmspec-orch submit {grid} --out {Path.cwd() / 'runs'}"


def test_workload_path_must_travel_with_the_upload(server: FakeServer, tmp_path: Path) -> None:
    data = tmp_path / "data" / "split"
    data.mkdir(parents=True)
    record = {"id": "a", "image": "a.png", "turns": ["hi"], "topic": "general vqa", "category": "x"}
    (data / "mmspec.jsonl").write_text(json.dumps(record) + "\n")
    (data / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(data / "images" / "a.png")
    outside = write_grid(tmp_path / "g", workloads=[{"path": "../data/split"}])
    result = invoke("submit", str(outside), "--address", ADDRESS)
    assert result.exit_code == 2
    assert "workloads[0].path: '../data/split' leaves" in result.stderr
    assert "--no-upload" in result.stderr and server.submitted == []

    assert invoke("submit", str(outside), "--address", ADDRESS, "--no-upload").exit_code == 0
    inside = write_grid(tmp_path, workloads=[{"path": "data/split"}])
    assert invoke("submit", str(inside), "--address", ADDRESS).exit_code == 0
    absolute = write_grid(tmp_path / "h", workloads=[{"path": str(data)}])
    assert invoke("submit", str(absolute), "--address", ADDRESS).exit_code == 0


def test_invalid_grid_is_caught_before_submitting(server: FakeServer, tmp_path: Path) -> None:
    grid = write_grid(tmp_path, methods=["ar", "nope"])
    result = invoke("submit", str(grid), "--address", ADDRESS)
    assert result.exit_code == 2
    assert "methods[1]: unknown method 'nope'" in result.stderr
    assert server.clients == []


def test_dry_run_with_jobs_address_stays_local(server: FakeServer, tmp_path: Path) -> None:
    result = invoke("submit", str(write_grid(tmp_path)), "--address", ADDRESS, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "1 cells, 1 shards" in result.stdout
    assert server.clients == []


def test_unreachable_and_refused(server: FakeServer, tmp_path: Path) -> None:
    grid = str(write_grid(tmp_path))
    server.reachable = False
    result = invoke("submit", grid, "--address", ADDRESS)
    assert result.exit_code == 2
    assert f"cannot reach the Ray Jobs server at {ADDRESS}" in result.stderr
    result = invoke("status", "mmspec-x", "--address", ADDRESS)
    assert result.exit_code == 2 and ADDRESS in result.stderr

    server.reachable, server.auth_ok = True, False
    result = invoke("submit", grid, "--address", ADDRESS)
    assert result.exit_code == 2
    assert f"the Ray Jobs server at {ADDRESS} refused the request" in result.stderr
    assert "RAY_AUTH_MODE=token" in result.stderr


def test_taken_run_id_gets_a_suffix(server: FakeServer) -> None:
    server.taken.update({"mmspec-tiny-1", "mmspec-tiny-1-2"})
    spec = jobs.JobSpec("mmspec-tiny-1", "true", {}, {})
    assert jobs.submit(ADDRESS, spec) == "mmspec-tiny-1-3"


def test_resume_as_a_job(server: FakeServer, tmp_path: Path) -> None:
    result = invoke("submit", "--resume", "/home/ray/runs/tiny-1", "--address", ADDRESS)
    assert result.exit_code == 0, result.output
    job = server.submitted[-1]
    assert job["entrypoint"] == "mmspec-orch submit --resume /home/ray/runs/tiny-1"
    assert job["submission_id"].startswith("mmspec-tiny-1-resume-")
    assert job["runtime_env"] == {}

    result = invoke("submit", "--resume", "runs/tiny-1", "--address", ADDRESS)
    assert result.exit_code == 2 and "absolute path on the cluster" in result.stderr
    grid = str(write_grid(tmp_path))
    result = invoke("submit", grid, "--resume", "/home/ray/runs/tiny-1", "--address", ADDRESS)
    assert result.exit_code == 2 and "--resume RUN_DIR alone" in result.stderr


def test_jobs_options_need_a_jobs_address(server: FakeServer, tmp_path: Path) -> None:
    grid = str(write_grid(tmp_path))
    result = invoke("submit", grid, "--local", "--no-upload")
    assert result.exit_code == 2 and "apply to a Ray Jobs address" in result.output
    result = invoke("submit", grid, "--address", ADDRESS, "--env", "NOEQUALS")
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output


# ----------------------------------------------------------------------------- status, logs, cancel


def test_status(server: FakeServer) -> None:
    server.taken.add("mmspec-tiny-1")
    result = invoke("status", "mmspec-tiny-1", "--address", ADDRESS)
    assert result.exit_code == 0, result.output
    assert "status:     RUNNING (Job is currently running.)" in result.stdout
    assert "results:    /home/ray/runs/tiny-20261125T120001Z" in result.stdout
    assert "started:    2026-" in result.stdout and "ended:      -" in result.stdout

    result = invoke("status", "mmspec-nope", "--address", ADDRESS)
    assert result.exit_code == 2
    assert f"no run 'mmspec-nope' on the Ray Jobs server at {ADDRESS}" in result.stderr


def test_query_address_from_ray_address(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.taken.add("mmspec-tiny-1")
    result = invoke("logs", "mmspec-tiny-1")
    assert result.exit_code == 2 and "give --address http://HEAD:8265" in result.stderr
    monkeypatch.setenv("RAY_ADDRESS", ADDRESS)
    result = invoke("logs", "mmspec-tiny-1")
    assert result.exit_code == 0 and result.stdout == server.log
    assert server.clients[-1]["address"] == ADDRESS


@pytest.mark.parametrize(
    ("final", "code", "breaks_at"),
    [("SUCCEEDED", 0, None), ("FAILED", 1, None), ("SUCCEEDED", 0, 1)],
)
def test_logs_follow(server: FakeServer, final: str, code: int, breaks_at: int | None) -> None:
    server.taken.add("mmspec-tiny-1")
    server.status = final
    server.stream_breaks_at = breaks_at  # then the rest is polled, nothing shown twice
    result = invoke("logs", "mmspec-tiny-1", "--follow", "--address", ADDRESS)
    assert result.exit_code == code, result.output
    assert result.stdout == server.log
    assert f"mmspec-tiny-1: {final}" in result.stderr


def test_cancel(server: FakeServer) -> None:
    server.taken.add("mmspec-tiny-1")
    result = invoke("cancel", "mmspec-tiny-1", "--address", ADDRESS)
    assert result.exit_code == 0 and "stop requested" in result.stdout
    server.status = "SUCCEEDED"
    result = invoke("cancel", "mmspec-tiny-1", "--address", ADDRESS)
    assert result.exit_code == 0 and "not running" in result.stdout
    assert server.stopped == ["mmspec-tiny-1", "mmspec-tiny-1"]
    assert invoke("cancel", "mmspec-nope", "--address", ADDRESS).exit_code == 2


# ----------------------------------------------------------------------------- examples, cluster/


def test_full_mmspec_grid_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mmspec_split("test")  # the grid points at the project's copy through a relative path
    grid = load_grid(FULL)
    assert set(grid.methods) == set(method_names()), (
        "examples/full-mmspec.yaml must list every registered method"
    )
    assert [m.id for m in grid.models] == ["qwen2.5-vl-7b", "llava-1.5-7b"]
    assert {m.dtype for m in grid.models} == {"bfloat16"}
    assert grid.batch_sizes == (1, 2, 4, 8) and grid.max_new_tokens == 1024
    monkeypatch.chdir(tmp_path)
    result = invoke("submit", str(FULL), "--dry-run")
    assert result.exit_code == 0, result.output
    # Medusa (and ViSkip over it) is listed but excluded: no published head for these targets
    assert {e["method"] for e in grid.exclude} == {"medusa", "viskip+medusa"}
    cells = 2 * (len(grid.methods) - 2) * 4
    assert f"{cells} cells" in result.stdout
    assert "test" in result.stdout and "600" in result.stdout


def cluster_docs() -> dict[str, list[Any]]:
    return {
        str(p.relative_to(CLUSTER)): list(yaml.safe_load_all(p.read_text()))
        for p in sorted(CLUSTER.rglob("*.yaml"))
    }


def test_cluster_yaml_files_parse() -> None:
    docs = cluster_docs()
    assert {"aws-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= set(docs)
    for name, parsed in docs.items():
        assert parsed and all(isinstance(d, dict) for d in parsed), name


def test_cluster_launcher_yaml() -> None:
    [config] = cluster_docs()["aws-gpu.yaml"]
    assert config["provider"]["type"] == "aws"
    setup = "\n".join(config["setup_commands"])
    assert "download.pytorch.org/whl/cu" in setup and "pip install" in setup
    workers = config["available_node_types"]
    gpus = [t["resources"].get("GPU", 0) for t in workers.values()]
    assert max(gpus) >= 1
    head = "\n".join(config["head_start_ray_commands"])
    assert "--dashboard-host 127.0.0.1" in head and "RAY_AUTH_MODE=token" in head


def test_kuberay_manifests() -> None:
    docs = cluster_docs()
    kinds = {d["kind"]: d for d in docs["kuberay/raycluster.yaml"] + docs["kuberay/rayjob.yaml"]}
    assert {"RayCluster", "RayJob"} <= set(kinds)
    for kind in ("RayCluster", "RayJob"):
        spec = kinds[kind]["spec"]
        spec = spec.get("rayClusterSpec", spec)
        [group] = spec["workerGroupSpecs"]
        [container] = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env
    entrypoint = kinds["RayJob"]["spec"]["entrypoint"]
    assert entrypoint.startswith(
        "mmspec-orch submit /home/ray/mmspec/main/examples/full-mmspec.yaml"
    )
    # the data volume sits where the grid's relative path points from the image's checkout
    head = kinds["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    written = yaml.safe_load(FULL.read_text())["workloads"][0]["path"]
    data = os.path.normpath(f"/home/ray/mmspec/main/examples/{written}")
    assert any(data.startswith(m + "/") for m in mounts), (data, mounts)


def test_slurm_script() -> None:
    script = CLUSTER / "slurm" / "mmspec.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --gpus-per-node" in text
    assert "ray start --head" in text and "srun" in text
    assert "mmspec-orch submit" in text and "RAY_AUTH_MODE=token" in text


# ----------------------------------------------------------------------------- a real Jobs server


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head with its Jobs server on 127.0.0.1 and a token of its own; (URL, client env).

    Started with `ray start --block` in a session of its own, so the finally block stops this
    head and what it spawned, and nothing else (never `ray stop`: it stops every Ray here).
    """
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "ray").is_file() or not (bin_dir / "mmspec-orch").is_file():
        pytest.skip("ray / mmspec-orch scripts not beside this Python")
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",  # the job runs `mmspec-orch`
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
    )
    gcs, dashboard, client, agent, agent_grpc, metrics, node, objects, runtime_env = free_ports(9)
    # Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep for them
    temp_dir = Path(tempfile.mkdtemp(prefix="mmspec-ray-"))
    command = [
        str(bin_dir / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--node-manager-port", str(node),
        "--object-manager-port", str(objects), "--runtime-env-agent-port", str(runtime_env),
        "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp_dir),
    ]  # fmt: skip
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                # no token: the server must answer, and answer 401 (authentication is on)
                if requests.get(f"{url}/api/version", timeout=2).status_code == 401:
                    break
            except requests.ConnectionError:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Ray head did not start:\n{(tmp_path / 'head.log').read_text()}")
            time.sleep(0.5)
        yield url, env
    finally:
        session = head.pid
        head.send_signal(signal.SIGTERM)  # --block: Ray drains and stops its own processes
        try:
            head.wait(timeout=40)
        except subprocess.TimeoutExpired:
            head.kill()
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == session:  # stragglers this head started
                    proc.kill()
            except (OSError, psutil.Error):
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_real_jobs_server_runs_a_tiny_grid(
    ray_head: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, env = ray_head

    def cli(*args: str, **env_update: str) -> subprocess.CompletedProcess[str]:
        command = [str(Path(sys.executable).parent / "mmspec-orch"), *args]
        run_env = {**env, **env_update}
        return subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=120)

    # The model is a checkpoint directory given by absolute path, as a cluster's would be:
    # an untrained tiny Qwen2.5-VL, so the test does not depend on the trained zoo.
    from mmspec.models.tiny import BUILDERS

    checkpoint = tmp_path / "checkpoint"
    BUILDERS["tiny-qwen2.5-vl"](checkpoint)
    grid = write_grid(tmp_path / "g", workers=1, models=[{"id": str(checkpoint)}])
    out = tmp_path / "results"
    submitted = cli("submit", str(grid), "--address", url, "--out", str(out))
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    assert RUN_ID.match(run_id)

    def state(shown: subprocess.CompletedProcess[str]) -> str:
        assert shown.returncode == 0, shown.stderr
        found = re.search(r"^status:\s+(\w+)", shown.stdout, re.MULTILINE)
        assert found, shown.stdout
        return found[1]

    # --follow streams the driver's log over the Jobs API's websocket until the job ends and
    # exits 0 only if it succeeded: the wait, without a poll loop of CLI calls (each one
    # imports torch, seconds of CPU that the job on this 2-core machine needs more)
    followed = cli("logs", run_id, "--follow", "--address", url)
    assert followed.returncode == 0, followed.stderr + followed.stdout[-4000:]
    assert f"{run_id}: SUCCEEDED" in followed.stderr
    shown = cli("status", run_id, "--address", url)
    assert state(shown) == "SUCCEEDED"

    # the job ran `mmspec-orch submit grid.yaml` in the uploaded folder, results in --out
    [run_dir] = out.iterdir()
    assert f"results:    {run_dir}" in shown.stdout
    assert (run_dir / "manifest.json").is_file() and (run_dir / "report.md").is_file()
    assert f"report: {run_dir / 'report.md'}" in followed.stdout
    assert "1 shards written, 0 failed" in followed.stdout
    # the token is what let the CLI in: without it the same server refuses
    job_url = f"{url}/api/jobs/{run_id}"
    assert requests.get(job_url, timeout=10).status_code == 401
    bearer = {"Authorization": f"Bearer {Path(env['RAY_AUTH_TOKEN_PATH']).read_text()}"}
    assert requests.get(job_url, headers=bearer, timeout=10).json()["status"] == "SUCCEEDED"
