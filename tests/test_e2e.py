"""End to end as a user runs it: grid file -> Ray workers with the real runner -> report.

An MMSpec-layout folder with one missing and one corrupt image: those samples become error
rows, every other sample runs, and the run completes with a lossless report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import yaml
from click.testing import CliRunner

from mmspec.cli.main import main
from mmspec.reports import load_rows
from tests.conftest import mmspec_split


def _split_with_bad_images(tmp_path: Path) -> Path:
    src = mmspec_split("testmini")
    records = [json.loads(line) for line in (src / "mmspec.jsonl").read_text().splitlines()]
    picked: dict[str, dict] = {}
    for r in records:  # one per topic keeps it small
        picked.setdefault(r["topic"], r)
    dst = tmp_path / "split"
    (dst / "images").mkdir(parents=True)
    chosen = list(picked.values())
    for r in chosen:
        shutil.copy(src / "images" / r["image"], dst / "images" / r["image"])
    (dst / "images" / chosen[0]["image"]).unlink()  # missing
    (dst / "images" / chosen[1]["image"]).write_bytes(b"\xff\xd8 not a jpeg")  # corrupt
    (dst / "mmspec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return dst


def test_submit_local_real_models_with_bad_images(tmp_path: Path) -> None:
    split = _split_with_bad_images(tmp_path)
    grid = {
        "name": "e2e",
        "out": str(tmp_path / "runs"),
        "workloads": [{"path": str(split)}],
        "models": [{"id": "tiny-llava"}],
        "methods": ["ar", "pld"],
        "batch_sizes": [2],
        "max_new_tokens": 16,
    }
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))

    result = CliRunner().invoke(main, ["submit", str(grid_file), "--local"])
    assert result.exit_code == 0, result.output

    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = load_rows(run_dir).collect()
    records = [json.loads(line) for line in (split / "mmspec.jsonl").read_text().splitlines()]
    expected = {(r["id"], t) for r in records for t in range(len(r["turns"]))}
    for method in ("ar", "pld"):
        mine = rows.filter(pl.col("method") == method)
        keys = set(zip(mine["sample_id"], mine["turn"]))
        assert keys == expected and mine.height == len(expected)  # each key exactly once
    errors = rows.filter(pl.col("status") == "error")
    assert set(errors["sample_id"]) == {records[0]["id"], records[1]["id"]}
    assert all("image" in e for e in errors["error"])
    ok = rows.filter(pl.col("status") == "ok")
    assert ok.height == 2 * (len(expected) - errors.height // 2)
    report = (run_dir / "report.md").read_text()
    assert report.splitlines()[0].startswith("**Lossless: all")


def test_runner_warms_up_before_its_first_shard(monkeypatch) -> None:
    """A fresh worker's first generation (kernel selection, allocator growth) happens at
    construction, outside every row's timing: no cell pays for being first."""
    from mmspec.methods.engine import Engine
    from mmspec.orchestrator.runner import ShardRunner
    from mmspec.results.cells import ModelConfig

    calls: list[int] = []
    real = Engine.generate

    def counting(self, conversations, *args, **kwargs):
        calls.append(len(conversations))
        return real(self, conversations, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", counting)
    runner = ShardRunner(ModelConfig("tiny-llava"), "pld", {}, threads=1)
    try:
        assert calls == [1]
    finally:
        runner.close()
