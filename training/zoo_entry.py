"""Writing a trained tiny model into the zoo: weights, TRAINING.md and training_log.json."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from mmspec.models.target import Target
from mmspec.training.tiny_config import TrainResult
from mmspec.training.train_loop import mean


def _loss_table(results: Sequence[TrainResult], rows: int = 24) -> str:
    every = max(1, sum(len(r.losses) for r in results) // rows)
    lines = [
        "| stage | steps | training loss | grounded-token CE | template-token CE |",
        "|---:|---:|---:|---:|---:|",
    ]
    for stage, r in enumerate(results, 1):
        for end in [*range(every, len(r.losses), every), len(r.losses)]:
            w = slice(max(0, end - every), end)
            lines.append(
                f"| {stage} | {w.start + 1}-{end} | {mean(r.losses[w]):.4f} | "
                f"{mean(r.grounded_ce[w]):.4f} | {mean(r.template_ce[w]):.4f} |"
            )
    return "\n".join(lines)


def _monitor_table(results: Sequence[TrainResult]) -> str:
    lines = ["| stage | step | grounded tokens | template tokens |", "|---:|---:|---:|---:|"]
    for stage, r in enumerate(results, 1):
        lines += [
            f"| {stage} | {m['step']} | {m['grounded']:.1%} | {m['template']:.1%} |"
            for m in r.monitor
        ]
    return "\n".join(lines)


def _stage_row(stage: int, r: TrainResult) -> str:
    c = r.config
    mix = ", ".join(f"{t} {w:g}" for t, w in c.mix.items())
    return (
        f"| {stage} | {c.steps} | {c.lr:g} ({c.warmup_steps} warm-up) | {c.seed} / {c.data_seed} "
        f"| {mix} | {r.examples} | {r.train_s / 60:.1f} min wall, {r.cpu_s / 60:.1f} min CPU |"
    )


def training_markdown(results: Sequence[TrainResult], command: str) -> str:
    c = results[0].config
    acc = ", ".join(f"{t} {v:.1%}" for t, v in results[-1].eval_accuracy.items())
    stages = "\n".join(_stage_row(i, r) for i, r in enumerate(results, 1))
    wall = sum(r.train_s for r in results) / 60
    cpu = sum(r.cpu_s for r in results) / 60
    return f"""# {c.model}: training record

Trained by the project on the synthetic suite's training split (the eval split is disjoint by
construction), from the untrained build `tiny_init_path("{c.model}")`. The exact command, from
the repository root:

```bash
{command}
```

Stages, run one after the other on the same weights (each with a fresh optimizer; each
conversation is drawn fresh, no epochs):

| stage | steps | peak lr | seed / data seed | topic mix (conversations) | conversations | time |
|---:|---:|---|---|---|---:|---|
{stages}

| | |
|---|---|
| batches | length-sorted pools of {c.pool_batches} batches, {c.token_budget} padded tokens each |
| optimizer | AdamW (vision encoder {c.vision_lr_mult:g} x lr), betas (0.9, 0.98), \
weight decay {c.weight_decay} (not on norms and biases), grad clip {c.grad_clip}, \
linear warm-up then cosine to {c.min_lr_ratio} x lr in each stage |
| loss | teacher-forced cross-entropy on assistant tokens only; tokens read off the picture \
weigh {c.grounded_weight:g}, the others 1 |
| threads | {c.threads} torch thread(s) + {c.data_workers} data worker process |
| training time | {wall:.1f} min wall, {cpu:.1f} min CPU \
({platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}) |
| held-out exact match ({results[-1].config.eval_per_topic} per topic, greedy) | {acc} |

Loss curve (per-step values in training_log.json):

{_loss_table(results)}

Held-out teacher-forced token accuracy (eval split, 8 conversations per topic):

{_monitor_table(results)}
"""


def write_zoo_entry(
    target: Target, results: Sequence[TrainResult], init_dir: Path, out: Path, command: str
) -> None:
    """Replace `out` with the trained checkpoint, its tokenizer/processor and the records."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for f in sorted(init_dir.iterdir()):
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy(f, tmp / f.name)
        target.model.save_pretrained(tmp)
        (tmp / "TRAINING.md").write_text(training_markdown(results, command))
        record = {
            "command": command,
            "train_s": round(sum(r.train_s for r in results), 1),
            "eval_accuracy": results[-1].eval_accuracy,
            "stages": [
                {
                    "config": asdict(r.config),
                    "train_s": round(r.train_s, 1),
                    "cpu_s": round(r.cpu_s, 1),
                    "examples": r.examples,
                    "monitor": r.monitor,
                    "losses": [round(x, 4) for x in r.losses],
                    "grounded_ce": [round(x, 4) for x in r.grounded_ce],
                    "template_ce": [round(x, 4) for x in r.template_ce],
                }
                for r in results
            ],
        }
        (tmp / "training_log.json").write_text(json.dumps(record) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
