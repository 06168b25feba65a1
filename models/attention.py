"""SDPA for grouped-query attention under an explicit mask, without copying the KV cache.

transformers' SDPA function expands the key/value heads to the query heads (`repeat_kv`: a
copy of the whole cache, every layer, every forward) whenever a mask is given and more than
one query runs - every tree verification and every draft-head level. On the CPU, torch's
SDPA reads grouped heads itself (`enable_gqa`) with a mask at no copy, giving the same
numbers (tests/test_attention.py); on tiny targets with a ~700-token cache the copy was ~40% of
a tree verification's attention. Elsewhere (CUDA's efficient kernels take no grouped heads
with a mask) and in every other case, transformers' own function runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

GQA_SDPA = "mmspec_gqa_sdpa"


def sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa_attention_forward`, with grouped heads read in place on the CPU."""
    if (
        getattr(module, "num_key_value_groups", 1) > 1
        and attention_mask is not None
        and query.shape[2] > 1
        and query.device.type == "cpu"
        and not kwargs.get("dropout")
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    ):
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            scale=kwargs.get("scaling"),
            enable_gqa=True,
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(GQA_SDPA, sdpa_attention)


def use_gqa_sdpa(layers: torch.nn.ModuleList) -> None:
    """Point the SDPA layers' attention at `sdpa_attention` (a private config copy per layer:
    the model's mask builders keep reading "sdpa" from the shared config)."""
    for layer in layers:
        attn = layer.self_attn
        if attn.config._attn_implementation == "sdpa":
            attn.config = copy.copy(attn.config)
            attn.config._attn_implementation = GQA_SDPA
