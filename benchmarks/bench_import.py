"""`mmspec-orch import` and the report of the imported run, on MMSpec's own full test split.

The input is the reference's raw LLaVA-1.5-7B results (600 samples, 723 turns, six methods:
baseline, EAGLE, EAGLE-2, EAGLE-3, MSD, ViSpec; ../shared/data/mmspec-reference-results, or
--reference). Timed, each after one untimed warm-up call and best of --repeats: the import
(read and check 3,600 records, write manifest and six Arrow shards), and `write_report` of the
imported run (metrics.arrow/.csv, report.md, report.html). Then it prints, per method, our
report's numbers beside MMSpec's summary.csv (evaluation/summarize_metrics.py).

    .venv/bin/python benchmarks/bench_import.py [--reference DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from mmspec.reports import write_report
from mmspec.reports.answer_import import ImportSettings, import_answers

DEFAULT_REFERENCE = Path(__file__).resolve().parents[2] / "shared/data/mmspec-reference-results"
SPLIT = Path("LLaVA-1.5-7B/mmspec_test")


def best_of(repeats: int, call: Callable[[], Any]) -> tuple[float, float, list[float]]:
    """(best wall, its CPU seconds, every wall) of `call`, after one untimed warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    best_wall, best_cpu = min(times)
    return best_wall, best_cpu, [w for w, _ in times]


# metrics.csv column -> summary.csv column: MMSpec's definitions, which the report writes.
MMSPEC = {
    "MAT_mmspec": "MAT",
    "draft_accept_mean": "draft_accept_mean",
    "speedup_paired_mmspec": "speedup_paired",
    "speedup_global_mmspec": "speedup_global",
}


def comparison(run: Path, summary: Path) -> list[str]:
    """Markdown rows: per method, the report's MMSpec columns = summary.csv's (to 4 decimals),
    then our own MAT and speedups, and the throughput speedup."""
    metrics = pl.read_ipc(run / "metrics.arrow").filter(pl.col("topic") == "all")
    cells = {r["method"]: r for r in metrics.iter_rows(named=True)}

    def shown(value: float | None) -> str:
        return "–" if value is None or value != value else f"{value:.4f}"

    lines = [
        "| method | MAT_mmspec = MAT | draft_accept_mean = draft_accept_mean | "
        "speedup_paired_mmspec = speedup_paired | speedup_global_mmspec = speedup_global | "
        "MAT (ours) | speedup (global), ours | speedup (paired), ours | throughput speedup | "
        "lossless (answer text) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with summary.open() as f:
        for ref in csv.DictReader(f):
            method = "ar" if ref["method"] == "baseline" else ref["method"]
            c = cells[method]
            pairs = [
                f"{shown(c[ours])} = {shown(float(ref[theirs]))}" for ours, theirs in MMSPEC.items()
            ]
            lines.append(
                f"| {method} | {' | '.join(pairs)} | {c['MAT']:.4f} | "
                f"{c['speedup_global']:.4f} | {c['speedup_paired']:.4f} | "
                f"{c['throughput_speedup']:.4f} | {100 * c['lossless']:.1f}% |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    answers = args.reference / SPLIT
    if not answers.is_dir():
        raise SystemExit(f"{answers}: not found; give the reference results with --reference")
    out = Path(tempfile.mkdtemp(prefix="mmspec-bench-import-"))
    try:
        settings = ImportSettings("mmspec", model="llava-1.5-7b")
        imp = best_of(args.repeats, lambda: import_answers([answers], out, settings))
        run = import_answers([answers], out, settings).run_dir
        rep = best_of(args.repeats, lambda: write_report(run))
        rows = pl.scan_ipc(sorted((run / "results").rglob("*.arrow"))).select(pl.len())
        n_rows = rows.collect().item()
        cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
        for what, (wall, cpu, walls) in (("import", imp), ("write_report", rep)):
            print(
                f"| {what} | {n_rows:,} rows, 6 methods | best {wall:.3f} s wall, {cpu:.3f} s "
                f"CPU (walls: {', '.join(f'{w:.3f}' for w in walls)}) | {cores} cores, "
                f"load {load:.1f}, polars {pl.__version__} |"
            )
        print()
        print("\n".join(comparison(run, answers / "summary.csv")))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
