"""Train the tiny model zoo on the synthetic suite's training split (plain PyTorch, CPU).

    python -m mmspec.training.train_tiny --model all          # both models into models/zoo/
    python -m mmspec.training.train_tiny --model tiny-llava --steps 20 --polish-steps 0 --out /tmp/x

Each model starts from its deterministic untrained build (`tiny_init_path`), sees a fresh
stream of training-split conversations (the eval split is disjoint by construction) and learns
with teacher forcing, AdamW and a loss on the assistant tokens only. The recipe has two
stages: a main stage over every topic, then a short polish stage at a lower rate weighted
towards general vqa, whose colour-at-position questions the main stage leaves at ~25% (the
model learns them in late phase jumps; more general-vqa steps at a lower rate get them).
Batches are built from length-sorted pools under a token budget, so short VQA answers and long
multi-turn chats do not waste compute on padding. Everything is seeded and the thread count
is fixed, so the same command gives the same weights on the same software stack.

The result is written with `save_pretrained` next to the untrained build's tokenizer and
processor files, with TRAINING.md (command, seed, timings, loss curve, held-out accuracy) and
training_log.json beside it.

This module is the command line; the work lives beside it: `tiny_config` (settings and the
recipe), `encoding` (conversations to tokens), `batching` (the data stream), `train_loop`,
`evaluation` (held-out accuracy) and `zoo_entry` (writing the checkpoint and its records).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from mmspec.models.tiny import BUILDERS, tiny_init_path
from mmspec.models.zoo_paths import ZOO_DIR
from mmspec.training.tiny_config import MAIN_STEPS, POLISH_LR, POLISH_STEPS, TrainConfig, recipe
from mmspec.training.train_loop import train_stages
from mmspec.training.zoo_entry import write_zoo_entry

# CLI flag -> keyword of `recipe`, for the options a user may change (default: None = the
# model's own main-stage steps)
_FLAGS = {
    "--steps": "steps",
    "--lr": "lr",
    "--polish-steps": "polish_steps",
    "--polish-lr": "polish_lr",
    "--token-budget": "token_budget",
    "--grounded-weight": "grounded_weight",
    "--vision-lr-mult": "vision_lr_mult",
    "--seed": "seed",
    "--threads": "threads",
    "--data-workers": "data_workers",
    "--eval-per-topic": "eval_per_topic",
    "--device": "device",
}
_DEFAULTS: dict[str, Any] = {
    **{k: getattr(TrainConfig, k) for k in _FLAGS.values() if hasattr(TrainConfig, k)},
    "steps": None,
    "polish_steps": None,
    "polish_lr": POLISH_LR,
}


def _cli_args(model: str, options: dict[str, Any]) -> list[str]:
    """The command-line flags that reproduce `options` (defaults left out)."""
    args = ["--model", model]
    for flag, name in _FLAGS.items():
        if options.get(name, _DEFAULTS[name]) != _DEFAULTS[name]:
            args += [flag, str(options[name])]
    return args


# ---- command line -----------------------------------------------------------------------------


def _option(flag: str, kind: Any, help_text: str) -> Any:
    name = _FLAGS[flag]
    return click.option(flag, name, type=kind, default=_DEFAULTS[name], help=help_text)


@click.command("train-tiny")
@click.option(
    "--model",
    "model_name",
    type=click.Choice([*sorted(BUILDERS), "all"]),
    default="all",
    show_default=True,
    help="Which tiny model to train.",
)
@_option(
    "--steps",
    click.IntRange(min=1),
    f"Main-stage optimizer steps [default: {', '.join(f'{m} {n}' for m, n in MAIN_STEPS.items())}]",
)
@_option("--lr", click.FloatRange(min=0, min_open=True), f"Main-stage peak lr [{TrainConfig.lr}].")
@_option(
    "--polish-steps",
    click.IntRange(min=0),
    "Polish-stage steps, 0: none [default: "
    + ", ".join(f"{m} {n}" for m, n in POLISH_STEPS.items())
    + "]",
)
@_option("--polish-lr", click.FloatRange(min=0, min_open=True), f"Polish peak lr [{POLISH_LR}].")
@_option("--token-budget", click.IntRange(min=64), "Padded tokens per batch.")
@_option("--grounded-weight", click.FloatRange(min=0), "Loss weight of grounded tokens.")
@_option("--vision-lr-mult", click.FloatRange(min=0), "Vision encoder lr / lr.")
@_option("--seed", int, "Seed of weights order and data stream (polish: seed + 1).")
@_option("--threads", click.IntRange(min=1), "Torch threads of the trainer.")
@_option("--data-workers", click.IntRange(min=0), "Data worker processes (0 or 1).")
@_option("--eval-per-topic", click.IntRange(min=0), "Held-out samples scored at the end.")
@_option("--device", str, "Torch device: cpu (the committed zoo) or e.g. cuda for experiments.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (one subfolder per model). Default: the committed zoo, models/zoo/.",
)
def train_tiny_command(model_name: str, out: Path | None, **options: Any) -> None:
    """Train the tiny model zoo on the synthetic training split (deterministic, CPU)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if options["data_workers"] > 1:
        raise click.BadParameter("more than one worker would make the batch order racy")
    names = sorted(BUILDERS) if model_name == "all" else [model_name]
    if len(names) > 1:
        # one process per model, side by side: each trains on one thread (the default), so on
        # a 2-core machine the zoo takes as long as its slowest model, with identical weights
        _train_in_parallel(names, out, options)
        return
    for name in names:
        init_dir = tiny_init_path(name)
        target, results = train_stages(recipe(name, **options), init_dir)
        dest = (out or ZOO_DIR) / name
        command = " ".join(["python -m mmspec.training.train_tiny", *_cli_args(name, options)])
        write_zoo_entry(target, results, init_dir, dest, command)
        wall = sum(r.train_s for r in results) / 60
        click.echo(
            f"{name}: {wall:.1f} min wall, held-out exact match {results[-1].eval_accuracy} "
            f"-> {dest}"
        )


def _train_in_parallel(names: list[str], out: Path | None, options: dict[str, Any]) -> None:
    args = [f"{flag}={options[name]}" for flag, name in _FLAGS.items() if options[name] is not None]
    if out is not None:
        args.append(f"--out={out}")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mmspec.training.train_tiny", "--model", name, *args]
        )
        for name in names
    ]
    failed = [name for name, proc in zip(names, procs, strict=True) if proc.wait() != 0]
    if failed:
        raise click.ClickException(f"training failed for {', '.join(failed)} (see the log above)")


if __name__ == "__main__":
    train_tiny_command()
