"""Load a target model (registry name, hub id or local checkpoint) behind a Target adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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

from mmspec.models.prompting import (
    check_prompt_style,
    default_prompt_style,
    qwen_image_processor_kwargs,
)
from mmspec.models.registry import REGISTRY, check_model_id
from mmspec.models.target import LlavaTarget, QwenPromptProcessor, QwenVLTarget, Target
from mmspec.models.tiny import tiny_model_path

log = logging.getLogger(__name__)

# config.json model_type -> (model class, adapter)
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
        return str(tiny_model_path(model_id)), True
    source = entry.source if entry else model_id
    path = Path(source).expanduser()
    return (str(path), True) if path.is_dir() else (source, False)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _model_type(source: str, local: bool, revision: str | None) -> str:
    if local:
        try:
            return json.loads((Path(source) / "config.json").read_text())["model_type"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"model {source}: unreadable config.json ({exc})") from exc
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, revision=revision).model_type


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
    model_type = _model_type(source, local, revision)
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"model {model_id}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(MODEL_TYPES))}"
        )
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
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left", **common)
        if target_cls is QwenVLTarget:
            pixels = qwen_image_processor_kwargs(style, model_id, str(source))
            image_processor = AutoImageProcessor.from_pretrained(source, **common, **pixels)
            processor = QwenPromptProcessor(tokenizer, image_processor, model.config.image_token_id)
        else:
            processor = AutoProcessor.from_pretrained(source, **common)
            processor.tokenizer.padding_side = "left"
            tokenizer = processor.tokenizer
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {model_id} ({source}): cannot load checkpoint: {exc}") from exc
    log.info("loaded %s (%s) on %s as %s", model_id, model_type, dev, dtype)
    return target_cls(model, processor, tokenizer, name=model_id, prompt_style=style)
