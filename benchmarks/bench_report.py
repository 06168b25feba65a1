"""Report generation (`write_report`: metrics, report.md, report.html) on a synthetic 1M-row run.

The run is laid out as the orchestrator writes it: manifest.json, then one Arrow IPC file per
shard under results/model=…/method=…/batch_size=…/temperature=…/repeat=…/, every column of
RESULT_SCHEMA filled (output tokens and text included, so the reader has to skip heavy columns
rather than never meet them). Default grid: 2 models x 6 methods x 4 batch sizes, greedy, the
six MMSpec topics, ~20.8k rows per cell, 256 samples per shard (~70 shards per cell); telemetry
(energy) on one model only, as on a mixed cluster. Deterministic for a given seed.

The synthetic run is written once into --dir and reused while its parameters match; the timed
window is write_report end to end, after one warm-up call, best of --repeats.

    .venv/bin/python benchmarks/bench_report.py [--rows 1000000] [--dir /tmp/mmspec-bench-report]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from mmspec.reports import write_report
from mmspec.results import layout
from mmspec.results.ids import cell_id, shard_id
from mmspec.results.schema import RESULT_SCHEMA
from mmspec.workloads.sample import TOPICS

MODELS = {
    # model: (seconds per AR token at batch size 1, prefill seconds, bytes of weights, energy?)
    "Qwen/Qwen2.5-VL-7B-Instruct": (0.024, 0.16, 16.6e9, True),
    "llava-hf/llava-1.5-7b-hf": (0.021, 0.12, 14.1e9, False),
}
METHODS = {
    # method: (mean accepted drafts per step, draft seconds per step, tree size)
    "ar": (0.0, 0.0, 0),
    "pld": (0.9, 0.0004, 10),
    "sam": (1.1, 0.0006, 16),
    "lookahead": (1.4, 0.0012, 64),
    "recycling": (1.7, 0.0009, 30),
    "eagle2": (2.6, 0.0070, 30),
}
BATCH_SIZES = (1, 4, 8, 16)
MULTI_TURN = TOPICS.index("multi-turn conversation")
RUN_ID = "bench-1m"
# Output text of ~4 characters per token, sliced from one string (what it says does not matter).
_TEXT = "The chart shows quarterly revenue rising through the year. " * 80
DEFAULT_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "mmspec-bench-report"


@dataclass(frozen=True)
class Spec:
    """What the synthetic run holds; written beside it so a matching run is reused."""

    rows: int
    shard_samples: int
    seed: int
    version: int = 2  # bump when the synthesis changes

    @property
    def samples_per_cell(self) -> int:
        cells = len(MODELS) * len(METHODS) * len(BATCH_SIZES)
        # one sample in six is a two-turn conversation: 7 rows per 6 samples
        return max(6, round(self.rows / cells * 6 / 7))


def _sample_table(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One row per (sample, turn) of the workload: ids, topics, answer lengths."""
    sample = np.arange(n)
    turns = np.where(sample % len(TOPICS) == MULTI_TURN, 2, 1)
    row_sample = np.repeat(sample, turns)
    row_turn = np.concatenate([np.arange(t) for t in turns]) if n else np.zeros(0, int)
    topic = row_sample % len(TOPICS)
    # Answers: a few words to a long caption; chart and reasoning answers run longer.
    length = rng.lognormal(np.log(110 + 40 * (topic >= 3)), 0.6)
    new_tokens = np.clip(length, 4, 1024).astype(np.int32)
    return {"sample": row_sample, "turn": row_turn, "topic": topic, "new_tokens": new_tokens}


