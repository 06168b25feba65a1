"""History of runs (Parquet store, trends, step changes) and the nightly sweep's files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from mmspec.methods.registry import get_drafter, method_names
from mmspec.orchestrator.grid import load_grid
from mmspec.reports.acceptance import acceptance_columns, positions
from mmspec.reports.commands import history
from mmspec.reports.history import (
    RUN_COLUMNS,
    add_run,
    detect_steps,
    history_file,
    load_history,
    trends,
)
from mmspec.reports.metrics import METRIC_COLUMNS
from tests.test_compare import MODEL, make_rows, write_run

ROOT = Path(__file__).resolve().parents[1]
NIGHTLY = ROOT / "cluster" / "nightly"
START = datetime(2026, 1, 1, 2, 30, tzinfo=UTC)


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(history, [str(a) for a in args])


def nightly_runs(root: Path, nights: int, drop_from: int | None = None) -> list[Path]:
    """One run per night with ~2% noise; from `drop_from` on, pld is 25% slower (speedup -20%)."""
    runs = []
    for night in range(nights):
        slow = {"pld": 1.25} if drop_from is not None and night >= drop_from else None
        rows = make_rows(samples=20, noise=0.02, seed=night, slow=slow)
        started = (START + timedelta(days=night)).isoformat()
        runs.append(write_run(root / f"night-{night:02d}", rows, started_at=started))
    return runs


def _store(tmp_path: Path, runs: list[Path]) -> Path:
    store = tmp_path / "history"
    for run in runs:
        assert invoke("add", run, "--store", store).exit_code == 0
    return store


# ----------------------------------------------------------------------------- the store


def test_add_is_idempotent(tmp_path: Path) -> None:
    run = write_run(tmp_path / "night-00", make_rows(samples=12))
    store = tmp_path / "history"
    first = invoke("add", run, "--store", store)
    assert first.exit_code == 0, first.output
    assert first.output.strip() == f"history: {history_file(store, 'night-00')}"
    once = load_history(store)
    assert invoke("add", run, "--store", store).exit_code == 0
    again = load_history(store)
    assert [p.name for p in store.iterdir()] == ["night-00.parquet"]
    # 2 methods x (2 topics + all)
    assert once.height == again.height == 6
    fixed = [*RUN_COLUMNS, *METRIC_COLUMNS]
    assert again.columns[: len(fixed)] == fixed
    # then acceptance per draft position, as many columns as the run's longest accepted draft
    assert again.columns[len(fixed) :] == acceptance_columns(positions(again.columns))
    assert positions(again.columns) > 0
    row = again.filter(pl.col("method") == "pld", pl.col("topic") == "all").row(0, named=True)
    assert row["git_sha"] == "0123456789abcdef" and row["machine"] == "testhost"
    assert row["device_name"] == "Test GPU" and row["grid_name"] == "nightly"
    assert row["started_at"] == datetime(2026, 1, 1, 2, 30, tzinfo=UTC)
    assert row["speedup_global"] > 1.4


def test_machine_name_overrides_host(tmp_path: Path) -> None:
    runs = nightly_runs(tmp_path, 2)
    store = tmp_path / "history"
    add_run(runs[0], store, machine="h100-a")
    add_run(runs[1], store)
    assert sorted(set(load_history(store)["machine"])) == ["h100-a", "testhost"]
    assert {t.key["machine"] for t in trends(load_history(store), machine="h100-a")} == {"h100-a"}


def test_history_is_ordered_by_start_time(tmp_path: Path) -> None:
    runs = nightly_runs(tmp_path, 3)
    store = _store(tmp_path, runs[::-1])  # added newest first
    assert load_history(store)["run_id"].unique(maintain_order=True).to_list() == [
        "night-00",
        "night-01",
        "night-02",
    ]


# ----------------------------------------------------------------------------- step changes


def test_detect_steps_on_plain_series() -> None:
    rng = np.random.default_rng(0)
    stable = list(1.5 * (1 + rng.uniform(-0.02, 0.02, 30)))
    assert detect_steps(stable) == []
    dropped = stable[:15] + [0.8 * v for v in stable[15:]]
    [step] = detect_steps(dropped)
    assert step.index == 15
    assert step.change == pytest.approx(-0.2, abs=0.03)
    # A shift within the threshold is not a step.
    assert detect_steps(stable[:15] + [0.98 * v for v in stable[15:]], threshold=0.05) == []
    # A noisy series needs a bigger jump than its own spread.
    noisy = list(1.5 * (1 + rng.uniform(-0.3, 0.3, 20)))
    assert detect_steps([*noisy, 1.5 * 0.85], threshold=0.05) == []
    # Too little history to judge.
    assert detect_steps([1.0, 0.5]) == []


def test_history_detects_injected_step(tmp_path: Path) -> None:
    store = _store(tmp_path, nightly_runs(tmp_path / "runs", 15, drop_from=12))
    plot = tmp_path / "trend.svg"
    result = invoke("show", "--store", store, "--fail-on-step", "--plot", plot)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0] == "**History: 1 cell(s) regressed in speedup_global** (step change)."
    [pld] = [line for line in lines if f"| {MODEL} | pld |" in line]
    assert "| 15 |" in pld and "at night-12 (regression)" in pld
    [ar] = [line for line in lines if f"| {MODEL} | ar |" in line]
    assert ar.endswith("| – |")

    [trend] = [t for t in trends(load_history(store)) if t.key["method"] == "pld"]
    [step] = trend.steps
    assert step.index == 12 and step.change == pytest.approx(-0.2, abs=0.02)
    # The plot is valid SVG with one panel per cell and the step marked.
    svg = ET.parse(plot).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f"{ns}polyline")) == 2
    assert len(svg.findall(f"{ns}circle")) == 1


def test_latency_rise_is_a_regression(tmp_path: Path) -> None:
    store = _store(tmp_path, nightly_runs(tmp_path / "runs", 8, drop_from=6))
    result = invoke("show", "--store", store, "--metric", "latency_p50_s", "--fail-on-step")
    assert result.exit_code == 1, result.output
    [pld] = [t for t in trends(load_history(store), "latency_p50_s") if t.key["method"] == "pld"]
    assert pld.regressed and pld.steps[-1].change > 0.2


def test_stable_noise_is_not_flagged(tmp_path: Path) -> None:
    store = _store(tmp_path, nightly_runs(tmp_path / "runs", 15))
    for metric in ("speedup_global", "tokens_per_s", "latency_p90_s", "MAT"):
        result = invoke("show", "--store", store, "--metric", metric, "--fail-on-step")
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"**History: {metric} stable**")


def test_show_rejects_unknown_metric(tmp_path: Path) -> None:
    store = _store(tmp_path, nightly_runs(tmp_path / "runs", 1))
    result = invoke("show", "--store", store, "--metric", "nonsense")
    assert result.exit_code == 2 and "unknown metric" in result.output


def test_show_on_empty_store(tmp_path: Path) -> None:
    result = invoke("show", "--store", tmp_path / "none")
    assert result.exit_code == 0
    assert result.output.startswith("**History: no runs with speedup_global.**")


# ----------------------------------------------------------------------------- nightly files


def test_nightly_grid_runs_every_builtin_method() -> None:
    grid = load_grid(ROOT / "examples" / "nightly.yaml")
    builtin = {m for m in method_names() if get_drafter(m).__module__.startswith("mmspec.")}
    assert set(grid.methods) == builtin
    assert {m.id for m in grid.models} == {"tiny-qwen2.5-vl", "tiny-llava"}
    assert grid.temperatures == (0.0,)


def test_nightly_script_parses() -> None:
    subprocess.run(["bash", "-n", str(NIGHTLY / "nightly.sh")], check=True)
    assert os.access(NIGHTLY / "nightly.sh", os.X_OK)


def test_cron_entry() -> None:
    lines = (NIGHTLY / "mmspec-nightly.cron").read_text().splitlines()
    jobs = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    jobs = [j for j in jobs if "=" not in j[0]]
    [job] = jobs
    minute, hour, dom, month, dow, user, command = *job[:6], job[6]
    assert (minute, hour, dom, month, dow) == ("30", "2", "*", "*", "*") and user == "mmspec"
    assert command.endswith("cluster/nightly/nightly.sh")


def test_kubernetes_manifests_parse() -> None:
    docs = {
        path.name: list(yaml.safe_load_all(path.read_text()))
        for path in sorted(NIGHTLY.glob("*.yaml"))
    }
    assert set(docs) == {"cronjob-rayjob.yaml", "raycronjob.yaml", "storage.yaml"}
    [cron] = docs["raycronjob.yaml"]
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    job = cron["spec"]["jobTemplate"]
    # The script as cluster/Dockerfile lays the checkout out.
    assert job["entrypoint"] == "bash /home/ray/mmspec/main/cluster/nightly/nightly.sh"
    assert "/home/ray/mmspec/main" in (ROOT / "cluster" / "Dockerfile").read_text()
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mmspec-nightly"
    # Ray's token authentication stays on in every pod that talks to the cluster.
    pods = [
        head,
        job["submitterPodTemplate"]["spec"],
        *(g["template"]["spec"] for g in job["rayClusterSpec"]["workerGroupSpecs"]),
    ]
    for pod in pods:
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mmspec-ray-token"

    kinds = {d["kind"]: d for d in docs["cronjob-rayjob.yaml"]}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    rayjob = yaml.safe_load(kinds["ConfigMap"]["data"]["rayjob.yaml"])
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    # The fallback creates the very RayJob the RayCronJob would.
    assert rayjob["spec"] == job
    assert kinds["CronJob"]["spec"]["schedule"] == cron["spec"]["schedule"]
    assert kinds["CronJob"]["spec"]["concurrencyPolicy"] == "Forbid"
    pvc = next(d for d in docs["storage.yaml"] if d["kind"] == "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "mmspec-nightly"


_FAKE_ORCH = '''#!{python}
"""mmspec-orch for the nightly test: `submit` copies a prepared run; the rest is real."""
import os
import shutil
import sys
from pathlib import Path

import click

from mmspec.reports.commands import compare, export, history


@click.group()
def main():
    pass


@main.command()
@click.argument("grid")
@click.option("--out", required=True)
@click.option("--local", is_flag=True)
@click.option("--address")
def submit(grid, out, local, address):
    source = Path(os.environ["FAKE_RUN"])
    run = Path(out) / source.name
    shutil.copytree(source, run)
    (run / "report.md").write_text("# report of " + source.name)
    sys.exit(int(os.environ.get("FAKE_SUBMIT_RC", "0")))


for command in (compare, export, history):
    main.add_command(command)
main()
'''


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_nightly_script_end_to_end(tmp_path: Path) -> None:
    orch = tmp_path / "mmspec-orch"
    orch.write_text(_FAKE_ORCH.format(python=sys.executable))
    orch.chmod(0o755)
    state, publish = tmp_path / "state", tmp_path / "www"
    clean = nightly_runs(tmp_path / "prepared", 2)
    slowed = write_run(
        tmp_path / "prepared" / "night-slow", make_rows(samples=20, slow={"pld": 1.3})
    )
    failed_shards = write_run(tmp_path / "prepared" / "night-shards", make_rows(samples=20))

    def night(run: Path, submit_rc: int = 0) -> subprocess.CompletedProcess[str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k != "RAY_ADDRESS" and not k.startswith("MMSPEC_")
        }
        env |= {
            "MMSPEC_ORCH": str(orch),
            "MMSPEC_NIGHTLY_DIR": str(state),
            "MMSPEC_PUBLISH_DIR": str(publish),
            "MMSPEC_MACHINE": "testbox",
            "FAKE_RUN": str(run),
            "FAKE_SUBMIT_RC": str(submit_rc),
        }
        return subprocess.run(
            ["bash", str(NIGHTLY / "nightly.sh")], env=env, capture_output=True, text=True
        )

    def last_good() -> str:
        return Path(os.readlink(state / "last-good")).name

    first = night(clean[0])
    assert first.returncode == 0, first.stderr
    assert "first baseline" in first.stderr and last_good() == "night-00"
    second = night(clean[1])
    assert second.returncode == 0, second.stderr
    assert last_good() == "night-01"
    latest = publish / "latest"
    assert (latest / "compare.md").read_text().startswith("**Compare: OK**")
    assert (latest / "report.md").read_text() == "# report of night-01"
    assert (latest / "history.md").exists() and (latest / "history.svg").exists()

    third = night(slowed)
    assert third.returncode == 1, third.stderr
    assert last_good() == "night-01"  # a regressed night is no baseline
    assert (publish / "latest" / "compare.md").read_text().startswith("**Compare: FAILED**")
    fourth = night(failed_shards, submit_rc=1)
    assert fourth.returncode == 1, fourth.stderr
    assert last_good() == "night-01"

    ids = load_history(state / "history")["run_id"].unique().sort().to_list()
    assert ids == ["night-00", "night-01", "night-shards", "night-slow"]
    assert set(load_history(state / "history")["machine"]) == {"testbox"}
    assert len(list(publish.iterdir())) == 5  # four nights and `latest`
