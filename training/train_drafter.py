"""Train a draft head on its target's own answers: `mmspec-orch train-drafter`.

    mmspec-orch train-drafter --method eagle --target tiny-llava          # into the zoo
    mmspec-orch train-drafter --method vispec --target ./my-qwen --out heads/vispec

1. Self-distillation (training/distill.py): the target answers training-split conversations;
   cached per target and config in $MMSPEC_HOME/distill/, so one pass serves every head.
2. Each step the target runs teacher-forced over a batch of those conversations (no grad)
   and the feature tap hands its features and logits to the head's `train_loss`.
3. Stages, as the references train: a text-only stage first (the same conversations with
   the image left out: EAGLE/ViSpec stage 1 on text data), then multimodal. MSD ramps the
   share of multimodal batches linearly in between (its text-to-visual curriculum).

One code path through `accelerate`: on this CPU a single process; on GPUs
`accelerate launch -m mmspec.training.train_drafter ...` gives data parallelism (each process
loads the target on its own device). The head is saved with `save_head` (safetensors +
config.json) and a TRAINING.md with the command, seed and loss curve.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from mmspec.methods.draft_checkpoint import checkpoint_dir
from mmspec.methods.head_config import DraftConfig, save_head
from mmspec.methods.head_training import TeacherBatch
from mmspec.models.feature_taps import EMBEDS, FeatureTap
from mmspec.models.target import Target
from mmspec.training.batching import pack_by_length
from mmspec.training.distill import (
    DistillConfig,
    Record,
    data_key,
    distill,
    load_records,
    save_records,
)
from mmspec.training.encoding import NO_LOSS, Encoder, Example
from mmspec.training.train_loop import torch_threads, warmup_cosine

log = logging.getLogger(__name__)

# head weights -> the drafters that run them
HEAD_METHODS = {
    "eagle": ("eagle", "eagle2"),
    "eagle3": ("eagle3",),
    "vispec": ("vispec",),
    "msd": ("msd",),
    "medusa": ("medusa",),
}


@dataclass(frozen=True)
class HeadTrainConfig:
    """Everything that determines a head's training run; recorded beside the weights."""

    method: str  # the head weights: eagle (runs eagle and eagle2), eagle3, vispec, msd, medusa
    target: str
    steps: int = 900
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    token_budget: int = 2048
    text_steps: int = 200  # text-only stage first
    ramp_steps: int = 0  # then the multimodal share rises linearly over this many steps
    noise: float = 0.1  # uniform noise on the input features (EAGLE's data augmentation)
    seed: int = 0
    threads: int = 1
    head_args: dict[str, Any] = field(default_factory=dict)  # shape options (e.g. num_q)
    distill: DistillConfig = field(default_factory=DistillConfig)


# per head: what differs from the defaults (the references' stage structure)
RECIPES: dict[str, dict[str, Any]] = {
    "eagle": {},
    # EAGLE-3 trains without feature noise; its 7 unrolled steps cost ~3x a step of the others
    "eagle3": {"noise": 0.0, "steps": 600},
    "vispec": {"head_args": {"num_q": 2}},
    "msd": {"text_steps": 250, "ramp_steps": 400},
    # MMSpec's Medusa (3 heads of one block into the target's LM head) trains with EAGLE's
    # feature noise; the paper's form was trained here as
    # {"noise": 0.0, "head_args": {"num_heads": 4, "num_layers": 1, "projection": "own"}}
    "medusa": {
        "text_steps": 0,
        "head_args": {"num_heads": 3, "num_layers": 1, "projection": "target"},
    },
}


def recipe(method: str, target: str, **overrides: Any) -> HeadTrainConfig:
    if method not in HEAD_METHODS:
        raise ValueError(f"no head to train for {method!r}; heads: {', '.join(HEAD_METHODS)}")
    return HeadTrainConfig(method, target, **{**RECIPES[method], **overrides})


