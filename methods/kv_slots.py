"""Masked-slot bookkeeping of an append-only KV cache (the engine's and the draft heads').

Rejected drafts and padding stay in the cache as masked slots; once they pile up, they are
squeezed out with one gather, so attention cost stays with real tokens.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import DynamicCache


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, q, kv) bool -> (b, 1, q, kv) additive float mask (0 = attend)."""
    return additive(visible, dtype)[:, None]


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool -> additive float of the same shape: 0 where visible, the dtype's lowest elsewhere."""
    zero, lowest = mask_values(dtype, visible.device)
    # one op, where zeros + invert + masked_fill took three (a decoding step builds one mask)
    return torch.where(visible, zero, lowest)


@lru_cache(maxsize=16)
def mask_values(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """0 and the dtype's lowest value as 0-dim tensors (`torch.where` then keeps `dtype`).

    Shared: expand or read them, never write."""
    zero = torch.zeros((), dtype=dtype, device=device)
    return zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)


def select_rows(cache: DynamicCache, keep: torch.Tensor) -> None:
    """Keep only the batch rows `keep` of every layer's keys and values."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)


def squeeze_order(valid: torch.Tensor, slack: int) -> torch.Tensor | None:
    """Per row, the slots to keep in order (b, longest), or None while masked slots <= slack.

    A stable sort puts each row's valid slots last, in order, so rows stay left padded.
    """
    longest = int(valid.sum(dim=1).max()) if valid.numel() else 0
    if valid.shape[1] - longest <= slack:
        return None
    return torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, -longest:]


def gather_slots(cache: DynamicCache, order: torch.Tensor) -> None:
    """Keep the slots `order` (b, n) of every layer's keys and values."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            full = getattr(layer, name)
            gather = order[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3])
            setattr(layer, name, torch.gather(full, 2, gather))


def gather_new_slots(cache: DynamicCache, index: torch.Tensor, cache_len: int) -> None:
    """Keep the first `cache_len` slots and then the new slots `index` (b, n) of the slots
    after them (the ones a verification appended), in every layer's keys and values."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            full = getattr(layer, name)  # (b, heads, cache_len + q, head_dim)
            gather = index[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3])
            new = torch.gather(full[:, :, cache_len:], 2, gather)
            setattr(layer, name, torch.cat([full[:, :, :cache_len], new], dim=2))
