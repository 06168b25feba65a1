"""Parity harness driver: MMSpec's methods and ours on the same weights and prompts.

    .venv/bin/python benchmarks/parity/run.py --reference /tmp/mmspec-ref \
        --methods ar,pld,eagle2,eagle --models tiny-qwen2.5-vl --prompts 5

Runs in our venv: creates the reference venv (setup_venv.py, skipped when already built),
converts the checkpoints (convert.py), runs ref_runner.py in the reference venv and
ours_runner.py here, each as its own process with the same thread count, then prints the
compare.py tables and writes them to <out>/report.md. Everything it writes goes under --home
($MMSPEC_HOME/parity by default), never into the repo.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_PROMPTS, DEFAULT_SPLIT, DONE, METHODS, parity_home
from compare import report
from convert import convert
from setup_venv import setup

HERE = Path(__file__).resolve().parent


def alternate(sides: dict[str, list[str]], order: list[tuple[str, str]], env: dict) -> None:
    """Start each side's runner once (`--serve`), then hand them methods in `order`: each
    method's reference run is followed at once by ours, so the machine's drift over the run
    (tens of percent over minutes on a shared host) hits both sides of a method alike."""
    procs = {
        side: subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        for side, cmd in sides.items()
    }
    try:
        for side, method in order:
            proc = procs[side]
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(method + "\n")
            proc.stdin.flush()
            for line in proc.stdout:  # its progress lines, until it is done with the method
                if line.strip() == f"{DONE} {method}":
                    break
                print(line, end="", flush=True)
            else:
                raise RuntimeError(
                    f"the {side} runner stopped during {method} (exit {proc.wait()})"
                )
    finally:
        for proc in procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
        codes = {side: proc.wait() for side, proc in procs.items()}
    failed = {side: code for side, code in codes.items() if code}
    if failed:
        raise RuntimeError(f"parity runners failed: {failed}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="MMSpec checkout (read only)")
    ap.add_argument("--methods", default="ar,pld,eagle2,eagle", help=",".join(METHODS))
    ap.add_argument("--models", default="tiny-qwen2.5-vl")
    ap.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per turn (best kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--split", type=Path, default=DEFAULT_SPLIT)
    ap.add_argument("--home", type=Path, default=parity_home(), help="venv, ckpt/ and out/")
    ap.add_argument("--venv", type=Path, help="reference venv (default: <home>/venv)")
    ap.add_argument("--out", type=Path, help="JSON and report.md (default: <home>/out)")
    ap.add_argument("--only", choices=("ref", "ours", "compare"), help="run one stage")
    ap.add_argument(
        "--cut-answers",
        action="store_true",
        help="reference side: feed later turns each answer cut at the budget and after its "
        "first stop token",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    home = args.home.expanduser()
    out = (args.out or home / "out").expanduser()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    models = args.models.split(",")
    common = [
        "--prompts", str(args.prompts),
        "--max-new-tokens", str(args.max_new_tokens),
        "--repeats", str(args.repeats),
        "--threads", str(args.threads),
        "--split", str(args.split),
        "--out", str(out),
    ]  # fmt: skip
    # one thread for every BLAS/OpenMP pool too, not only torch's intra-op one
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    python = None
    if args.only in (None, "ref"):
        python = setup((args.venv or home / "venv").expanduser())
    for model in models:
        sides: dict[str, list[str]] = {}
        if args.only in (None, "ref"):
            convert(model, home, methods)
            sides["reference"] = [
                str(python), str(HERE / "ref_runner.py"), "--reference", str(args.reference),
                "--model", model, "--ckpt", str(home), "--serve", *common,
                *(["--cut-answers"] if args.cut_answers else []),
            ]  # fmt: skip
        if args.only in (None, "ours"):
            sides["ours"] = [
                sys.executable, str(HERE / "ours_runner.py"), "--model", model, "--serve", *common
            ]  # fmt: skip
        # the reference always runs ar: its answers are the greedy truth of the compare step
        order = [("reference", "ar")] if "ar" not in methods and "reference" in sides else []
        order += [(side, m) for m in methods for side in ("reference", "ours") if side in sides]
        alternate(sides, order, env)
    text = report(out, models, methods)
    (out / "report.md").write_text(text)
    print(text, end="")
    print(f"parity run: {time.perf_counter() - t0:.0f} s wall", file=sys.stderr)


if __name__ == "__main__":
    main()
