"""GPU evidence (issue 20, part 4): the engine on random-weight Qwen2.5-VL-7B and LLaVA-1.5-7B.

One command on a GPU machine (real 7B depth and width, bf16; budget <= 8 minutes on one
H100/H200; `--out $OUT/gpu_evidence.md` on a lent machine, so the section comes back):

    .venv/bin/python benchmarks/gpu_evidence.py --device cuda

(with a CUDA build of torch in the environment: the Makefile's venv has the CPU build.)

Without a GPU the same code runs a reduced config (real widths and vocabularies, 2 text and 2
vision layers; the report says so), and `--smoke` runs toy widths in seconds for CI
(tests/test_gpu_evidence.py):

    .venv/bin/python benchmarks/gpu_evidence.py              # CPU, reduced: a few minutes
    .venv/bin/python benchmarks/gpu_evidence.py --smoke      # CPU, toy widths: seconds

Models are built from the real checkpoints' public config.json values with the same
transformers classes as the real ones (no hub download), random weights from a fixed seed. The
tokenizer is the tiny zoo's byte-level BPE (the real ones are hub downloads; with random weights
only a prompt's length matters). Per model it measures:

1. `ar` vs HF `generate()` at batch size 1: tokens/s, and the engine's overhead over forward
   time (wall minus the time inside the model's forward - HF: `model.forward`; the engine:
   `Target.prefill` and `Target.verify`, whose text steps run the model's layers without
   `model.forward` - the device synchronised at both ends of each forward). EOS is off on
   both sides, so both run `max_new_tokens` steps. Before any number is printed, `ar`'s
   tokens are checked against HF greedy: equal, or - random weights
   in bf16 give near-tied logits - diverging only where HF's own logits call it a tie; and
   every `ar` token must be HF's argmax within that tolerance under teacher forcing.
2. The verification cost t(T): one `Target.verify` forward of T tokens per row (the engine's
   4D mask and explicit positions) over the KV cache of a real prompt with its image, for each
   batch size; the cache is cropped back after each forward.
3. Each head type's draft step at the target's real width (random head weights): the engine's
   own per-step draft / verify / commit times over a short generation at batch size 1, with
   each method's default tree.
4. Telemetry: a tiny shard through the real `ShardRunner` (its sampler: NVML on a GPU, the host
   otherwise); which energy / power / memory columns of the Arrow rows came back filled.

Warm-up runs outside every timed window; timed cases are interleaved; the Markdown section
(device, versions, config, every table) is printed and written to `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow as pa
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from mmspec.methods import draft_checkpoint
from mmspec.methods.base import Drafter
from mmspec.methods.engine import Engine
from mmspec.methods.head_config import DraftConfig
from mmspec.methods.registry import get_drafter
from mmspec.methods.verify_cost import device_sync, measure_verify_costs
from mmspec.models.prompting import MMSPEC_QWEN_PIXELS
from mmspec.models.target import LlavaTarget, Message, QwenPromptProcessor, QwenVLTarget, Target
from mmspec.models.zoo_paths import ZOO_DIR
from mmspec.orchestrator import runner as runner_module
from mmspec.orchestrator.runner import ShardRunner, conversation
from mmspec.orchestrator.shards import Shard
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.schema import rows_to_table
from mmspec.workloads import Sample, load_mmspec, synthetic_suite

SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parent / "gpu_evidence.md"
HEAD_METHODS = ("eagle", "eagle2", "eagle3", "medusa", "vispec", "msd")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# A logit margin up to this share of the step's largest |logit| is a numerical tie: bf16 keeps
# 8 bits of mantissa, so two correct paths (4D mask vs causal kernel) disagree by a few ulps.
TIE_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# ---- the real checkpoints' config.json values (Qwen/Qwen2.5-VL-7B-Instruct,
# llava-hf/llava-1.5-7b-hf); a reduced run cuts depth only, --smoke width too ----------------
QWEN_7B_TEXT: dict[str, Any] = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
}
QWEN_7B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu",
    "tokens_per_second": 2,
}
LLAVA_7B_TEXT: dict[str, Any] = {  # Vicuna-7B v1.5: Llama-2-7B's shape
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
}
LLAVA_7B_VISION: dict[str, Any] = {  # CLIP ViT-L/14 at 336 px: 576 image tokens
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
LLAVA_IMAGE_PX = 336
SMOKE_WIDTHS: dict[str, dict[str, Any]] = {
    "qwen_text": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
        # head_dim 32: 16 rotary pairs split over (t, h, w)
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
    },
    "qwen_vision": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 128,
    },
    "llava_text": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 2048,
    },
    "llava_vision": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "projection_dim": 64,
    },
}
# LLaVA-1.5's prompt shape ("<system> USER: <image>\n<text> ASSISTANT:"); the tiny zoo's own
# template has no system role, which MMSpec's prompts carry.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for c in message['content'] %}{{ c['text'] }} {% endfor %}"
    "{% else %}{{ message['role'] | upper }}: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class Scale:
    """How far the real configs are cut: depth only (reduced), or width too (smoke)."""

    name: str  # "real" | "reduced" | "smoke"
    text_layers: int | None  # None: the real depth
    vision_layers: int | None
    toy_width: bool = False

    def describe(self) -> str:
        if self.name == "real":
            return (
                "real (Qwen2.5-VL-7B: 28 x 3584 text, ViT 32 x 1280; LLaVA-1.5-7B: 32 x 4096 "
                "text, CLIP 24 x 1024 at 336 px)"
            )
        width = "toy widths (128 text, 64 vision)" if self.toy_width else "real widths"
        text, vision = self.text_layers or "all", self.vision_layers or "all"
        return (
            f"{self.name}: {text} text and {vision} vision layers, "
            f"{width} and vocabularies, same classes"
        )


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    scale: Scale
    models: tuple[str, ...]
    prompts: int  # prompts of the ar vs HF comparison
    max_new_tokens: int
    repeats: int  # timed repeats after one warm-up; the best (ar vs HF) or median (t(T)) is kept
    t_values: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    head_tokens: int  # tokens generated per head type
    telemetry_samples: int
    split: Path | None
    out: Path


# Defaults per scale: "real" fits 8 minutes on one H100; "reduced" ~5 minutes on 2 CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "real": {
        "prompts": 2,
        "max_new_tokens": 64,
        "repeats": 3,
        "t_values": tuple(range(1, 65)),
        "batch_sizes": (1, 4, 8),
        "head_tokens": 32,
        "telemetry_samples": 4,
    },
    "reduced": {
        "prompts": 1,
        "max_new_tokens": 16,
        "repeats": 2,
        "t_values": (1, 2, 4, 8, 16, 32, 64),
        "batch_sizes": (1, 4, 8),
        "head_tokens": 4,
        "telemetry_samples": 2,
    },
    "smoke": {
        "prompts": 1,
        "max_new_tokens": 4,
        "repeats": 1,
        "t_values": (1, 4),
        "batch_sizes": (1, 2),
        "head_tokens": 3,
        "telemetry_samples": 2,
    },
}


# ---- models --------------------------------------------------------------------------------
def _tokenizer(zoo_name: str) -> Any:
    return AutoTokenizer.from_pretrained(
        ZOO_DIR / zoo_name, local_files_only=True, padding_side="left"
    )


def _cut(config: dict[str, Any], key: str, layers: int | None) -> dict[str, Any]:
    return config if layers is None else {**config, key: layers}


def _random_model(
    cls: type[PreTrainedModel], config: Any, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    torch.manual_seed(SEED)
    # built where it runs and in its dtype: a 7B model never passes through host memory
    with device:
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    # EOS off: random weights would end rows at random steps, and both decoders must run the
    # same number of steps
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    return model.eval()


def _target(cls: type[Target], model: nn.Module, processor: Any, tok: Any, name: str) -> Target:
    target = cls(model, processor, tok, name=f"random-{name}", prompt_style="mmspec")
    target.eos_token_ids = frozenset()  # the engine's side of "EOS off"
    return target


def build_qwen(scale: Scale, dtype: torch.dtype, device: torch.device) -> Target:
    tok = _tokenizer("tiny-qwen2.5-vl")
    ids = tok.convert_tokens_to_ids
    toy = scale.toy_width
    text = _cut(
        {**QWEN_7B_TEXT, **(SMOKE_WIDTHS["qwen_text"] if toy else {})},
        "num_hidden_layers",
        scale.text_layers,
    )
    text.update(
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    vision = {**QWEN_7B_VISION, **(SMOKE_WIDTHS["qwen_vision"] if toy else {})}
    if scale.vision_layers is not None:
        depth = scale.vision_layers
        full = [i for i in QWEN_7B_VISION["fullatt_block_indexes"] if i < depth]
        vision.update(depth=depth, fullatt_block_indexes=full or [depth - 1])
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = _random_model(Qwen2_5_VLForConditionalGeneration, config, dtype, device)
    # MMSpec's pixel bounds for Qwen2.5-VL (models/prompting.py): 256-1280 merged patches
    pixels = Qwen2VLImageProcessorPil(
        **MMSPEC_QWEN_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = QwenPromptProcessor(tok, pixels, config.image_token_id)
    return _target(QwenVLTarget, model, processor, tok, "qwen2.5-vl-7b")


def build_llava(scale: Scale, dtype: torch.dtype, device: torch.device) -> Target:
    tok = _tokenizer("tiny-llava")
    tok.chat_template = LLAVA_TEMPLATE
    toy = scale.toy_width
    text = _cut(
        {**LLAVA_7B_TEXT, **(SMOKE_WIDTHS["llava_text"] if toy else {})},
        "num_hidden_layers",
        scale.text_layers,
    )
    text.update(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    vision = _cut(
        {**LLAVA_7B_VISION, **(SMOKE_WIDTHS["llava_vision"] if toy else {})},
        "num_hidden_layers",
        scale.vision_layers,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    model = _random_model(LlavaForConditionalGeneration, config, dtype, device)
    side = {"height": LLAVA_IMAGE_PX, "width": LLAVA_IMAGE_PX}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": LLAVA_IMAGE_PX}, crop_size=side
        ),
        tokenizer=tok,
        patch_size=LLAVA_7B_VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_TEMPLATE,
    )
    return _target(LlavaTarget, model, processor, tok, "llava-1.5-7b")


BUILDERS: dict[str, tuple[str, Callable[[Scale, torch.dtype, torch.device], Target]]] = {
    "qwen": ("Qwen2.5-VL-7B", build_qwen),
    "llava": ("LLaVA-1.5-7B", build_llava),
}


# ---- timing --------------------------------------------------------------------------------
class CallClock:
    """Sums wall time inside `owner.<name>` until `remove()`.

    The device is synchronised on entry and exit, so queued GPU work is charged to whoever
    queued it: wall minus forward time is then everything that is not the model's forward.
    """

    def __init__(self, owner: object, name: str, sync: Callable[[], None]) -> None:
        self.total = 0.0
        self._owner, self._name = owner, name
        orig = getattr(owner, name)

        # wraps keeps forward's signature: generate() inspects it to route model kwargs
        @functools.wraps(orig)
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                sync()
                self.total += time.perf_counter() - t0

        setattr(owner, name, timed)  # an instance attribute shadows the bound method

    def remove(self) -> None:
        delattr(self._owner, self._name)


# ---- prompts -------------------------------------------------------------------------------
Prompt = tuple[list[Message], Image.Image | None]


def load_prompts(split: Path | None, n: int) -> list[Prompt]:
    """First turns of the first `n` samples: MMSpec's when a split is given, else the
    built-in synthetic suite (one per topic)."""
    samples: list[Sample] = load_mmspec(split) if split else synthetic_suite(per_topic=1)
    prompts = []
    for sample in samples[:n]:
        image = sample.load_image()
        prompts.append((conversation(sample, [], image is not None), image))
    return prompts


# ---- 1. ar vs HF generate ------------------------------------------------------------------
@dataclass
class DecodeRun:
    name: str
    tokens: int
    wall_s: float
    forward_s: float
    encode_s: float  # Target.encode (chat template, image preprocessing): both sides pay it
    same_tokens: bool = True  # every timed run gave the tokens that were checked


@dataclass
class Agreement:
    """How one prompt's `ar` tokens compare with HF greedy."""

    tokens: int
    first_diff: int | None  # first position where ar and HF greedy differ; None: equal
    diff_margin: float  # there, HF's logit of its token minus that of ar's (0 when equal)
    worst_margin: float  # teacher forced on ar's tokens: max over steps of argmax - ar's logit
    noise: float  # max |logit difference| of HF's incremental vs full forward on HF's tokens
    tolerance: float  # a margin up to this is a numerical tie
    hf: list[int] = field(default_factory=list, repr=False)  # HF greedy's tokens

    @property
    def ok(self) -> bool:
        return self.diff_margin <= self.tolerance and self.worst_margin <= self.tolerance

    def describe(self) -> str:
        if len(self.hf) != self.tokens:
            head = f"ar gave {self.tokens} tokens, HF {len(self.hf)}"
        elif self.first_diff is None:
            head = f"token-equal ({self.tokens} tokens)"
        else:
            head = (
                f"equal up to token {self.first_diff} of {self.tokens}, where HF's margin "
                f"of its token over ar's is {self.diff_margin:.3g}"
            )
        return (
            f"{head}; every ar token is HF's argmax within {self.worst_margin:.3g} under "
            f"teacher forcing (tie tolerance {self.tolerance:.3g}; HF's incremental vs full "
            f"forward differ by {self.noise:.3g})"
        )