def image_share(config: HeadTrainConfig, step: int) -> float:
    """Probability that batch `step` is multimodal (the rest are text-only)."""
    if step < config.text_steps:
        return 0.0
    if config.ramp_steps and step < config.text_steps + config.ramp_steps:
        return (step - config.text_steps + 1) / config.ramp_steps
    return 1.0


# ---- data --------------------------------------------------------------------------------------


def distilled(target: Target, config: DistillConfig, home: Path) -> list[Record]:
    """The target's distilled conversations, generated once per target, weights and config."""
    # the weights decide the answers: the cache key includes a digest of the LM head
    weight = target.model.get_output_embeddings().weight.detach().float().cpu()
    sha = hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]
    name = f"{Path(target.name).name}-{data_key(target.name, config, sha)}.jsonl"
    path = home / "distill" / name
    if path.is_file():
        return load_records(path)
    log.info("distilling %s (%s per topic) into %s", target.name, config.per_topic, path)
    records = distill(target, config)
    save_records(records, path)
    return records


class Batches:
    """Length-sorted batches under a token budget, text-only or multimodal by curriculum."""

    def __init__(
        self, encoder: Encoder, records: list[Record], budget: int, rng: random.Random
    ) -> None:
        self.encoder, self.records, self.budget, self.rng = encoder, records, budget, rng
        self._cache: dict[tuple[int, bool], Example] = {}
        self._queue: dict[bool, list[list[int]]] = {True: [], False: []}

    def example(self, i: int, image: bool) -> Example:
        key = (i, image)
        if key not in self._cache:
            scene = self.records[i].scene()
            self._cache[key] = self.encoder.encode(scene, scene.picture.draw() if image else None)
        return self._cache[key]

    def next(self, image: bool) -> list[Example]:
        if not self._queue[image]:
            order = list(range(len(self.records)))
            self.rng.shuffle(order)

            def length(i: int) -> int:
                return len(self.example(i, image).input_ids)

            for lo in range(0, len(order), 64):  # pools of 64, sorted by length
                self._queue[image] += pack_by_length(order[lo : lo + 64], length, self.budget)
            self.rng.shuffle(self._queue[image])
        return [self.example(i, image) for i in self._queue[image].pop()]


def answer_token_counts(batches: Batches, target: Target) -> torch.Tensor:
    """How often each token id occurs in the distilled answers (V,)."""
    counts = torch.zeros(target.model.config.get_text_config().vocab_size)
    for i in range(len(batches.records)):
        example = batches.example(i, False)
        ids = torch.tensor(example.input_ids)[torch.tensor(example.kinds) != NO_LOSS]
        counts += torch.bincount(ids, minlength=counts.numel())[: counts.numel()].float()
    return counts


@torch.no_grad()
def teacher_batch(
    target: Target, encoder: Encoder, tap: FeatureTap, examples: list[Example]
) -> TeacherBatch:
    """Run the target over whole conversations and keep what the head learns from."""
    inputs, kinds = encoder.collate(examples)  # on the target's device, pixels in its dtype
    tap.arm()
    logits = target.model(**inputs, use_cache=False).logits
    features = tap.take()
    ids = inputs["input_ids"]
    return TeacherBatch(
        input_ids=ids,
        real=inputs["attention_mask"].bool(),
        answer=kinds != NO_LOSS,
        image=ids == target.image_token_id,
        features={k: v.detach() for k, v in features.items()},
        logits=logits.detach(),
    )


# ---- training ----------------------------------------------------------------------------------


@dataclass
class HeadTrainResult:
    config: HeadTrainConfig
    losses: list[float]
    metrics: list[dict[str, float]]  # per step: the head's own loss parts (e.g. token accuracy)
    train_s: float
    distill_s: float
    records: int


