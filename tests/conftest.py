"""Shared fixtures: tiny models are built once per test session into a temp MMSPEC_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmspec"

# Ray must bind to 127.0.0.1 only; set before anything imports Ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def mmspec_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models live in a cache; reuse the user's when set, else one per session."""
    if "MMSPEC_HOME" not in os.environ:
        os.environ["MMSPEC_HOME"] = str(tmp_path_factory.mktemp("mmspec_home"))
    return Path(os.environ["MMSPEC_HOME"])


def mmspec_split(name: str) -> Path:
    path = DATA / name
    if not (path / "mmspec.jsonl").is_file():
        pytest.skip(f"MMSpec split not found at {path}")
    return path


def contract_methods() -> list[str]:
    """Every registered method but `ar`, for the lossless tests - ViSkip over the trained
    heads only as `viskip+eagle2`: the wrapper does not depend on what it wraps (the
    training-free methods cover it with every kind of drafter), and each trained head costs."""
    from mmspec.methods.registry import get_drafter, method_names

    return [
        m
        for m in method_names()
        if m != "ar"
        and (not m.startswith("viskip+") or get_drafter(m).training_free or m == "viskip+eagle2")
    ]


@pytest.fixture(scope="session")
def tiny_targets() -> dict:
    """Both tiny targets on the CPU, loaded once for the draft-head tests."""
    import torch

    from mmspec.models.loader import load_target

    torch.set_num_threads(1)
    return {m: load_target(m, device="cpu") for m in ("tiny-llava", "tiny-qwen2.5-vl")}


@pytest.fixture(scope="session")
def head_samples() -> tuple[list, list]:
    """Four synthetic first-turn conversations and their images."""
    from mmspec.orchestrator.runner import conversation
    from mmspec.workloads import synthetic_suite

    picked = synthetic_suite(per_topic=1, seed=3)[:4]
    return [conversation(s, [], True) for s in picked], [s.load_image() for s in picked]


def target_view(target, conv, image) -> tuple:
    """One prompt as the target sees it: the encoded prompt, its `output_hidden_states`
    (embeddings first, the final normed state last), its logits and its image slots (an image
    in the prompt, none among the last two tokens)."""
    import torch

    prompt = target.encode([conv], [image])
    positions, _ = target.prefill_positions(prompt)
    with torch.inference_mode():
        out = target.model(**prompt.inputs, position_ids=positions, output_hidden_states=True)
    slots = prompt.input_ids == target.image_token_id
    assert slots.any() and not slots[:, -2:].any()
    return prompt, out.hidden_states, out.logits, slots


def reference_head_config(target, **extra) -> dict:
    """A reference draft head's LLaMA-style config.json for `target`'s shapes."""
    text = target.model.config.get_text_config()
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "num_hidden_layers": 1,
        "vocab_size": text.vocab_size,
        "rms_norm_eps": text.rms_norm_eps,
        **extra,
    }
