"""Find, read and check a draft head's checkpoint: ours, or a reference repo's published one.

Ours: a folder with config.json (a `DraftConfig`) and model.safetensors, made by
`mmspec-orch train-drafter`; the tiny zoo's live in models/zoo/drafters/<target>/<method>/.
A reference checkpoint (EAGLE, EAGLE-3, Medusa, ViSpec, MSD as their authors publish them)
has the reference config.json and pytorch_model.bin or model.safetensors; the head class
maps it with `from_reference` and any key that does not fit is named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmspec.methods.head_config import DraftConfig, load_state
from mmspec.models.target import Target

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# The heads MMSpec evaluated (collection "Cloudriver/multimodal-speculative-decoding"), used
# when a grid names one of these targets and gives no checkpoint. EAGLE-2 runs EAGLE's head.
_QWEN7B, _LLAVA7B = "Qwen/Qwen2.5-VL-7B-Instruct", "llava-hf/llava-1.5-7b-hf"
OFFICIAL_HEADS: dict[tuple[str, str], str] = {
    ("eagle", _QWEN7B): "Cloudriver/EAGLE-Qwen2.5-VL-7B-Instruct",
    ("eagle3", _QWEN7B): "Cloudriver/EAGLE3-Qwen2.5-VL-7B-Instruct",
    ("vispec", _QWEN7B): "Cloudriver/ViSpec-Qwen2.5-VL-7B-Instruct",
    ("msd", _QWEN7B): "Cloudriver/MSD-Qwen2.5-VL-7B-Instruct",
    ("eagle", _LLAVA7B): "Cloudriver/EAGLE-LLaVA-1.5-7B",
    ("eagle3", _LLAVA7B): "Cloudriver/EAGLE3-LLaVA1.5-7B",
    ("vispec", _LLAVA7B): "Cloudriver/ViSpec-LLaVA1.5-7B",
    ("msd", _LLAVA7B): "Cloudriver/MSD-LLaVA1.5-7B",
}


class CheckpointError(ValueError):
    pass


def check_checkpoint_arg(checkpoint: Any) -> str | None:
    """A grid's `checkpoint` argument, checked where it can be without loading anything."""
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ValueError(f"checkpoint must be a folder or a hub id, got {checkpoint!r}")
    if checkpoint.startswith((".", "/", "~")) and not Path(checkpoint).expanduser().is_dir():
        raise ValueError(f"checkpoint {checkpoint} is not a folder")
    return checkpoint


def checkpoint_dir(weights: str, target_name: str) -> Path:
    """Where the project's trained head `weights` for a zoo target lives."""
    from mmspec.models.zoo_paths import ZOO_DIR

    return ZOO_DIR / "drafters" / Path(target_name).name / weights


def resolve(weights: str, target: Target, checkpoint: str | None) -> Path:
    """The local folder of the head: the given path or hub id, else the zoo's or the official
    one for the target."""
    if checkpoint is None:
        checkpoint = OFFICIAL_HEADS.get((weights, _hub_id(target.name)))
    if checkpoint is None:
        path = checkpoint_dir(weights, target.name or "?")
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"no trained {weights} head for target {target.name!r} (looked in {path}); "
                f"give method_args {{checkpoint: <folder or hub id>}} or train one: "
                f"mmspec-orch train-drafter --method {weights} --target {target.name}"
            )
        return path
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    if checkpoint.startswith((".", "/", "~")):
        raise CheckpointError(f"draft checkpoint {checkpoint} does not exist")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", *WEIGHT_FILES, "medusa_lm_head.safetensors", "*.pt"]
    patterns += ["*.index.json", "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin"]
    return Path(snapshot_download(checkpoint, allow_patterns=patterns))


def _hub_id(model_id: str) -> str:
    from mmspec.models.registry import REGISTRY

    entry = REGISTRY.get(model_id)
    return entry.source if entry is not None else model_id


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder (safetensors first; a .bin only as plain tensors)."""
    for name in (*WEIGHT_FILES, "medusa_lm_head.safetensors", "medusa_lm_head.pt"):
        f = path / name
        index = path / f"{name}.index.json"
        if index.is_file() and not f.is_file():  # sharded: read every shard the index names
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: weight_map names missing shard {missing[0]}")
            return {k: v for s in shards for k, v in _read_file(path / s).items()}
        if f.is_file():
            return _read_file(f)
    raise CheckpointError(f"{path}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def _read_file(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    # weights_only: a pickle that holds anything but tensors is refused
    return torch.load(f, map_location="cpu", weights_only=True)


def load_head(
    weights: str, head_cls: type[nn.Module], target: Target, checkpoint: str | None
) -> nn.Module:
    """Build `head_cls` for `target` and load its weights; name whatever does not fit."""
    path = resolve(weights, target, checkpoint)
    try:
        raw: dict[str, Any] = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable config.json ({exc})") from exc
    state = read_state(path)
    where = str(path)
    if "method" in raw:  # ours
        config = DraftConfig.from_json(json.dumps(raw), where=f"{path}/config.json")
        if config.method != weights:
            raise CheckpointError(f"{where}: a {config.method} head, not {weights}")
    else:
        config, state = head_cls.from_reference(raw, state, target, where)
    _check_fits(config, target, where)
    head = head_cls(config)
    try:
        load_state(head, state, where)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return head


def _check_fits(config: DraftConfig, target: Target, where: str) -> None:
    text = target.model.config.get_text_config()
    if (config.hidden_size, config.vocab_size) != (text.hidden_size, text.vocab_size):
        raise CheckpointError(
            f"{where}: head for hidden {config.hidden_size} / vocab {config.vocab_size}, "
            f"target {target.name or '?'} has {text.hidden_size} / {text.vocab_size}"
        )


def reference_config(
    method: str, raw: dict[str, Any], target: Target, where: str, **extra: Any
) -> DraftConfig:
    """Our DraftConfig from a reference head's LLaMA/Qwen-style config.json."""
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        config = DraftConfig(
            method=method,
            block="qwen2"
            if raw.get("qkv_bias") or "qwen" in str(raw.get("model_type"))
            else "llama",
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            target=target.name,
            extra=dict(extra),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}/config.json: not a draft-head config ({exc!r})") from exc
    return config
