"""What a model can hold, read from its config.json without loading weights (or torch).

Grid validation uses it to refuse limits a model cannot meet (a `max_new_tokens` beyond the
context, a layer index past the last decoder layer) before anything starts. Only what is
already on this machine is read: a local checkpoint, the tiny zoo, or a hub id already in
the Hugging Face cache. Nothing is downloaded; when the config cannot be read the limits are
unknown and the checks are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmspec.models.registry import model_source

# What a nested text config means by a key it leaves out: transformers' defaults for the
# language models the supported VLMs nest (llava-hf's LLaVA-1.5/1.6 configs give no
# num_hidden_layers, relying on LlamaConfig's 32). A table, since importing transformers'
# config classes imports torch.
TEXT_DEFAULTS: dict[str, dict[str, int]] = {
    "llama": {"num_hidden_layers": 32, "max_position_embeddings": 2048},
    "mistral": {"num_hidden_layers": 32, "max_position_embeddings": 131072},
}
# the text model a LLaVA config nests when its text_config names none (LlavaConfig's default)
DEFAULT_TEXT_MODEL = {"llava": "llama", "llava_next": "llama"}


@dataclass(frozen=True)
class ModelLimits:
    """A checkpoint's limits; None where its config does not say."""

    context_length: int | None  # the language model's max_position_embeddings
    num_layers: int | None  # the language model's decoder layers


def model_limits(model_id: str, revision: str | None = None) -> ModelLimits | None:
    """The limits of a grid's model id, or None when its config.json is not on this machine."""
    try:
        path = local_config_path(model_id, revision)
        config = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        return None
    return limits_of(config) if isinstance(config, dict) else None


def limits_of(config: dict[str, Any]) -> ModelLimits:
    """Limits from a parsed config.json: a VLM nests its language model's in `text_config`."""
    text = config.get("text_config")
    text = text if isinstance(text, dict) else {}
    text_model = text.get("model_type") or DEFAULT_TEXT_MODEL.get(str(config.get("model_type")))
    defaults = TEXT_DEFAULTS.get(str(text_model), {})

    def read(key: str) -> int | None:
        # older Qwen2.5-VL configs keep the text model's keys at the top level
        value = text.get(key, config.get(key, defaults.get(key)))
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        return value if ok else None

    return ModelLimits(read("max_position_embeddings"), read("num_hidden_layers"))


def local_config_path(model_id: str, revision: str | None = None) -> Path | None:
    """Where `model_id`'s config.json lies on this machine, if it does (resolved as the
    loader resolves it: a registry name, a local directory or a hub id)."""
    source, local = model_source(model_id)
    if local:
        path = Path(source) / "config.json"
        return path if path.is_file() else None
    return _cached_hub_file(source, "config.json", revision)


def _cached_hub_file(repo_id: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # not a valid repo id or revision: nothing cached under it
        return None
    return Path(found) if isinstance(found, str) else None
