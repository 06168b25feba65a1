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


def pad_left(x: torch.Tensor, width: int, dim: int, value: float = 0) -> torch.Tensor:
    """`x` with `dim` grown to `width` by slots of `value` in front (rows joining a batch:
    each row's positions are its own, so where its slots sit means nothing to it)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=x.dtype, device=x.device), x], dim=dim)


def cat_rows(a: DynamicCache, b: DynamicCache, rows: tuple[int, int], width: int) -> DynamicCache:
    """A cache of `a`'s rows then `b`'s (`rows`: how many each holds), every layer's keys and
    values left padded to `width` slots of zeros, which the caller masks. Either side may hold
    no keys yet (a draft head's cache before its first feed): its rows get zero slots. The
    returned cache reuses the layer objects of a side that has keys."""
    filled = a if _filled(a) or not _filled(b) else b
    for i, layer in enumerate(filled.layers):
        for name in ("keys", "values"):
            like = getattr(layer, name)
            if like is None:
                continue
            parts = [_slots(c, n, i, name, like, width) for c, n in zip((a, b), rows)]
            setattr(layer, name, torch.cat(parts))
    return filled


def _filled(cache: DynamicCache) -> bool:
    """Whether any layer of `cache` holds keys."""
    return any(getattr(layer, "keys", None) is not None for layer in cache.layers)


def _slots(
    cache: DynamicCache, rows: int, i: int, name: str, like: torch.Tensor, width: int
) -> torch.Tensor:
    """Layer i's keys or values (`name`) of `cache` left padded to `width` slots; zeros shaped
    like `like` for `rows` rows where `cache` has no such tensor."""
    layers = cache.layers
    if i < len(layers) and getattr(layers[i], name, None) is not None:
        return pad_left(getattr(layers[i], name), width, dim=2)
    return like.new_zeros((rows, like.shape[1], width, like.shape[3]))