def build_head(config: HeadTrainConfig, target: Target) -> torch.nn.Module:
    from mmspec.methods.registry import get_drafter

    head_cls = get_drafter(HEAD_METHODS[config.method][0]).head_cls
    # a head whose shape depends on more of the target than its text config makes its own
    make = getattr(head_cls, "draft_config", DraftConfig.for_target)
    return head_cls(make(config.method, target, **config.head_args))


def train_head(
    config: HeadTrainConfig, home: Path, target: Target | None = None
) -> tuple[torch.nn.Module, HeadTrainResult]:
    """Distil (or reuse the cached data), then train the head; returns it and its log.

    Trains on `config.threads` torch threads and gives the caller's thread count back.
    """
    with torch_threads(config.threads):
        return _train_head(config, home, target)


def _train_head(
    config: HeadTrainConfig, home: Path, target: Target | None
) -> tuple[torch.nn.Module, HeadTrainResult]:
    from accelerate import Accelerator

    from mmspec.models.loader import load_target

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if target is None:
        target = load_target(config.target, device=str(accelerator.device))
    t0 = time.perf_counter()
    records = distilled(target, config.distill, home)
    distill_s = time.perf_counter() - t0
    torch.manual_seed(config.seed)
    head = build_head(config, target).to(target.device)
    head.train()
    embed = target.model.get_input_embeddings()
    lm_head = target.model.get_output_embeddings()
    tap = FeatureTap(target, (EMBEDS, *head.target_features))
    encoder = Encoder(target)
    rng = random.Random(f"mmspec-train-head:{config.seed}")
    batches = Batches(encoder, records, config.token_budget, rng)
    if hasattr(head, "set_draft_vocab"):  # EAGLE-3: the commonest answer tokens of all data
        head.set_draft_vocab(answer_token_counts(batches, target))
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, config.steps, config.warmup_steps, config.min_lr_ratio),
    )
    head, optimizer = accelerator.prepare(head, optimizer)
    losses: list[float] = []
    metrics: list[dict[str, float]] = []
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            image = rng.random() < image_share(config, step)
            batch = teacher_batch(target, encoder, tap, batches.next(image))
            loss, parts = accelerator.unwrap_model(head).train_loss(
                batch, embed, lm_head, noise=config.noise
            )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            metrics.append({"image": float(image), **parts})
            if step % 25 == 0 or step == config.steps - 1:
                recent = metrics[-25:]
                log.info(
                    "%s/%s step %d/%d loss %.4f acc %.3f (%.0f s)",
                    config.method,
                    Path(config.target).name,
                    step,
                    config.steps,
                    sum(losses[-25:]) / len(losses[-25:]),
                    sum(m.get("acc", 0.0) for m in recent) / len(recent),
                    time.perf_counter() - start,
                )
    finally:
        tap.remove()
    head = accelerator.unwrap_model(head).eval()
    result = HeadTrainResult(
        config, losses, metrics, time.perf_counter() - start, distill_s, len(records)
    )
    return head, result


# ---- the record beside the weights --------------------------------------------------------------


