"""Masked-slot bookkeeping of an append-only KV cache (the engine's and the draft heads').

Rejected drafts and padding stay in the cache as masked slots; once they pile up, they are
squeezed out with one gather, so attention cost stays with real tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, q, kv) bool -> (b, 1, q, kv) additive float mask (0 = attend)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


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
