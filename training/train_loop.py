"""The tiny zoo's training loop: AdamW on the assistant tokens with teacher forcing.

Each stage starts a fresh optimizer (vision encoder at a fraction of the rate, no weight decay
on norms and biases) with linear warm-up then cosine decay, and logs the loss per token kind;
the held-out scoring it runs lives in `evaluation`.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from mmspec.models.loader import load_target
from mmspec.models.target import Target
from mmspec.models.tiny import tiny_init_path
from mmspec.training.batching import BatchSource
from mmspec.training.encoding import GROUNDED, NO_LOSS, TEMPLATE, Encoder, Example
from mmspec.training.evaluation import eval_accuracy, monitor_batches, token_accuracy
from mmspec.training.tiny_config import TrainConfig, TrainResult

log = logging.getLogger(__name__)


# the DataLoader's collate_fn: BatchSource already yields whole batches of examples
def _as_is(batch: list[Example]) -> list[Example]:
    return batch


def warmup_cosine(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """LR factor: linear warm-up over `warmup` steps, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def loss_on(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    kinds: torch.Tensor,
    grounded_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted cross-entropy of the answer tokens (teacher forcing), and per-kind sums.

    Returns the loss and, per token kind, the (sum of cross-entropy, count) for logging.
    """
    hidden = model.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    target = inputs["input_ids"][:, 1:]
    kind = kinds[:, 1:]
    mask = kind != NO_LOSS
    # the vocabulary projection only where there is a label: most positions are prompt
    logits = model.lm_head(hidden[mask])
    ce = torch.nn.functional.cross_entropy(logits.float(), target[mask], reduction="none")
    picked = kind[mask]
    weight = torch.where(picked == GROUNDED, grounded_weight, 1.0)
    loss = (weight * ce).sum() / weight.sum()
    parts = {
        name: torch.stack([ce.detach()[picked == k].sum(), (picked == k).sum()])
        for name, k in (("template", TEMPLATE), ("grounded", GROUNDED))
    }
    return loss, parts


def is_vision_tower(name: str) -> bool:
    """Parameters of the vision encoder proper (not the projector / patch merger)."""
    return "vision_tower." in name or ("visual." in name and ".merger." not in name)


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    groups = []
    for vision in (False, True):
        lr = config.lr * (config.vision_lr_mult if vision else 1.0)
        params = sorted((n, p) for n, p in model.named_parameters() if is_vision_tower(n) == vision)
        # no weight decay on norms and biases, as usual for transformers
        for decay in (True, False):
            chosen = [p for _, p in params if (p.dim() >= 2) == decay]
            wd = config.weight_decay if decay else 0.0
            groups.append({"params": chosen, "lr": lr, "weight_decay": wd})
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-8)


def train(config: TrainConfig, init_dir: Path | None = None) -> tuple[Target, TrainResult]:
    """Train `config.model` from its untrained build; returns the trained target and the log."""
    target, (result,) = train_stages([config], init_dir)
    return target, result


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on `n` torch threads, then give the caller's count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_stages(
    stages: Sequence[TrainConfig], init_dir: Path | None = None
) -> tuple[Target, list[TrainResult]]:
    """Run `stages` one after another on one model (a fresh optimizer each), from `init_dir`
    or the model's untrained build; a stage with `eval_per_topic` is scored at its end.
    Runs on the stages' thread count and gives the caller's back."""
    if not stages or len({c.model for c in stages}) != 1:
        raise ValueError("stages must be one or more configs of one model")
    with torch_threads(stages[0].threads):
        init = str(init_dir or tiny_init_path(stages[0].model))
        target = load_target(init, device=stages[0].device)
        encoder = Encoder(target)
        monitor_set = monitor_batches(encoder) if any(c.monitor_every for c in stages) else []
        results = []
        for config in stages:
            result = _train_stage(target, encoder, config, monitor_set)
            target.model.eval()
            if config.eval_per_topic:
                result.eval_accuracy = eval_accuracy(target, config.eval_per_topic)
            results.append(result)
    return target, results


def _train_stage(
    target: Target, encoder: Encoder, config: TrainConfig, monitor_set: list[list[Example]]
) -> TrainResult:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = target.model
    model.train()
    loader = torch.utils.data.DataLoader(
        BatchSource(encoder, config),
        batch_size=None,
        num_workers=config.data_workers,
        collate_fn=_as_is,
        prefetch_factor=8 if config.data_workers else None,
    )
    optimizer = _optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, config.steps, config.warmup_steps, config.min_lr_ratio),
    )
    losses: list[float] = []
    ce: dict[str, list[float]] = {"grounded": [], "template": []}
    monitor: list[dict[str, float]] = []
    examples = 0
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    for step, batch in zip(range(config.steps), loader):
        examples += len(batch)
        inputs, kinds = encoder.collate(batch)
        loss, parts = loss_on(model, inputs, kinds, config.grounded_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        for name, (total, count) in parts.items():
            ce[name].append(total.item() / max(1, count.item()))
        if step % config.log_every == 0 or step == config.steps - 1:
            n = config.log_every
            log.info(
                "%s step %d/%d loss %.4f grounded %.3f template %.3f (%d rows, %.0f s)",
                config.model,
                step,
                config.steps,
                mean(losses[-n:]),
                mean(ce["grounded"][-n:]),
                mean(ce["template"][-n:]),
                len(batch),
                time.perf_counter() - start,
            )
        last = step == config.steps - 1
        if (
            monitor_set
            and config.monitor_every
            and ((step + 1) % config.monitor_every == 0 or last)
        ):
            monitor.append({"step": step + 1, **token_accuracy(model, encoder, monitor_set)})
            log.info("%s held-out token accuracy %s", config.model, monitor[-1])
            model.train()
    train_s = time.perf_counter() - start
    del loader  # joins the data worker, so its CPU time is counted below
    cpu_s = _cpu_seconds() - cpu0
    return TrainResult(
        config, losses, ce["grounded"], ce["template"], monitor, examples, train_s, cpu_s, {}
    )


def mean(xs: Sequence[float]) -> float:
    """The mean of a stretch of per-step values (nan when empty), for the log and the tables."""
    return sum(xs) / len(xs) if xs else float("nan")


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped data workers
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
