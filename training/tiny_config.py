"""The tiny zoo's training settings: TrainConfig, what a run produced, and the two-stage recipe.

The recipe is a main stage over every topic, then a short polish stage at a lower rate weighted
towards general vqa, whose colour-at-position questions the main stage leaves at ~25% (the
model learns them in late phase jumps; more general-vqa steps at a lower rate get them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# Examples drawn per topic, relative: the short grounded answers (general and text vqa) are what
# the zoo's accuracy is judged on, and they are cheap, so they come up most often.
DEFAULT_MIX: dict[str, float] = {
    "general vqa": 5.0,
    "text vqa": 5.0,
    "image captioning": 0.5,
    "chart understanding": 1.0,
    "complex reasoning pro": 0.5,
    "multi-turn conversation": 0.5,
}

# The polish stage: mostly general vqa (the slowest skill), some text vqa and a little of the
# long topics so the model keeps writing them.
POLISH_MIX: dict[str, float] = {
    "general vqa": 8.0,
    "text vqa": 2.0,
    "image captioning": 0.5,
    "chart understanding": 0.5,
    "complex reasoning pro": 0.5,
    "multi-turn conversation": 0.5,
}

# Steps per model and stage: Qwen's steps cost ~30% more, so its stages are shorter and each
# model's whole recipe stays within about 30 minutes on one core.
MAIN_STEPS = {"tiny-llava": 2600, "tiny-qwen2.5-vl": 2000}
POLISH_STEPS = {"tiny-llava": 900, "tiny-qwen2.5-vl": 800}
POLISH_LR = 4e-4
POLISH_WARMUP = 20


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; recorded next to the weights."""

    model: str
    steps: int = 2600
    token_budget: int = 2048  # padded tokens per batch (rows x longest row)
    pool_batches: int = 8  # batches per length-sorted pool
    lr: float = 1e-3  # 3e-3 and up stall: the model settles on the answer priors
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # The vision encoder learns at this fraction of `lr`: at the full rate a from-scratch tiny
    # CLIP collapses its patch features within a few hundred steps (measured: with it frozen
    # the LLaVA learns to count in 100 steps, with it at full rate not in 250).
    vision_lr_mult: float = 0.1
    # loss weight of a token read off the picture (template tokens weigh 1): they are a small
    # share of answer tokens but all of what makes the model a VLM
    grounded_weight: float = 4.0
    seed: int = 0
    data_seed: int = 0
    # one worker process draws and encodes batches while the model trains (0: in-process);
    # a single worker keeps the batch order fixed
    data_workers: int = 1
    threads: int = 1  # one thread: reproducible anywhere, and robust on a shared machine
    # "cpu" is the committed zoo's device; a GPU trains the same recipe for experiments (its
    # kernels are not bit-identical to the CPU's, so its weights are not the committed ones)
    device: str = "cpu"
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    eval_per_topic: int = 100  # held-out general/text vqa samples scored after training
    monitor_every: int = 100  # held-out teacher-forced token accuracy every N steps (0: off)
    log_every: int = 10


@dataclass
class TrainResult:
    """What a run produced: per-step losses, timings and held-out accuracy."""

    config: TrainConfig
    losses: list[float]  # the weighted training loss per step
    grounded_ce: list[float]  # mean cross-entropy of grounded tokens per step
    template_ce: list[float]  # mean cross-entropy of template tokens per step
    monitor: list[dict[str, float]]  # held-out teacher-forced token accuracy over training
    examples: int
    train_s: float  # wall seconds of the training loop
    cpu_s: float  # CPU seconds of the trainer and its data worker together
    eval_accuracy: dict[str, float]  # topic -> exact match on the eval split


def recipe(
    model: str,
    steps: int | None = None,
    polish_steps: int | None = None,
    polish_lr: float = POLISH_LR,
    eval_per_topic: int = TrainConfig.eval_per_topic,
    **options: Any,
) -> list[TrainConfig]:
    """The zoo's training stages for `model`: main, then polish (`polish_steps=0`: main only).

    `options` are TrainConfig fields shared by both stages (the polish stage draws from its
    own seeds, so it sees conversations the main stage did not); only the last stage is scored.
    """
    main = TrainConfig(model, steps=steps or MAIN_STEPS[model], **options)
    polish_steps = POLISH_STEPS[model] if polish_steps is None else polish_steps
    if not polish_steps:
        return [replace(main, eval_per_topic=eval_per_topic)]
    polish = replace(
        main,
        steps=polish_steps,
        lr=polish_lr,
        warmup_steps=POLISH_WARMUP,
        seed=main.seed + 1,
        data_seed=main.data_seed + 1,
        mix=dict(POLISH_MIX),
        eval_per_topic=eval_per_topic,
    )
    return [replace(main, eval_per_topic=0), polish]