def _outputs(base: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[pa.Array, list[str]]:
    """Output token lists (the same for every method: lossless) and their SHA-256."""
    offsets = np.concatenate([[0], np.cumsum(base["new_tokens"])]).astype(np.int32)
    values = rng.integers(0, 150_000, offsets[-1], dtype=np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    raw = values.tobytes()
    sha = [hashlib.sha256(raw[4 * a : 4 * b]).hexdigest() for a, b in itertools.pairwise(offsets)]
    return tokens, sha


_VERIFY_T = [1, 2, 4, 8, 16, 32, 64]


def _cell_table(
    model: str,
    method: str,
    batch_size: int,
    shard_samples: int,
    base: dict[str, np.ndarray],
    outputs: tuple[pa.Array, list[str]],
    rng: np.random.Generator,
) -> tuple[pa.Table, np.ndarray]:
    """All rows of one cell, plus the shard index of each row."""
    tok_s, prefill, weights, has_energy = MODELS[model]
    mat, draft_step, tree = METHODS[method]
    n = len(base["sample"])
    # About one row in 2,000 fails (more at large batch); the runner leaves its numbers at zero.
    failed = rng.random(n) < 0.0005 * batch_size / 4
    ok = ~failed
    new_tokens = np.where(ok, base["new_tokens"], 0)
    decode = np.maximum(new_tokens.astype(np.int64) - 1, 0)  # the first token is prefill's
    topic_gain = 1.0 + 0.12 * (base["topic"] - 2.5) / 2.5  # some topics draft better
    if method == "ar":
        steps = decode
    else:
        per_step = 1 + mat * topic_gain * rng.uniform(0.7, 1.3, n)
        steps = np.maximum(np.ceil(decode / per_step), np.minimum(decode, 1)).astype(np.int64)
    accepted = decode - steps
    # Accepted drafts spread over the row's steps at random: accept_lengths sum to `accepted`.
    step_offsets = np.concatenate([[0], np.cumsum(steps)])
    first_step = np.repeat(step_offsets[:-1], accepted)
    spread = (rng.random(int(accepted.sum())) * np.repeat(steps, accepted)).astype(np.int64)
    per_step = np.bincount(first_step + spread, minlength=int(step_offsets[-1]))
    accept_lengths = pa.ListArray.from_arrays(
        pa.array(step_offsets.astype(np.int32)), pa.array(per_step.astype(np.int16))
    )
    # A bigger batch amortises the weights (AR gets cheaper per row), but verifying a tree for
    # every row costs compute, so the gain of speculation shrinks with batch size.
    step_s = tok_s * (1 + 0.06 * (batch_size - 1)) * (1 + 0.004 * tree * batch_size)
    jitter = rng.lognormal(0.0, 0.08, n)
    verify_s = steps * step_s * jitter
    draft_s = steps * draft_step * (1 + 0.05 * batch_size) * jitter
    commit_s = steps * (0.00005 + 0.0002 * (method != "ar"))
    prefill_s = ok * prefill * (1 + 0.35 * (batch_size - 1) ** 0.8) * rng.lognormal(0, 0.1, n)
    other_s = 0.02 * (verify_s + draft_s) * rng.random(n)
    total_s = prefill_s + draft_s + verify_s + commit_s + other_s

    # Batches: `batch_size` consecutive samples of one turn, as the runner forms them.
    _, batch_index = np.unique(base["sample"] // batch_size * 2 + base["turn"], return_inverse=True)
    batch_s = (
        pl.DataFrame({"b": batch_index, "t": total_s})
        .select(pl.col("t").max().over("b"))["t"]
        .to_numpy()
    )
    peak = int(weights + 0.9e9 * batch_size + 2e6 * tree * batch_size)
    peak_mem = peak + rng.integers(0, 2**26, n)
    energy = total_s * 330.0 / batch_size if has_energy else np.full(n, np.nan)

    cid = cell_id(model, method, batch_size, 0.0, 0, "mmspec")
    shard_of_row = base["sample"] // shard_samples
    shard_names = np.asarray([shard_id(cid, s) for s in range(int(shard_of_row[-1]) + 1)])
    topics = np.asarray(TOPICS)[base["topic"]]
    tokens, sha = outputs
    columns = {
        "run_id": np.full(n, RUN_ID),
        "cell_id": np.full(n, cid),
        "shard_id": shard_names[shard_of_row],
        "model": np.full(n, model),
        "method": np.full(n, method),
        "base_method": np.full(n, method),
        "method_args": np.full(n, "{}"),
        "batch_size": np.full(n, batch_size),
        "temperature": np.zeros(n),
        "seed": np.zeros(n, np.int64),
        "repeat": np.zeros(n),
        "workload": np.full(n, "mmspec"),
        "topic": topics,
        "category": topics,
        "sample_id": np.char.add("mmspec-", base["sample"].astype(str)),
        "turn": base["turn"],
        "status": np.where(failed, "error", "ok"),
        "error": pa.array(np.full(n, "OutOfMemoryError: CUDA out of memory"), mask=ok),
        "prompt_tokens": rng.integers(300, 1500, n),
        "new_tokens": new_tokens,
        "steps": steps,
        "skipped_steps": np.zeros(n),
        "drafted_tokens": steps * tree,
        "accepted_tokens": accepted,
        "accept_lengths": accept_lengths,
        "prefill_s": prefill_s,
        "draft_s": draft_s,
        "verify_s": verify_s,
        "commit_s": commit_s,
        "total_s": total_s,
        "batch_index": batch_index,
        "batch_s": batch_s,
        # every worker's t(T) curve: flat to T = 8, then growing with the verified tokens
        "verify_cost_tokens": pa.array([_VERIFY_T] * n, pa.list_(pa.int32())),
        "verify_cost_s": pa.array([[step_s * max(1.0, t / 8) for t in _VERIFY_T]] * n),
        "output_tokens": tokens,
        "output_sha256": pa.array(np.asarray(sha), mask=failed),
        "output_text": pa.array([_TEXT[: 4 * t] for t in new_tokens], mask=failed),
        "energy_j": pa.array(energy, mask=failed | np.isnan(energy)),
        "peak_mem_bytes": pa.array(peak_mem, mask=failed),
        "device_name": np.full(n, "NVIDIA H100 80GB HBM3"),
        "device_uuid": np.char.add(f"GPU-{len(model):04x}-", (shard_of_row % 8).astype(str)),
        "host": np.char.add("node-", (shard_of_row % 4).astype(str)),
    }
    arrays = [pa.array(columns[f.name]).cast(f.type) for f in RESULT_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=RESULT_SCHEMA), shard_of_row


def _write_ipc(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _telemetry(rng: np.random.Generator, samples: int = 200) -> pa.Table:
    """A shard's 20 Hz sampler series (another schema than results)."""
    t = np.arange(samples) / 20.0
    return pa.table({"t": t, "power_w": rng.normal(330.0, 25.0, samples)})


def synthesise_run(run_dir: Path, spec: Spec) -> int:
    """Write the synthetic run into run_dir (replacing it); returns the number of rows."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    manifest = {
        "run_id": RUN_ID,
        "grid": {
            "name": "bench-1m",
            "methods": list(METHODS),
            "batch_sizes": list(BATCH_SIZES),
            "models": [{"id": m} for m in MODELS],
        },
        "grid_sha256": "0" * 64,
        "workload_sha256": "1" * 64,
        "git_sha": "bench",
        "git_dirty": False,
        "packages": {"polars": pl.__version__, "pyarrow": pa.__version__},
        "host": "bench",
        "python": "3.11",
        "started_at": "2025-01-01T00:00:00+00:00",
    }
    (run_dir / layout.MANIFEST).write_text(json.dumps(manifest, indent=2))
    rng = np.random.default_rng(spec.seed)
    base = _sample_table(spec.samples_per_cell, rng)
    rows = 0
    for model in MODELS:
        outputs = _outputs(base, rng)
        for method in METHODS:
            for batch_size in BATCH_SIZES:
                table, shard_of_row = _cell_table(
                    model, method, batch_size, spec.shard_samples, base, outputs, rng
                )
                folders = layout.partition(model, method, batch_size, 0.0, 0)
                # rows of a shard are contiguous (samples in order), so a shard is a slice
                bounds = np.flatnonzero(np.diff(shard_of_row)) + 1
                starts = [0, *bounds.tolist()]
                stops = [*bounds.tolist(), len(shard_of_row)]
                for start, stop in zip(starts, stops):
                    part = table.slice(start, stop - start)
                    name = layout.part_name(part.column("shard_id")[0].as_py())
                    _write_ipc(run_dir / layout.RESULTS / folders / name, part)
                    # each shard's sampler series sits beside results/; reports must skip it
                    _write_ipc(run_dir / layout.TELEMETRY / folders / name, _telemetry(rng))
                rows += table.num_rows
    (run_dir / "spec.json").write_text(json.dumps(asdict(spec)))
    return rows


def ensure_run(run_dir: Path, spec: Spec) -> None:
    """Reuse run_dir when it holds this spec's run; synthesise it otherwise."""
    stamp = run_dir / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec):
        return
    t0 = time.perf_counter()
    rows = synthesise_run(run_dir, spec)
    print(f"synthesised {rows:,} rows into {run_dir} in {time.perf_counter() - t0:.1f} s")


def time_report(run_dir: Path, repeats: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of write_report per call, after one untimed warm-up call.

    CPU seconds (all threads) barely move when other work shares the cores, so they tell a
    slow machine from a busy one; on an idle machine wall time is at most the CPU time.
    """
    write_report(run_dir)
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        write_report(run_dir)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shard-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    spec = Spec(rows=args.rows, shard_samples=args.shard_samples, seed=args.seed)
    ensure_run(args.dir, spec)
    rows = pl.scan_ipc(layout.result_files(args.dir)).select(pl.len())
    n_rows = rows.collect().item()
    n_files = len(layout.result_files(args.dir))
    load = os.getloadavg()[0]
    times = time_report(args.dir, args.repeats)
    cores = len(os.sched_getaffinity(0))
    runs = ", ".join(f"{wall:.2f}" for wall, _ in times)
    best_wall, best_cpu = min(times)
    # The load average says whether other work shared the cores while this ran.
    print(
        f"| write_report (md + html) | {n_rows:,} rows, {n_files:,} shard files | "
        f"best {best_wall:.2f} s wall, {best_cpu:.2f} s CPU (walls: {runs}) | "
        f"{cores} cores, load {load:.1f}, polars {pl.__version__} |"
    )


if __name__ == "__main__":
    main()