def _curve(result: HeadTrainResult, rows: int = 12) -> str:
    every = max(1, len(result.losses) // rows)
    lines = ["| steps | loss | token accuracy | multimodal share |", "|---:|---:|---:|---:|"]
    for end in [*range(every, len(result.losses), every), len(result.losses)]:
        w = slice(max(0, end - every), end)
        part = result.metrics[w]
        acc = sum(m.get("acc", 0.0) for m in part) / len(part)
        img = sum(m["image"] for m in part) / len(part)
        loss = sum(result.losses[w]) / len(part)
        lines.append(f"| {w.start + 1}-{end} | {loss:.4f} | {acc:.1%} | {img:.0%} |")
    return "\n".join(lines)


def training_markdown(
    result: HeadTrainResult, command: str, resolved: dict[str, Any] | None = None
) -> str:
    """The TRAINING.md record; `resolved`: the head's options as its config.json holds them
    (what `head_args` left to the defaults included), else those given."""
    c = result.config
    options = resolved if resolved is not None else c.head_args
    d = c.distill
    runs = ", ".join(HEAD_METHODS[c.method])
    return f"""# {c.method} head for {c.target}: training record

Runs as: {runs}. Trained by the project on its target's own greedy answers (self-distillation)
to {d.per_topic} training-split conversations per topic (data seed {d.data_seed}, up to
{d.max_new_tokens} new tokens per turn; {result.records} conversations,
{result.distill_s / 60:.1f} min to generate or load). The exact command:

```bash
{command}
```

| | |
|---|---|
| steps | {c.steps}: {c.text_steps} text-only, then multimodal \
{f"(share rising over {c.ramp_steps} steps)" if c.ramp_steps else ""} |
| optimizer | AdamW lr {c.lr} (betas 0.9/0.95, weight decay {c.weight_decay}), {c.warmup_steps} \
warm-up steps then cosine to {c.min_lr_ratio} x lr, grad-norm clip {c.grad_clip} |
| batches | length-sorted, {c.token_budget} padded tokens each |
| feature noise | uniform, width {c.noise} |
| head options | {json.dumps(options) if options else "-"} |
| seed / threads | {c.seed} / {c.threads} |
| training time | {result.train_s / 60:.1f} min wall (torch {torch.__version__}) |

Loss curve (token accuracy: the head's top-1 against the target's top-1 on answer tokens,
on training batches; per-step values in training_log.json):

{_curve(result)}
"""


def write_head(head: torch.nn.Module, result: HeadTrainResult, out: Path, command: str) -> None:
    save_head(head, head.config, out)
    (out / "TRAINING.md").write_text(training_markdown(result, command, head.config.extra))
    log_record = {
        "command": command,
        "config": asdict(result.config),
        "train_s": round(result.train_s, 1),
        "distill_s": round(result.distill_s, 1),
        "losses": [round(x, 5) for x in result.losses],
        "metrics": [{k: round(v, 4) for k, v in m.items()} for m in result.metrics],
    }
    (out / "training_log.json").write_text(json.dumps(log_record) + "\n")


# ---- command line ------------------------------------------------------------------------------


@click.command("train-drafter")
@click.option("--method", type=click.Choice(sorted(HEAD_METHODS)), required=True, help="Head.")
@click.option("--target", required=True, help="Target model: registry name, hub id or path.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak lr.")
@click.option("--per-topic", type=click.IntRange(min=1), default=None, help="Distilled per topic.")
@click.option("--seed", type=int, default=None, help="Seed of init and batch order.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder. Default: the zoo, models/zoo/drafters/<target>/<method>/.",
)
def train_drafter_command(
    method: str,
    target: str,
    steps: int | None,
    lr: float | None,
    per_topic: int | None,
    seed: int | None,
    out: Path | None,
) -> None:
    """Train a draft head on its target's own answers (self-distillation)."""
    from mmspec.models.zoo_paths import cache_root

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    overrides: dict[str, Any] = {
        k: v for k, v in {"steps": steps, "lr": lr, "seed": seed}.items() if v is not None
    }
    if per_topic is not None:
        overrides["distill"] = DistillConfig(per_topic=per_topic)
    from mmspec.models.loader import ModelLoadError
    from mmspec.models.registry import UnknownModelError

    config = recipe(method, target, **overrides)
    try:
        head, result = train_head(config, cache_root())
    except (UnknownModelError, ModelLoadError) as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    dest = out or checkpoint_dir(method, target)
    args = [f"--method {method}", f"--target {target}"]
    given = {"steps": steps, "lr": lr, "per-topic": per_topic, "seed": seed}
    args += [f"--{flag} {v}" for flag, v in given.items() if v is not None]
    if out is not None:
        args.append(f"--out {out}")
    write_head(head, result, dest, " ".join(["mmspec-orch train-drafter", *args]))
    click.echo(f"{method} head for {target}: {result.train_s / 60:.1f} min -> {dest}")


if __name__ == "__main__":
    train_drafter_command()
