"""Weightless stand-ins for the real checkpoints (issue 20): their config.json and processor
configs (tests/data/processors/<name>/, copied from the hub repos) beside the tiny zoo's
tokenizer of the same family, since the real tokenizers are not on disk.

Shared by tests/test_processors.py and tests/test_real_shapes.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mmspec.models.loader import MODEL_TYPES, load_processor
from mmspec.models.target import Target
from mmspec.models.zoo_paths import ZOO_DIR

DATA = Path(__file__).resolve().parent / "data" / "processors"
FACTS = DATA / "facts.json"
# registry name -> the hub repo's folder name (MMSpec's Qwen pixel bounds follow "Qwen2.5-VL")
CHECKPOINTS = {
    "qwen2.5-vl-3b": "Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen2.5-VL-7B-Instruct",
    "llava-1.5-7b": "llava-1.5-7b-hf",
    "llava-1.6-vicuna-7b": "llava-v1.6-vicuna-7b-hf",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_of(name: str) -> str:
    return "tiny-qwen2.5-vl" if name.startswith("qwen") else "tiny-llava"


def image_token(name: str) -> str:
    return "<|image_pad|>" if name.startswith("qwen") else "<image>"


def real_config(name: str) -> dict[str, Any]:
    return json.loads((DATA / name / "config.json").read_text())


def checkpoint_dir(root: Path, name: str) -> Path:
    """`root`/<hub folder name>: the real configs and the tiny tokenizer, no weights."""
    folder = root / CHECKPOINTS[name]
    folder.mkdir(parents=True, exist_ok=True)
    for src in (DATA / name).glob("*.json"):
        shutil.copy(src, folder / src.name)
    for file in TOKENIZER_FILES:
        shutil.copy(ZOO_DIR / tiny_of(name) / file, folder / file)
    return folder


def meta_model(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The checkpoint's model class (as the loader picks it) built on the meta device: every
    shape real, no memory, no weights."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**config)
    model_cls, _ = MODEL_TYPES[cfg.model_type]
    with torch.device("meta"):
        return model_cls._from_config(cfg, dtype=dtype)


def weightless_target(folder: Path, name: str, prompt_style: str) -> Target:
    """`name`'s adapter around its meta-device model, with the processor `load_target` would
    build for `folder`. Inputs stay on the CPU: only the processor and the adapter's index
    arithmetic (positions) run, never a forward."""
    config = json.loads((folder / "config.json").read_text())
    model = meta_model(config)
    target_cls = MODEL_TYPES[config["model_type"]][1]
    from transformers import AutoTokenizer

    token_id = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(image_token(name))
    names = (name, str(folder))
    processor, tokenizer = load_processor(str(folder), target_cls, token_id, prompt_style, names)
    target = target_cls(model, processor, tokenizer, name=name, prompt_style=prompt_style)
    target.device = torch.device("cpu")
    return target
