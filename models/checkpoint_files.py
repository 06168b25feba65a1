"""What a checkpoint folder must hold before anything loads it, read without torch.

Grid validation (through `registry.check_model_id`) and the loader both ask here, so a
folder whose config.json names a model type we have no adapter for, or whose sharded
weight index names a shard that is not there, fails once, early, with the file and the key
that are wrong, instead of deep inside `from_pretrained` on a GPU worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# config.json `model_type`s with a target adapter (models/loader.py maps each to its classes)
SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "qwen2_5_vl")
# the weight files `from_pretrained` looks for, in its order of preference: a single file, or
# a sharded checkpoint's index (model-0000x-of-0000y.* beside it)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded. The message starts with the file's name and
    the key, and ends with the file's path: grid validation clips long messages."""


def check_checkpoint_dir(folder: Path) -> None:
    """Raise CheckpointError for an unsupported `model_type` in `folder`/config.json or a
    shard missing from its weight index. A config.json that cannot be read, or that names
    no model type, is left to the loader (which says so): grid validation skips what it
    cannot read rather than guess."""
    check_model_type(folder / "config.json")
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is not None and weights.name.endswith(".index.json"):
        check_weight_index(weights)


def check_model_type(config_path: Path) -> None:
    config = _read_json(config_path, strict=False)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if isinstance(model_type, str) and model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{config_path.name}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} ({config_path})"
        )


def check_weight_index(index_path: Path) -> None:
    """Every shard the index's `weight_map` names must lie beside it."""
    index = _read_json(index_path, strict=True)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index_path.name}: key 'weight_map' must map tensor names to shard files, "
            f"got {_short(weight_map)} ({index_path})"
        )
    seen: set[str] = set()
    for tensor, shard in weight_map.items():
        if shard in seen:
            continue
        if not isinstance(shard, str) or not (index_path.parent / shard).is_file():
            raise CheckpointError(
                f"{index_path.name}: weight_map[{tensor!r}] names shard {_short(shard)}, "
                f"which is missing ({index_path})"
            )
        seen.add(shard)


def _read_json(path: Path, strict: bool) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if strict:
            raise CheckpointError(f"{path.name}: unreadable: {exc} ({path})") from None
        return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
