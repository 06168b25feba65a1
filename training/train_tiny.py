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
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import click
import torch
import transformers
from PIL import Image

from mmspec.models.loader import load_target
from mmspec.models.target import PromptBatch, QwenVLTarget, Target
from mmspec.models.tiny import BUILDERS, ZOO_DIR, tiny_init_path
from mmspec.workloads.sample import TOPICS
from mmspec.workloads.synthetic import Scene, SyntheticItem, synthetic_items, synthetic_scenes

log = logging.getLogger(__name__)

Message = dict[str, Any]

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

# Where each family's assistant turn starts in the templated text (the answer follows).
ASSISTANT_HEADER = {"qwen2.5-vl": "<|im_start|>assistant\n", "llava": " ASSISTANT:"}


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


# ---- conversations --------------------------------------------------------------------------


def training_messages(
    turns: Sequence[str], answers: Sequence[str], image: bool = True
) -> list[Message]:
    """Chat messages: the image with the first user turn, each answer after its turn.

    With one answer fewer than turns the chat ends on the next user turn (a prompt), exactly as
    the runner's `conversation()` builds it at inference.
    """
    if len(answers) not in (len(turns), len(turns) - 1):
        raise ValueError(f"{len(turns)} turns need {len(turns)} or {len(turns) - 1} answers")
    messages: list[Message] = []
    for t, text in enumerate(turns):
        content: list[dict[str, str]] = [{"type": "image"}] if t == 0 and image else []
        content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
        if t < len(answers):
            reply = [{"type": "text", "text": answers[t]}]
            messages.append({"role": "assistant", "content": reply})
    return messages


def assistant_mask(ids: list[int], header: list[int], end_ids: frozenset[int]) -> list[bool]:
    """True for the tokens of every assistant answer, its end-of-turn token included."""
    mask = [False] * len(ids)
    inside = False
    n = len(header)
    for i, tok in enumerate(ids):
        if inside:
            mask[i] = True
            inside = tok not in end_ids
        elif i >= n - 1 and ids[i - n + 1 : i + 1] == header:
            inside = True
    return mask


# What each token of an encoded conversation is, for the loss and for the attention analysis.
NO_LOSS = 0  # prompt, image and padding tokens
TEMPLATE = 1  # answer token that no fact from the picture is in
GROUNDED = 2  # first token of a fact read off the picture (and every digit of a value)
CONTINUATION = 3  # later pieces of a multi-token fact: they follow from its first token
END = 4  # the end-of-turn token after an answer


@dataclass
class Example:
    """One encoded training conversation (unpadded)."""

    input_ids: list[int]
    kinds: list[int]  # per token: NO_LOSS, TEMPLATE, GROUNDED, CONTINUATION or END
    extras: dict[str, torch.Tensor]  # image tensors of the processor, batch dim 1