def _hf_generate(target: Target, prompt: Prompt, max_new: int, logits: bool = False) -> Any:
    p = target.encode([prompt[0]], [prompt[1]])
    out = target.model.generate(
        **p.inputs,
        max_new_tokens=max_new,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=logits,
    )
    return p, out


def _forced_logits(target: Target, p: Any, tokens: list[int]) -> torch.Tensor:
    """(n, V) float: HF's logits for tokens[k] given the prompt and tokens[:k], from one plain
    causal forward (the model's own positions and mask, no cache)."""
    dev = target.device
    extra = torch.tensor([tokens[:-1]], device=dev)
    inputs = dict(p.inputs)
    inputs["input_ids"] = torch.cat([p.input_ids, extra], dim=1)
    inputs["attention_mask"] = torch.cat([p.attention_mask, torch.ones_like(extra)], dim=1)
    if "mm_token_type_ids" in inputs:  # generated tokens are text
        types = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat(
            [types, torch.zeros_like(extra, dtype=types.dtype)], 1
        )
    with torch.inference_mode():
        out = target.model(**inputs, use_cache=False, logits_to_keep=len(tokens))
    return out.logits[0].float()


def _margins(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(n,) per step: the largest logit minus the logit of `tokens[k]`."""
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    return logits.max(dim=1).values - chosen


def agreement(target: Target, prompt: Prompt, ar: list[int], max_new: int) -> Agreement:
    """Check `ar`'s tokens against HF greedy; the numerical tolerance comes from HF itself."""
    p, out = _hf_generate(target, prompt, max_new, logits=True)
    hf = out.sequences[0, p.input_ids.shape[1] :].tolist()
    incremental = torch.stack(out.logits)[:, 0].float()  # (n, V) what generate() decided on
    forced_hf = _forced_logits(target, p, hf)
    noise = float((incremental - forced_hf).abs().max())
    rtol = TIE_RTOL[target.dtype] * float(incremental.abs().max())
    tolerance = max(rtol, 2.0 * noise)
    first = next((k for k, (a, h) in enumerate(zip(ar, hf)) if a != h), None)
    margin = 0.0
    if len(ar) != len(hf):  # EOS is off: both must have run max_new steps
        first, margin = min(len(ar), len(hf)), float("inf")
    elif first is not None:
        row = incremental[first]
        margin = float(row[hf[first]] - row[ar[first]])
    forced_ar = forced_hf if ar == hf else _forced_logits(target, p, ar)
    worst = float(_margins(forced_ar, ar).max())
    return Agreement(len(ar), first, margin, worst, noise, tolerance, hf)


def compare_with_hf(
    target: Target, prompts: list[Prompt], settings: Settings
) -> tuple[list[DecodeRun], list[Agreement]]:
    """`ar` and HF generate on the same prompts, checked, then timed (best of repeats)."""
    sync, max_new = device_sync(settings.device), settings.max_new_tokens
    engine = Engine(target, get_drafter("ar")())

    def run_ar() -> list[list[int]]:
        return [engine.generate([c], [i], max_new)[0].tokens for c, i in prompts]

    def run_hf() -> list[list[int]]:
        outs = []
        for prompt in prompts:
            p, out = _hf_generate(target, prompt, max_new)
            outs.append(out.sequences[0, p.input_ids.shape[1] :].tolist())
        return outs

    reference = run_ar()  # also the warm-up of both sides (agreement runs generate())
    checks = [agreement(target, pr, ar, max_new) for pr, ar in zip(prompts, reference)]
    bad = [c.describe() for c in checks if not c.ok]
    if bad:
        raise SystemExit(f"{target.name}: ar differs from HF greedy beyond ties: {bad}")
    cases = {"engine ar": run_ar, "HF generate": run_hf}
    checked = {"engine ar": reference, "HF generate": [c.hf for c in checks]}
    # the engine's forwards are Target.prefill (through model.forward) and Target.verify (the
    # model's embedding, layers, norm and LM head, without model.forward); HF's model.forward
    clocks = {
        "engine ar": [CallClock(target, "prefill", sync), CallClock(target, "verify", sync)],
        "HF generate": [CallClock(target.model, "forward", sync)],
    }
    encode = CallClock(target, "encode", sync)
    best: dict[str, DecodeRun] = {}
    same: dict[str, bool] = {}
    try:
        for _ in range(settings.repeats):
            for name, fn in cases.items():  # interleaved: drift hits both sides alike
                for clock in (*clocks[name], encode):
                    clock.total = 0.0
                sync()
                t0 = time.perf_counter()
                outs = fn()
                sync()
                wall = time.perf_counter() - t0
                forward_s = sum(clock.total for clock in clocks[name])
                run = DecodeRun(name, sum(map(len, outs)), wall, forward_s, encode.total)
                if name not in best or wall < best[name].wall_s:
                    best[name] = run
                same[name] = same.get(name, True) and outs == checked[name]
    finally:
        for clock in (*clocks["engine ar"], *clocks["HF generate"], encode):
            clock.remove()
    for name, run in best.items():
        run.same_tokens = same[name]
    return list(best.values()), checks


# ---- 2. verification cost t(T) --------------------------------------------------------------
def verify_curve(
    target: Target, prompt: Prompt, settings: Settings
) -> tuple[int, dict[tuple[int, int], float]]:
    """Median seconds of one verify forward per (batch size, T) (the runner's own measurement,
    methods/verify_cost.py); and the cached context."""
    costs = measure_verify_costs(
        target,
        prompt[0],
        prompt[1],
        settings.batch_sizes,
        settings.t_values,
        settings.repeats,
        keep=statistics.median,
    )
    curve = {(c.batch_size, t): s for c in costs for t, s in zip(c.tokens, c.seconds)}
    return costs[0].context_len, curve


# ---- 3. draft-step cost per head type -------------------------------------------------------
@dataclass
class HeadCost:
    method: str
    params: int
    steps: int
    nodes: float  # drafted tokens per step (the tree's size)
    draft_s: float  # per step: propose (feed the head what is new, grow the tree)
    verify_s: float  # per step: the target's forward over the tree
    commit_s: float  # per step: accept, drafter.update (features), KV commit


def random_head(drafter: type[Drafter], target: Target) -> nn.Module:
    """The drafter's head at the target's width, random weights (as a fresh head is built)."""
    head_cls = drafter.head_cls
    weights = getattr(drafter, "weights", "") or drafter.name  # eagle2 runs eagle's head
    # EAGLE-3's config also needs the target's image-slot token
    make_config = getattr(head_cls, "draft_config", DraftConfig.for_target)
    config = make_config(weights, target)
    torch.manual_seed(SEED)
    with target.device:
        head = head_cls(config)
    return head.to(target.dtype).eval()


def _engine_with(target: Target, drafter: type[Drafter], head: nn.Module) -> Engine:
    """An engine whose drafter gets `head` where it would load a checkpoint; the drafter's own
    `load` (device, dtype, embeddings, feature taps) still runs."""
    with mock.patch.object(draft_checkpoint, "load_head", lambda *_a, **_k: head):
        return Engine(target, drafter())


def head_costs(target: Target, prompt: Prompt, settings: Settings) -> list[HeadCost]:
    costs = []
    for method in HEAD_METHODS:
        drafter = get_drafter(method)
        head = random_head(drafter, target)
        engine = _engine_with(target, drafter, head)
        try:
            engine.generate([prompt[0]], [prompt[1]], 2)  # warm-up: first tree, allocator
            g = engine.generate([prompt[0]], [prompt[1]], settings.head_tokens)[0]
        finally:
            if engine.tap is not None:  # its hooks sit on the shared target
                engine.tap.remove()
        n = max(1, g.steps)
        params = sum(p.numel() for p in head.parameters())
        costs.append(
            HeadCost(
                method=method,
                params=params,
                steps=g.steps,
                nodes=g.drafted / n,
                draft_s=g.draft_s / n,
                verify_s=g.verify_s / n,
                commit_s=g.commit_s / n,
            )
        )
        del engine, head
    return costs


# ---- 4. telemetry through the real ShardRunner ---------------------------------------------
@dataclass
class TelemetryCheck:
    sampler: str  # "NVML" | "host (RAPL)" | "host (no RAPL)"
    rows: int
    ok_rows: int
    filled: dict[str, str]  # column -> "k/n filled, <summary>"


def _fill(column: pa.ChunkedArray, unit: str, scale: float = 1.0, agg: str = "max") -> str:
    values = [v for v in column.to_pylist() if v is not None]
    if not values:
        return f"0/{len(column)} (null)"
    value = max(values) if agg == "max" else statistics.fmean(values)
    return f"{len(values)}/{len(column)}, {agg} {value / scale:.3g} {unit}"


@contextmanager
def _runner_on(target: Target) -> Iterator[None]:
    """ShardRunner loads its model by id; hand it the built one instead (a 7B checkpoint
    written and read back would cost minutes). Everything after loading is the runner's."""
    with mock.patch.object(runner_module, "load_target", lambda *_a, **_k: target):
        yield


def telemetry_check(target: Target, settings: Settings, dtype_name: str) -> TelemetryCheck:
    samples = synthetic_suite(per_topic=1)[: settings.telemetry_samples]
    with _runner_on(target):
        runner = ShardRunner(ModelConfig(target.name, dtype=dtype_name), "ar", {})
    try:
        cell = Cell(
            cell_id="evidence",
            model=runner.model_config,
            method="ar",
            method_args={},
            batch_size=2,
            temperature=0.0,
            repeat=0,
            seed=SEED,
            max_new_tokens=settings.max_new_tokens,
            workload="synthetic",
        )
        rows = runner.run(Shard("gpu-evidence", "evidence-0", cell, tuple(samples)))
        series = runner.last_telemetry
    finally:
        runner.close()
    table = rows_to_table(rows)  # the result rows as the store writes them (RESULT_SCHEMA)
    assert series is not None
    gpu = any(v is not None for v in series.column("mem_used_bytes").to_pylist())
    rapl = any(v is not None for v in series.column("energy_j").to_pylist())
    sampler = "NVML" if gpu else ("host (RAPL)" if rapl else "host (no RAPL)")
    gib = 2**30
    filled = {
        "rows.energy_j": _fill(table.column("energy_j"), "J"),
        "rows.peak_mem_bytes": _fill(table.column("peak_mem_bytes"), "GiB", gib),
        "rows.device_name": f"{table.column('device_name')[0]}",
        "telemetry.power_w": _fill(series.column("power_w"), "W", agg="mean"),
        "telemetry.energy_j": _fill(series.column("energy_j"), "J"),
        "telemetry.mem_used_bytes": _fill(series.column("mem_used_bytes"), "GiB", gib),
        "telemetry.rss_bytes": _fill(series.column("rss_bytes"), "GiB", gib),
    }
    ok = sum(1 for s in table.column("status").to_pylist() if s == "ok")
    return TelemetryCheck(sampler, table.num_rows, ok, filled)


# ---- one model, all four ------------------------------------------------------------------
@dataclass
class ModelEvidence:
    label: str
    params: int
    prompt_tokens: list[int]
    decode: list[DecodeRun]
    checks: list[Agreement]
    cache_len: int
    curve: dict[tuple[int, int], float]
    heads: list[HeadCost]
    telemetry: TelemetryCheck
    phases: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: int | None = None


@contextmanager
def _phase(phases: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - t0
    print(f"  {name}: {phases[name]:.1f} s", file=sys.stderr, flush=True)


def run_model(key: str, settings: Settings) -> ModelEvidence:
    label, build = BUILDERS[key]
    dtype_name = next(k for k, v in DTYPES.items() if v == settings.dtype)
    phases: dict[str, float] = {}
    print(f"{label}:", file=sys.stderr, flush=True)
    with _phase(phases, "build"):
        target = build(settings.scale, settings.dtype, settings.device)
        prompts = load_prompts(settings.split, settings.prompts)
    lens = [target.encode([c], [i]).input_ids.shape[1] for c, i in prompts]
    with _phase(phases, "ar vs HF"):
        decode, checks = compare_with_hf(target, prompts, settings)
    with _phase(phases, "t(T)"):
        cache_len, curve = verify_curve(target, prompts[0], settings)
    with _phase(phases, "heads"):
        heads = head_costs(target, prompts[0], settings)
    with _phase(phases, "telemetry"):
        telemetry = telemetry_check(target, settings, dtype_name)
    peak = None
    if settings.device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(settings.device))
    params = sum(p.numel() for p in target.model.parameters())
    evidence = ModelEvidence(
        label, params, lens, decode, checks, cache_len, curve, heads, telemetry, phases, peak
    )
    del target
    gc.collect()
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(settings.device)
    return evidence


# ---- the report ----------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:  # platform.processor() is empty on most Linux hosts; /proc/cpuinfo names the model
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, CPU only ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _decode_table(models: list[ModelEvidence]) -> list[str]:
    lines = [
        "| model | decoder | tokens | wall s | tokens/s | forward s | overhead (wall - forward) "
        "| processor | overhead - processor | tokens as checked |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        for r in m.decode:
            over = (r.wall_s - r.forward_s) / r.wall_s
            lines.append(
                f"| {m.label} | {r.name} | {r.tokens} | {r.wall_s:.2f} | {r.tokens / r.wall_s:.1f} "
                f"| {r.forward_s:.2f} | {over:.1%} | {r.encode_s / r.wall_s:.1%} "
                f"| {over - r.encode_s / r.wall_s:.1%} | {'yes' if r.same_tokens else '**no**'} |"
            )
        by = {r.name: r for r in m.decode}
        ar, hf = by["engine ar"], by["HF generate"]
        ratio = (ar.tokens / ar.wall_s) / (hf.tokens / hf.wall_s)
        lines.append(
            f"| {m.label} | **engine ar / HF tokens/s** | **{ratio:.2f}x** | | | | | | | |"
        )
    return lines


def _curve_table(m: ModelEvidence, settings: Settings) -> list[str]:
    bs = settings.batch_sizes
    head = (
        " | ".join(f"bs {b} ms" for b in bs) + " | " + " | ".join(f"bs {b} t(T)/t(1)" for b in bs)
    )
    lines = [f"| T | {head} |", "|---" * (1 + 2 * len(bs)) + "|"]
    for t in settings.t_values:
        ms = [f"{1e3 * m.curve[(b, t)]:.1f}" for b in bs]
        rel = [f"{m.curve[(b, t)] / m.curve[(b, settings.t_values[0])]:.2f}" for b in bs]
        lines.append(f"| {t} | " + " | ".join(ms + rel) + " |")
    return lines


def _heads_table(models: list[ModelEvidence]) -> list[str]:
    lines = [
        "| model | method | head params (M) | steps | tree nodes / step | draft ms / step "
        "| verify ms / step | commit ms / step | draft / verify |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        for h in m.heads:
            lines.append(
                f"| {m.label} | {h.method} | {h.params / 1e6:.1f} | {h.steps} | {h.nodes:.1f} "
                f"| {1e3 * h.draft_s:.2f} | {1e3 * h.verify_s:.2f} | {1e3 * h.commit_s:.2f} "
                f"| {h.draft_s / h.verify_s:.2f} |"
            )
    return lines


def _telemetry_table(models: list[ModelEvidence]) -> list[str]:
    columns = list(models[0].telemetry.filled)
    lines = [
        "| model | sampler | rows ok | " + " | ".join(f"`{c}`" for c in columns) + " |",
        "|---" * (3 + len(columns)) + "|",
    ]
    for m in models:
        t = m.telemetry
        cells = " | ".join(t.filled[c] for c in columns)
        lines.append(f"| {m.label} | {t.sampler} | {t.ok_rows}/{t.rows} | {cells} |")
    return lines


def render(models: list[ModelEvidence], settings: Settings, command: str, total_s: float) -> str:
    dev = settings.device
    where = "GPU" if dev.type == "cuda" else "CPU stand-in, reduced config"
    if settings.scale.name == "smoke":
        where = "CPU smoke run, toy widths"
    dtype = next(k for k, v in DTYPES.items() if v == settings.dtype)
    out = [
        f"## GPU evidence: random-weight Qwen2.5-VL-7B and LLaVA-1.5-7B ({where}; issue 20)",
        "",
        f"Command: `{command}`, {datetime.date.today().isoformat()}, {total_s / 60:.1f} min "
        "end to end.",
        "",
        f"- Device: **{device_name(dev)}**; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}.",
        f"- Config: {settings.scale.describe()}; dtype {dtype}; random weights (seed {SEED}); "
        "sdpa attention; the tiny zoo's tokenizer (1024 ids) over the real vocabularies.",
        "- Params: "
        + ", ".join(f"{m.label} {_count(m.params)}" for m in models)
        + (
            "; peak GPU memory "
            + ", ".join(f"{m.label} {m.peak_gpu_bytes / 2**30:.1f} GiB" for m in models)
            if dev.type == "cuda"
            else ""
        ),
        "- Prompts: "
        + ("MMSpec " + settings.split.name if settings.split else "synthetic suite")
        + ", first turns with their image; prompt tokens "
        + ", ".join(f"{m.label} {m.prompt_tokens}" for m in models)
        + ".",
        "",
        f"### 1. `ar` vs HF `generate()`: batch size 1, greedy, EOS off, "
        f"{settings.max_new_tokens} new tokens per prompt",
        "",
        f"Best of {settings.repeats} interleaved repeats after a warm-up. Overhead = wall "
        "minus the time inside the model's `forward` (device synchronised at both ends); "
        "`processor` = `Target.encode` (both sides pay it, once per prompt).",
        "",
        *_decode_table(models),
        "",
        "Checked before timing, per prompt:",
        *[
            f"- {m.label}, prompt {i}: {c.describe()}"
            for m in models
            for i, c in enumerate(m.checks)
        ],
        "",
        f"### 2. Verification cost t(T): one verify forward of T tokens per row, over a "
        f"cached prompt (median of {settings.repeats} after a warm-up)",
        "",
    ]
    for m in models:
        out += [f"{m.label}, cached context {m.cache_len} tokens:", "", *_curve_table(m, settings)]
        out.append("")
    out += [
        "### 3. Draft-step cost per head type: the target's width, random head weights, "
        "batch size 1",
        "",
        f"The engine's own per-step timings over {settings.head_tokens} new tokens (after a "
        "warm-up generation), each method's default tree. Random heads accept almost nothing, "
        "so every step feeds the head one token; EAGLE-2's confidence threshold (0.3) stops a "
        "random head's tree after its first level.",
        "",
        *_heads_table(models),
        "",
        "### 4. Telemetry in the result rows: a shard through the real `ShardRunner`",
        "",
        f"{settings.telemetry_samples} synthetic samples, `ar`, batch size 2; `rows.*` are "
        "the Arrow result rows (RESULT_SCHEMA), `telemetry.*` the shard's telemetry series "
        "(SHARD_TELEMETRY_SCHEMA). Filled / total, then max (mean for power).",
        "",
        *_telemetry_table(models),
        "",
        "Phase times (s): "
        + "; ".join(
            f"{m.label} " + ", ".join(f"{k} {v:.0f}" for k, v in m.phases.items()) for m in models
        )
        + ".",
    ]
    return "\n".join(out) + "\n"


# ---- command line --------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    """ "1,4,8" or a range "1-64"."""
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-", 1))
        return tuple(range(lo, hi + 1))
    return tuple(int(x) for x in text.split(","))


def parse_args(argv: Sequence[str] | None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--smoke", action="store_true", help="toy widths, seconds (CI)")
    ap.add_argument("--layers", type=int, help="text layers (default: real on GPU, 2 on CPU)")
    ap.add_argument("--vision-layers", type=int, help="vision layers (default as --layers)")
    ap.add_argument("--models", default="qwen,llava", help="comma list of: qwen, llava")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--t-values", type=_ints, help='e.g. "1-64" or "1,2,4,8"')
    ap.add_argument("--batch-sizes", type=_ints, help='e.g. "1,4,8"')
    ap.add_argument("--head-tokens", type=int)
    ap.add_argument("--telemetry-samples", type=int)
    ap.add_argument("--split", type=Path, help="an MMSpec split folder (default: synthetic)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    # On CPU one thread unless told: on a shared box more threads than free cores make every
    # small op wait on spinning peers (a toy forward went from 2 ms to 300 ms at load 3.5)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.smoke:
        scale = Scale("smoke", 2, 2, toy_width=True)
    elif args.layers is None and args.vision_layers is None and device.type == "cuda":
        scale = Scale("real", None, None)
    else:
        layers = args.layers or (2 if device.type == "cpu" else None)
        scale = Scale("reduced", layers, args.vision_layers or layers)
    preset = PRESETS[scale.name]
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in BUILDERS]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {', '.join(BUILDERS)}")
    return Settings(
        device=device,
        dtype=DTYPES[args.dtype],
        scale=scale,
        models=models,
        split=args.split,
        out=args.out,
        **pick,
    )


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    command = " ".join(
        ["python benchmarks/gpu_evidence.py", *map(shlex.quote, argv or sys.argv[1:])]
    )
    t0 = time.perf_counter()
    models = [run_model(key, settings) for key in settings.models]
    report = render(models, settings, command, time.perf_counter() - t0)
    print(report)
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(report)


if __name__ == "__main__":
    main()
