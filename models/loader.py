"""Load a target model (registry name, hub id or local checkpoint) behind a Target adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
)

from mmspec.models.checkpoint_files import CheckpointError, check_checkpoint_dir
from mmspec.models.prompting import (
    check_prompt_style,
    default_prompt_style,
    qwen_image_processor_kwargs,
)
from mmspec.models.registry import REGISTRY, check_model_id, model_source
from mmspec.models.target import LlavaTarget, QwenPromptProcessor, QwenVLTarget, Target
from mmspec.models.tiny import tiny_model_path

log = logging.getLogger(__name__)

# config.json model_type -> (model class, adapter); the same keys as
# checkpoint_files.SUPPORTED_MODEL_TYPES, which grid validation reads without torch
MODEL_TYPES: dict[str, tuple[type[PreTrainedModel], type[Target]]] = {
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, QwenVLTarget),
    "llava": (LlavaForConditionalGeneration, LlavaTarget),
    "llava_next": (LlavaNextForConditionalGeneration, LlavaTarget),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    pass


def resolve_model_source(model_id: str) -> tuple[str, bool]:
    """Where to load `model_id` from, and whether that is a local directory."""
    check_model_id(model_id)
    entry = REGISTRY.get(model_id)
    if entry is not None and entry.source == "tiny":
        tiny_model_path(model_id)  # a missing zoo checkpoint says how to rebuild it
    return model_source(model_id)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _model_type(model_id: str, source: str, local: bool, revision: str | None) -> str:
    """config.json's `model_type`, refused (naming the file and key) unless supported."""
    if local:
        config_path = Path(source) / "config.json"
        try:
            model_type = json.loads(config_path.read_text(encoding="utf-8"))["model_type"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(
                f"model {model_id}: {config_path}: unreadable or no 'model_type' ({exc})"
            ) from exc
    else:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(source, revision=revision).model_type
        config_path = Path(f"{source}/config.json")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"model {model_id}: {config_path}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    return model_type


def load_processor(
    source: str,
    target_cls: type[Target],
    image_token_id: int,
    style: str,
    names: tuple[str, ...] = (),
    **common: Any,
) -> tuple[Any, Any]:
    """The prompt processor and tokenizer of the checkpoint at `source`, as `encode` uses them.

    The image processor is the PIL backend whether or not torchvision is installed: that is
    what MMSpec's transformers 4.51.3 ran (its "slow" processors), and `AutoImageProcessor`
    would otherwise switch to the torchvision backend wherever torchvision is importable
    (on most GPU machines), whose resize gives other pixels: on every testmini image, by up
    to 0.26 after normalisation, about 17/255 (tests/test_processors.py). `names` (the id
    the user wrote, the resolved source) decide MMSpec's Qwen pixel bounds under `style`
    (models/prompting.py).
    """
    pixels = qwen_image_processor_kwargs(style, *names) if target_cls is QwenVLTarget else {}
    image_processor = AutoImageProcessor.from_pretrained(source, backend="pil", **common, **pixels)
    if target_cls is QwenVLTarget:
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left", **common)
        return QwenPromptProcessor(tokenizer, image_processor, image_token_id), tokenizer
    processor = AutoProcessor.from_pretrained(source, image_processor=image_processor, **common)
    processor.tokenizer.padding_side = "left"
    return processor, processor.tokenizer


def load_target(
    model_id: str,
    dtype: str = "float32",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    prompt_style: str | None = None,
) -> Target:
    """Load model + processor through `from_pretrained` and wrap them in the family adapter.

    A local directory (the tiny models included) is loaded with `local_files_only`, so it
    never reaches the network; only a hub id the user wrote may download. `prompt_style`
    (models/prompting.py) defaults to MMSpec's setup, the tiny zoo's to its chat template.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"model {model_id}: dtype {dtype!r} not one of {sorted(DTYPES)}")
    source, local = resolve_model_source(model_id)
    style = default_prompt_style(model_id, source) if prompt_style is None else prompt_style
    try:
        check_prompt_style(style)
    except ValueError as exc:
        raise ModelLoadError(f"model {model_id}: {exc}") from None
    if local:
        try:
            check_checkpoint_dir(Path(source))
        except CheckpointError as exc:
            raise ModelLoadError(f"model {model_id}: {exc}") from None
    model_type = _model_type(model_id, source, local, revision)
    model_cls, target_cls = MODEL_TYPES[model_type]
    common = {
        "revision": revision,
        "local_files_only": local,
        "trust_remote_code": trust_remote_code,
    }
    dev = resolve_device(device)
    try:
        model = model_cls.from_pretrained(
            source, dtype=DTYPES[dtype], attn_implementation=attn_implementation, **common
        ).to(dev)
        processor, tokenizer = load_processor(
            source,
            target_cls,
            model.config.image_token_id,
            style,
            (model_id, str(source)),
            **common,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {model_id} ({source}): cannot load checkpoint: {exc}") from exc
    log.info("loaded %s (%s) on %s as %s", model_id, model_type, dev, dtype)
    return target_cls(model, processor, tokenizer, name=model_id, prompt_style=style)
