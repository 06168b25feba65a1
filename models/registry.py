"""Target model registry: short names for real checkpoints and the project's tiny family.

A grid names a model by registry name, by hub id ("Qwen/Qwen2.5-VL-7B-Instruct") or by a
local directory holding a saved checkpoint. Only these three forms are accepted, and a
directory only when its files can be loaded (models/checkpoint_files.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mmspec.models.checkpoint_files import CheckpointError, check_checkpoint_dir


@dataclass(frozen=True)
class ModelEntry:
    name: str  # registry name
    family: str  # "qwen2.5-vl" | "llava": selects the target adapter
    source: str  # hub id, or "tiny" for a model the project builds itself


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry("qwen2.5-vl-3b", "qwen2.5-vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
        ModelEntry("qwen2.5-vl-7b", "qwen2.5-vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
        ModelEntry("llava-1.5-7b", "llava", "llava-hf/llava-1.5-7b-hf"),
        ModelEntry("llava-1.6-vicuna-7b", "llava", "llava-hf/llava-v1.6-vicuna-7b-hf"),
        ModelEntry("tiny-qwen2.5-vl", "qwen2.5-vl", "tiny"),
        ModelEntry("tiny-llava", "llava", "tiny"),
    )
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UnknownModelError(ValueError):
    pass


def check_model_id(model_id: str) -> None:
    """Raise UnknownModelError unless `model_id` is a registry name, hub id or checkpoint dir."""
    if model_id in REGISTRY:
        return
    path = Path(model_id).expanduser()
    try:
        found, config = path.exists(), (path / "config.json").is_file()
    except OSError as exc:  # e.g. a name too long for the file system
        raise UnknownModelError(f"model path {model_id} cannot be read: {exc.strerror}") from None
    if found:
        if not config:
            raise UnknownModelError(f"model path {model_id} has no config.json")
        try:
            check_checkpoint_dir(path)
        except CheckpointError as exc:
            raise UnknownModelError(str(exc)) from None  # it names the file and the key
        return
    if model_id.startswith((".", "/", "~")):
        raise UnknownModelError(f"model path {model_id} does not exist")
    if _HUB_ID.match(model_id):
        return
    known = ", ".join(sorted(REGISTRY))
    raise UnknownModelError(
        f"unknown model {model_id!r}: use one of {known}, a hub id (org/name) or a local path"
    )


def model_names() -> list[str]:
    return sorted(REGISTRY)


def model_source(model_id: str) -> tuple[str, bool]:
    """Where `model_id` loads from - the tiny zoo's folder, a local directory, or a hub id -
    and whether that is a local directory. The one resolution rule of the loader and of the
    torch-free validation that reads configs (model_limits)."""
    from mmspec.models.zoo_paths import ZOO_DIR  # torch-free, like this module

    entry = REGISTRY.get(model_id)
    if entry is not None and entry.source == "tiny":
        return str(ZOO_DIR / model_id), True
    source = entry.source if entry is not None else model_id
    path = Path(source).expanduser()
    return (str(path), True) if path.is_dir() else (source, False)
