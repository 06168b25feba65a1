"""benchmarks/bench_serving.py keeps working on the path a lent GPU runs: random-weight 7B
classes (toy widths here), each request capped at the MMSpec authors' answer length.

Run as a subprocess: the script sets torch's thread count for its own process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import mmspec_split

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_serving.py"
LIMIT = 3


def _answers(path: Path, lengths: dict[str, int]) -> Path:
    rows = [{"question_id": q, "choices": [{"new_tokens": [n]}]} for q, n in lengths.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def test_random_7b_smoke_serves_each_request_to_its_reference_length(tmp_path: Path) -> None:
    split = mmspec_split("testmini")
    first = [json.loads(line)["id"] for line in (split / "mmspec.jsonl").open()][:LIMIT]
    lengths = dict(zip(first, (5, 9, 3)))
    answers = _answers(tmp_path / "baseline.jsonl", lengths)
    proc = _run(
        "--random-7b", "smoke", "--lengths", "reference", "--reference", str(answers),
        "--split", str(split), "--limit", str(LIMIT), "--rounds", "1", "--concurrency", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for model in ("Qwen2.5-VL-7B", "LLaVA-1.5-7B"):
        assert f"## random {model}, smoke" in out
    # EOS off: every answer runs to its own cap, at both concurrencies alike (float32 on CPU)
    assert out.count(f"{sum(lengths.values())} output tokens") == 2
    assert out.count(f"outputs equal at both: {LIMIT}/{LIMIT}") == 2
    assert len(re.findall(r"throughput concurrency 2 / 1: [\d.]+x", out)) == 2


def _refused(answers: Path) -> str:
    """stderr of a run on `answers` that must fail before any model loads."""
    proc = _run(
        "--lengths", "reference", "--reference", str(answers),
        "--split", str(mmspec_split("testmini")), "--limit", "1", "--rounds", "1",
    )  # fmt: skip
    assert proc.returncode != 0
    return proc.stderr


def test_a_sample_missing_from_the_answer_file_is_named(tmp_path: Path) -> None:
    answers = _answers(tmp_path / "baseline.jsonl", {"not_a_sample": 4})
    assert f"{answers}: no answer for samples" in _refused(answers)


@pytest.mark.parametrize("line", ["not json", '{"question_id": "x"}'])
def test_a_broken_answer_row_is_named_with_its_line(tmp_path: Path, line: str) -> None:
    answers = tmp_path / "baseline.jsonl"
    answers.write_text('{"question_id": "a", "choices": [{"new_tokens": [3]}]}\n' + line + "\n")
    assert f"{answers}:2: not an MMSpec answer row" in _refused(answers)
