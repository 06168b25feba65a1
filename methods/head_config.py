"""A draft head's shape, layer and weights (EAGLE-1/2/3, ViSpec, MSD, Medusa), written once.

- `DraftConfig`: the shape of a head, read from its target and saved beside its weights.
- `decoder_layer`: one transformer layer of the target's own kind (Llama or Qwen2 blocks from
  transformers, plain 1D RoPE), so a head is what the reference checkpoints hold;
  `run_layer` / `attend` run it without transformers' per-call dispatch.
- `load_state` / `save_head`: weights in and out, naming every key that does not fit.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from mmspec.models.attention import sdpa_attention
from mmspec.models.target import Target

# text model type of the target -> the block family a head is built from
BLOCKS = {"llama": "llama", "qwen2": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen2_vl_text": "qwen2"}


@dataclass
class DraftConfig:
    """Shape of a draft head; saved as config.json beside model.safetensors."""

    method: str
    block: str  # "llama" | "qwen2"
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    target: str = ""  # the target it was trained for (name or path), for the record
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific shape (e.g. num_q)

    @classmethod
    def for_target(cls, method: str, target: Target, **extra: Any) -> DraftConfig:
        text = target.model.config.get_text_config()
        block = BLOCKS.get(text.model_type)
        if block is None:
            raise ValueError(f"no draft-head block for text model type {text.model_type!r}")
        rope = getattr(text, "rope_parameters", None) or {}
        return cls(
            method=method,
            block=block,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None)
            or text.hidden_size // text.num_attention_heads,
            vocab_size=text.vocab_size,
            rms_norm_eps=text.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
            target=getattr(target, "name", ""),
            extra=dict(extra),
        )

    def hf_config(self) -> LlamaConfig | Qwen2Config:
        common = dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            num_hidden_layers=1,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        config = LlamaConfig(**common) if self.block == "llama" else Qwen2Config(**common)
        config._attn_implementation = "sdpa"
        return config

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "config.json") -> DraftConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(
            f.name
            for f in fields(cls)
            if f.name not in data and f.default is MISSING and f.default_factory is MISSING
        )
        if unknown or missing:
            raise ValueError(f"{where}: unexpected keys {unknown}, missing keys {missing}")
        return cls(**data)


def decoder_layer(config: DraftConfig) -> nn.Module:
    """One decoder layer of the target's block family (attention + MLP + their norms)."""
    hf = config.hf_config()
    return LlamaDecoderLayer(hf, 0) if config.block == "llama" else Qwen2DecoderLayer(hf, 0)


def attend(
    attn: nn.Module,
    x: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    cache: Any,
) -> torch.Tensor:
    """What `decoder_layer`'s attention module computes under SDPA, called directly.

    The same projections, RoPE, cache update and SDPA (models/attention.py), without the
    module's kwarg-deprecation wrapper and attention-interface lookup: a head runs its
    layer ~3 times a step, and that dispatch was ~13% of a tiny head's layer (outputs
    bit-identical, tests/test_heads.py).
    """
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    dropout = attn.attention_dropout if attn.training else 0.0
    out, _ = sdpa_attention(attn, q, k, v, mask, dropout=dropout, scaling=attn.scaling)
    return attn.o_proj(out.reshape(*x.shape[:-1], -1))


def run_layer(
    layer: nn.Module,
    x: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    cache: Any,
) -> torch.Tensor:
    """`decoder_layer`'s forward (pre-norm attention and MLP, each with its residual)."""
    x = x + attend(layer.self_attn, layer.input_layernorm(x), position_embeddings, mask, cache)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def rotary(config: DraftConfig) -> nn.Module:
    hf = config.hf_config()
    return LlamaRotaryEmbedding(hf) if config.block == "llama" else Qwen2RotaryEmbedding(hf)


def load_state(
    module: nn.Module, state: dict[str, torch.Tensor], where: str, strict: bool = True
) -> None:
    """Load `state` into `module`, naming every missing, unexpected or misshapen key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if (strict and (missing or unexpected)) or shapes:
        raise ValueError(
            f"{where}: checkpoint does not fit the head: missing keys {missing}, "
            f"unexpected keys {unexpected}, wrong shapes {shapes}"
        )
    module.load_state_dict(state, strict=strict)


def save_head(module: nn.Module, config: DraftConfig, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(config.to_json())
