"""Which text RoPE lets the tiny Qwen2.5-VL tell image rows and columns apart (issue 5).

Trains the zoo's tiny-qwen2.5-vl recipe (`tiny_config.recipe`, unchanged) from its untrained
build with only the language model's `rope_theta` / `mrope_section` changed, several variants
side by side (one process and one data worker each), and scores each on the eval split: exact
match on general vqa and text vqa, and per general-vqa question kind (colour at a position,
shape at a position, count, position of a colour). The untrained weights do not depend on
either setting, so the variants differ only in how positions reach attention.

    .venv/bin/python benchmarks/sweep_tiny_rope.py --device cuda \\
        --variant base:10000:4,6,6 --variant t3:3:4,6,6 --variant t10s1:10:4,6,6:1

A variant is `tag:theta:t,h,w[:seed]`. On one H200 with 16 cores, seven variants side by side
take 7.5 minutes; on the 2-core VM one variant takes about 25 minutes. A GPU's kernels are not
bit-identical to the CPU's, so its numbers estimate, not reproduce, the committed zoo's.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mmspec.models.tiny import tiny_init_path
from mmspec.training.evaluation import first_answers
from mmspec.training.tiny_config import recipe
from mmspec.training.train_loop import train_stages
from mmspec.workloads.synthetic import SyntheticItem, synthetic_items

MODEL = "tiny-qwen2.5-vl"
# general vqa's question kinds, by the question's first words (workloads/synthetic.py)
KINDS = {"What colour": "colour at", "What shape": "shape at", "How many": "count"}


@dataclass(frozen=True)
class Variant:
    tag: str
    theta: float
    section: tuple[int, int, int]
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> Variant:
        tag, theta, section, *seed = text.split(":")
        t, h, w = (int(x) for x in section.split(","))
        return cls(tag, float(theta), (t, h, w), int(seed[0]) if seed else 0)

    def text(self) -> str:
        return f"{self.tag}:{self.theta:g}:{','.join(map(str, self.section))}:{self.seed}"


def question_kind(item: SyntheticItem) -> str:
    if item.scene.topic != "general vqa":
        return item.scene.topic
    return KINDS.get(" ".join(item.scene.turns[0].split()[:2]), "where")


def init_with_rope(variant: Variant, dest: Path) -> Path:
    """The untrained build with the variant's text RoPE written into its config."""
    shutil.copytree(tiny_init_path(MODEL), dest)
    config = json.loads((dest / "config.json").read_text())
    rope = config["text_config"]["rope_parameters"]
    rope["rope_theta"], rope["mrope_section"] = variant.theta, list(variant.section)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def run_variant(
    variant: Variant, device: str, per_topic: int, steps: int | None, polish_steps: int | None
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        init = init_with_rope(variant, Path(tmp) / "init")
        start = time.perf_counter()
        stages = recipe(
            MODEL, steps, polish_steps, device=device, seed=variant.seed, eval_per_topic=0
        )
        target, results = train_stages(stages, init)
        train_s = time.perf_counter() - start
    items = synthetic_items(per_topic, 0, ["general vqa", "text vqa"], "eval")
    answers = first_answers(target, items, [it.sample.load_image() for it in items])
    by_topic: dict[str, list[bool]] = collections.defaultdict(list)
    by_kind: dict[str, list[bool]] = collections.defaultdict(list)
    for item, answer in zip(items, answers, strict=True):
        ok = answer == item.scene.references[0]
        by_topic[item.scene.topic].append(ok)
        by_kind[question_kind(item)].append(ok)
    general, text = (sum(by_topic[t]) / len(by_topic[t]) for t in ("general vqa", "text vqa"))
    return {
        "variant": variant.text(),
        "device": device,
        "train_s": round(train_s),
        "general vqa": general,
        "text vqa": text,
        "all": (general + text) / 2,
        "kinds": {k: f"{sum(by_kind[k])}/{len(by_kind[k])}" for k in [*KINDS.values(), "where"]},
        "held-out grounded token accuracy": results[-1].monitor[-1]["grounded"],
    }


def table(records: list[dict]) -> str:
    kinds = [*KINDS.values(), "where"]
    lines = [
        "| variant (tag:theta:t,h,w:seed) | general + text vqa | general vqa | text vqa | "
        + " | ".join(kinds)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(kinds),
    ]
    for r in records:
        lines.append(
            f"| {r['variant']} | {r['all']:.1%} | {r['general vqa']:.0%} | {r['text vqa']:.0%} | "
            + " | ".join(r["kinds"][k] for k in kinds)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", type=Variant.parse, required=True)
    ap.add_argument("--device", default="cpu", help="torch device of training (cpu, cuda)")
    ap.add_argument("--per-topic", type=int, default=100, help="eval samples per topic")
    ap.add_argument("--out", type=Path, default=Path("sweep_tiny_rope.jsonl"))
    ap.add_argument("--steps", type=int, help="main-stage steps (default: the zoo's recipe)")
    ap.add_argument("--polish-steps", type=int, help="polish steps (default: the zoo's recipe)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a child: one variant, its record appended as one line
        v = args.variant[0]
        record = run_variant(v, args.device, args.per_topic, args.steps, args.polish_steps)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return
    common = ["--device", args.device, "--per-topic", str(args.per_topic), "--out", str(args.out)]
    for flag, value in (("--steps", args.steps), ("--polish-steps", args.polish_steps)):
        common += [flag, str(value)] if value is not None else []
    procs = [
        subprocess.Popen([sys.executable, __file__, "--one", "--variant", v.text(), *common])
        for v in args.variant
    ]
    failed = [v.tag for v, p in zip(args.variant, procs, strict=True) if p.wait() != 0]
    lines = args.out.read_text().splitlines() if args.out.is_file() else []
    print(table([json.loads(line) for line in lines]))
    if failed:
        sys.exit(f"variants failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
