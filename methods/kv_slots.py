"""Masked-slot bookkeeping of an append-only KV cache (the engine's and the draft heads').

Rejected drafts and padding stay in the cache as masked slots; once they pile up, they are
squeezed out with one gather, so attention cost stays with real tokens. The caches append in
place (`SlotCache`): a forward writes only its own slots.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer


class SlotLayer(DynamicLayer):
    """A `DynamicLayer` that appends in place.

    Its keys and values are views of buffers with room for more slots, so a forward writes
    only its own q slots where `DynamicLayer.update` concatenates: a copy of the layer's whole
    cache on every forward (a quarter of a 4-row step of tiny LLaVA at a 1024-token cache).
    Whatever replaces the tensors (a gather, rows selected or merged) leaves the buffer: the
    next update starts a new one, with room. A shortened view (cropped draft levels, rejected
    slots) keeps it: the next update writes over the slots it dropped, which nothing reads.
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self._append("keys", key_states)
        self.values = self._append("values", value_states)
        return self.keys, self.values

    def _append(self, name: str, new: torch.Tensor) -> torch.Tensor:
        rooms: dict[str, torch.Tensor] = self.__dict__.setdefault("_rooms", {})
        old, room = getattr(self, name), rooms.get(name)
        n, q = (old.shape[2] if old.dim() == 4 else 0), new.shape[2]
        if room is None or not _is_prefix(old, room) or n + q > room.shape[2]:
            # room for ~1/8 more (at least 64 slots): amortised, a copy of the cache every
            # few dozen steps instead of every step
            shape = (*new.shape[:2], n + q + max(64, (n + q) // 8), new.shape[3])
            room = rooms[name] = new.new_empty(shape)
            if n:
                room[:, :, :n] = old
        room[:, :, n : n + q] = new
        return room[:, :, : n + q]

    def reset(self) -> None:
        self.__dict__.pop("_rooms", None)
        super().reset()


def _is_prefix(view: torch.Tensor, room: torch.Tensor) -> bool:
    """Whether `view` is `room`'s first slots (room[:, :, :n]): appending may write after it."""
    return (
        view.dim() == 4
        and view.data_ptr() == room.data_ptr()
        and view.stride() == room.stride()
        and view.shape[:2] == room.shape[:2]
        and view.shape[3] == room.shape[3]
    )


class SlotCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers are `SlotLayer`s (others stay as the
    config makes them); without a config, layers are made as they are first written."""

    def __init__(self, config: PreTrainedConfig | None = None) -> None:
        super().__init__(config=config)
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = SlotLayer
        self.layers = [SlotLayer() if type(x) is DynamicLayer else x for x in self.layers]


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
    after them (the ones a verification appended), in every layer's keys and values.

    In place: the kept new slots are written over the first n appended ones (gathered
    first, so none is overwritten before it is read), and the tensors shortened - no copy of
    the cache before them."""
    n = index.shape[1]
    for layer in cache.layers:
        for name in ("keys", "values"):
            full = getattr(layer, name)  # (b, heads, cache_len + q, head_dim)
            gather = index[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3])
            full[:, :, cache_len : cache_len + n] = torch.gather(full[:, :, cache_len:], 2, gather)
            setattr(layer, name, full[:, :, : cache_len + n])


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