def answer_token_spans(target: Target, answer: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span in `answer` of each of its tokens `ids` (as tokenised in context)."""
    # a LLaVA answer follows "ASSISTANT:", so token-wise it starts with a space
    lead = " " if target.family == "llava" else ""
    enc = target.tokenizer(lead + answer, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != ids:
        raise ValueError(f"answer {answer!r} tokenises differently in context")
    return [(max(0, s - len(lead)), e - len(lead)) for s, e in enc["offset_mapping"]]


def token_kind(span: tuple[int, int], text: str, grounded: Sequence[tuple[int, int]]) -> int:
    """TEMPLATE, GROUNDED or CONTINUATION for an answer token covering `span`."""
    start, end = span
    for g_start, g_end in grounded:
        if start < g_end and g_start < end:
            # each digit of a value is read off the picture; a word's later pieces are not
            first = start <= g_start or text.strip()[:1].isdigit()
            return GROUNDED if first else CONTINUATION
    return TEMPLATE


class Encoder:
    """Turns scenes into model inputs exactly as the target adapter encodes a prompt."""

    def __init__(self, target: Target) -> None:
        self.target = target
        tok = target.tokenizer
        self.header = tok.encode(ASSISTANT_HEADER[target.family], add_special_tokens=False)
        self.end_ids = target.eos_token_ids

    def encode(self, scene: Scene, image: Image.Image | None) -> Example:
        """The whole conversation of `scene` about `image`, answers included (no image:
        the same conversation as text only)."""
        text = self.target.tokenizer.apply_chat_template(
            training_messages(scene.turns, scene.references, image is not None), tokenize=False
        )
        feats = _process(self.target, [text], [image] if image is not None else [])
        ids = feats["input_ids"][0].tolist()
        extras = {
            k: v
            for k, v in feats.items()
            if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask")
        }
        return Example(ids, self._kinds(ids, scene), extras)

    def _kinds(self, ids: list[int], scene: Scene) -> list[int]:
        mask = assistant_mask(ids, self.header, self.end_ids)
        kinds = [NO_LOSS] * len(ids)
        runs: list[list[int]] = []  # positions of each answer's text tokens
        for p, (tok, on) in enumerate(zip(ids, mask, strict=True)):
            if not on:
                continue
            if tok in self.end_ids:
                kinds[p] = END
            elif runs and runs[-1][-1] == p - 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        for run in runs:
            for p in run:
                kinds[p] = TEMPLATE
        if len(runs) != len(scene.references):  # an empty answer: no grounding marks
            return kinds
        tokenizer = self.target.tokenizer
        for run, answer, grounded in zip(runs, scene.references, scene.grounded, strict=True):
            run_ids = [ids[p] for p in run]
            try:
                spans = answer_token_spans(self.target, answer, run_ids)
            except ValueError:
                continue
            for p, span, tok in zip(run, spans, run_ids, strict=True):
                kinds[p] = token_kind(span, tokenizer.decode([tok]), grounded)
        return kinds

    def collate(self, examples: list[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Left-padded batch inputs (with position ids) and the token kinds (batch, width)."""
        width = max(len(e.input_ids) for e in examples)
        pad = self.target.pad_token_id
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attn = torch.zeros((len(examples), width), dtype=torch.long)
        kinds = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            ids[row, width - n :] = torch.tensor(e.input_ids)
            attn[row, width - n :] = 1
            kinds[row, width - n :] = torch.tensor(e.kinds)
        inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": attn}
        for key in examples[0].extras:
            parts = [e.extras[key] for e in examples]
            if key == "mm_token_type_ids":  # per token: pad like the ids
                inputs[key] = torch.stack(
                    [torch.nn.functional.pad(p[0], (width - p.shape[1], 0)) for p in parts]
                )
            else:  # image tensors: concatenated in row order, as the processor batches them
                inputs[key] = torch.cat(parts)
        position_ids, _ = self.target.prefill_positions(PromptBatch(inputs, ids, attn))
        inputs["position_ids"] = position_ids
        return self.target.place(inputs), kinds.to(self.target.device)


def _process(target: Target, texts: list[str], images: list[Image.Image]) -> Any:
    if isinstance(target, QwenVLTarget):
        return target.processor(texts, images)
    return target.processor(text=texts, images=images or None, return_tensors="pt")


# ---- data stream ----------------------------------------------------------------------------


class Stream:
    """An endless, seeded stream of training-split scenes, drawn topic by topic by weight.

    Pictures are drawn straight to pixels: the suite's PNG bytes decode to the same pixels,
    and skipping the round trip halves the cost of a training example.
    """

    def __init__(self, mix: dict[str, float], seed: int, data_seed: int) -> None:
        unknown = sorted(set(mix) - set(TOPICS))
        if unknown:
            raise ValueError(f"unknown topics in mix: {unknown}; allowed: {list(TOPICS)}")
        self._topics = [t for t in TOPICS if mix.get(t, 0) > 0]
        self._weights = [mix[t] for t in self._topics]
        self._rng = random.Random(f"mmspec-train-tiny:{seed}")
        self._data_seed = data_seed
        self._next_index = dict.fromkeys(self._topics, 0)  # per topic: first unused scene

    def take(self, n: int) -> list[tuple[Scene, Image.Image]]:
        topics = self._rng.choices(self._topics, self._weights, k=n)
        scenes: list[Scene] = []
        for topic in self._topics:
            k = topics.count(topic)
            if k:
                start = self._next_index[topic]
                self._next_index[topic] += k
                found = synthetic_scenes(k, self._data_seed, [topic], "train", start)
                scenes += [scene for _, scene in found]
        self._rng.shuffle(scenes)
        return [(scene, scene.picture.draw()) for scene in scenes]


def batches(
    encoder: Encoder, stream: Stream, budget: int, pool_batches: int, rng: random.Random
) -> Iterator[list[Example]]:
    """Batches of similar length under a padded-token budget, in shuffled order."""
    while True:
        # a pool's size in examples, guessed from the mean length seen so far
        pool: list[Example] = []
        padded = 0
        while padded < budget * pool_batches:
            examples = [encoder.encode(scene, image) for scene, image in stream.take(32)]
            pool += examples
            padded += sum(len(e.input_ids) for e in examples)
        out = pack_by_length(pool, lambda e: len(e.input_ids), budget)
        rng.shuffle(out)
        yield from out


T = TypeVar("T")


def pack_by_length(items: Sequence[T], length: Callable[[T], int], budget: int) -> list[list[T]]:
    """Items sorted by length, cut into batches whose padded size (rows x longest) stays
    within `budget` tokens (an item longer than the budget goes alone)."""
    out: list[list[T]] = []
    current: list[T] = []
    for item in sorted(items, key=length):
        if current and (len(current) + 1) * length(item) > budget:
            out.append(current)
            current = []
        current.append(item)
    if current:
        out.append(current)
    return out


class BatchSource(torch.utils.data.IterableDataset):
    """The batch stream of a config, so a DataLoader worker can draw while the model trains."""

    def __init__(self, encoder: Encoder, config: TrainConfig) -> None:
        self.encoder = encoder
        self.config = config

    def __iter__(self) -> Iterator[list[Example]]:
        c = self.config
        stream = Stream(c.mix, c.seed, c.data_seed)
        order = random.Random(f"mmspec-train-tiny-order:{c.seed}")
        return batches(self.encoder, stream, c.token_budget, c.pool_batches, order)


def _as_is(batch: list[Example]) -> list[Example]:
    return batch


# ---- training -------------------------------------------------------------------------------


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
        monitor_set = _monitor_set(encoder) if any(c.monitor_every for c in stages) else []
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
                _mean(losses[-n:]),
                _mean(ce["grounded"][-n:]),
                _mean(ce["template"][-n:]),
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


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped data workers
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _monitor_set(encoder: Encoder, per_topic: int = 8) -> list[list[Example]]:
    """A fixed held-out set (eval split, all topics), in small batches."""
    items = synthetic_items(per_topic, 0, None, "eval")
    examples = [encoder.encode(it.scene, it.sample.load_image()) for it in items]
    return [examples[i : i + 8] for i in range(0, len(examples), 8)]


@torch.no_grad()
def token_accuracy(
    model: torch.nn.Module, encoder: Encoder, batches: list[list[Example]]
) -> dict[str, float]:
    """Teacher-forced argmax accuracy of grounded and template answer tokens."""
    model.eval()
    hits = {GROUNDED: [0, 0], TEMPLATE: [0, 0]}
    for batch in batches:
        inputs, kinds = encoder.collate(batch)
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        right = logits.argmax(-1) == inputs["input_ids"][:, 1:]
        for kind, counts in hits.items():
            sel = kinds[:, 1:] == kind
            counts[0] += int(right[sel].sum())
            counts[1] += int(sel.sum())
    return {
        "grounded": round(hits[GROUNDED][0] / max(1, hits[GROUNDED][1]), 4),
        "template": round(hits[TEMPLATE][0] / max(1, hits[TEMPLATE][1]), 4),
    }


# ---- held-out accuracy ------------------------------------------------------------------------


SHORT_ANSWER_TOPICS = ("general vqa", "text vqa")


def first_answers(
    target: Target,
    items: Sequence[SyntheticItem],
    images: Sequence[Image.Image],
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers to each item's first turn about `images` (its own, or others)."""
    from mmspec.methods.engine import Engine
    from mmspec.methods.registry import get_drafter

    engine = Engine(target, get_drafter("ar")())
    answers: list[str] = []
    for i in range(0, len(items), batch_size):
        convs = [training_messages(it.scene.turns[:1], []) for it in items[i : i + batch_size]]
        results = engine.generate(convs, list(images[i : i + batch_size]), max_new_tokens)
        answers += [target.decode(r.tokens).strip() for r in results]
    return answers


def eval_accuracy(
    target: Target,
    per_topic: int,
    topics: Sequence[str] = SHORT_ANSWER_TOPICS,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on the eval split, per topic and overall."""
    items = synthetic_items(per_topic, seed, list(topics), "eval")
    answers = first_answers(target, items, [it.sample.load_image() for it in items], batch_size)
    hits: dict[str, list[bool]] = {t: [] for t in topics}
    for it, answer in zip(items, answers, strict=True):
        hits[it.scene.topic].append(answer == it.scene.references[0])
    accuracy = {t: sum(h) / len(h) for t, h in hits.items()}
    accuracy["all"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return accuracy


# ---- writing the zoo entry ----------------------------------------------------------------------


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
                f"| {stage} | {w.start + 1}-{end} | {_mean(r.losses[w]):.4f} | "
                f"{_mean(r.grounded_ce[w]):.4f} | {_mean(r.template_ce[w]):.4f} |"
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
