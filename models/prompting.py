"""How a target is prompted: MMSpec's setup, or the model's own chat template.

`mmspec` (the default for real checkpoints) is what MMSpec's `evaluation/utils.py`
`build_prompt` sends, so prefill lengths, outputs and speedups compare with the paper's: its
system message before every conversation, and for Qwen2.5-VL checkpoints (MMSpec's test: the
model path contains "Qwen2.5-VL") the image processor bounded to 256-1280 28x28 patches, where
the processor's own default allows up to 12.8 M pixels (thousands of image tokens).
`chat_template` sends the conversation as it is: Qwen's template then adds its own "You are a
helpful assistant.". The tiny zoo was trained and measured that way, so it is their default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmspec.models.registry import REGISTRY
from mmspec.models.zoo_paths import is_tiny_checkpoint

PROMPT_STYLES = ("mmspec", "chat_template")
MMSPEC_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
MMSPEC_QWEN_PIXELS = {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}


def default_prompt_style(model_id: str, source: str | Path | None = None) -> str:
    """`chat_template` for the tiny models (what they were trained on), by registry name or
    at their own folders (the zoo, the untrained builds); `mmspec` for every other model."""
    entry = REGISTRY.get(model_id)
    if entry is not None and entry.source == "tiny":
        return "chat_template"
    if any(is_tiny_checkpoint(Path(p)) for p in (model_id, source) if p is not None):
        return "chat_template"
    return "mmspec"


def check_prompt_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")


def system_messages(style: str) -> list[dict[str, Any]]:
    """What goes before a conversation's first user turn."""
    if style != "mmspec":
        return []
    return [{"role": "system", "content": [{"type": "text", "text": MMSPEC_SYSTEM}]}]


def qwen_image_processor_kwargs(style: str, *names: str) -> dict[str, int]:
    """MMSpec's pixel bounds when any of `names` (the id the user wrote, the resolved source)
    contains "Qwen2.5-VL", as MMSpec tests its model path; else the processor's own."""
    if style == "mmspec" and any("Qwen2.5-VL" in name for name in names):
        return dict(MMSPEC_QWEN_PIXELS)
    return {}
