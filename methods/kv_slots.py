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

    Its keys and values are views (`room[:rows, :, :slots]`) of buffers with room for more
    slots, so a forward writes only its own q slots where `DynamicLayer.update` concatenates:
    a copy of the layer's whole cache on every forward (a quarter of a 4-row step of tiny
    LLaVA at a 1024-token cache). The room keeps its rows when rows leave (`keep_rows`), so
    rows joining later are written into it (`join_rows`) without copying the others.
    Whatever replaces the tensors otherwise (a gather, a plain row selection) leaves the room:
    the next write starts a new one. A shortened view (cropped draft levels, rejected slots)
    keeps it: the next update writes over the slots it dropped, which nothing reads.
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
        old = getattr(self, name)
        n = old.shape[2] if old.dim() == 4 else 0
        out = self.room_for(name, new.shape[0], n + new.shape[2], new)
        out[:, :, n:] = new
        return out

    def holds(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is a view of this layer's room for `name` (its first rows and
        slots): writing to it in place touches nothing else."""
        room = self.__dict__.get("_rooms", {}).get(name)
        return room is not None and _in_room(tensor, room)

    def room_for(self, name: str, rows: int, slots: int, like: torch.Tensor) -> torch.Tensor:
        """A (rows, heads, slots, head_dim) view of the room for `name` whose first rows and
        slots hold the layer's current tensor (the rest unset): the room itself when it is
        big enough, else a new one it is copied into. `like`: dtype, heads and head_dim."""
        rooms: dict[str, torch.Tensor] = self.__dict__.setdefault("_rooms", {})
        old, room = getattr(self, name), rooms.get(name)
        if room is None or not _in_room(old, room) or rows > room.shape[0] or slots > room.shape[2]:
            # room for ~1/8 more slots (at least 64): amortised, a copy of the cache every few
            # dozen steps instead of every step; rows as many as it ever held
            grown = slots + max(64, slots // 8)
            most = max(rows, room.shape[0] if room is not None else 0)
            room = rooms[name] = like.new_empty((most, like.shape[1], grown, like.shape[3]))
            if old.dim() == 4 and old.numel():
                room[: old.shape[0], :, : old.shape[2]] = old
        return room[:rows, :, :slots]

    def reset(self) -> None:
        self.__dict__.pop("_rooms", None)
        super().reset()


def _in_room(view: torch.Tensor, room: torch.Tensor) -> bool:
    """Whether `view` is room[:rows, :, :slots]."""
    return (
        view.dim() == 4
        and view.data_ptr() == room.data_ptr()
        and view.stride() == room.stride()
        and view.shape[0] <= room.shape[0]
        and view.shape[1] == room.shape[1]
        and view.shape[3] == room.shape[3]
    )


def swap_remove(done: list[bool]) -> list[int]:
    """The rows to keep, as old indices in their new order: each row stays where it is, and
    the holes that finished rows leave before the new end take the last kept rows. Row `j`
    of the result is old row `keep[j]`, which is `j` or comes from past the new end - so the
    moves can be done in place (`keep_rows`), one row each."""
    kept = [i for i, d in enumerate(done) if not d]
    n = len(kept)
    movers = iter([i for i in kept if i >= n])
    return [i if not done[i] else next(movers) for i in range(n)]


def keep_rows(cache: DynamicCache, keep: list[int]) -> None:
    """Keep the batch rows `keep` (old indices, in their new order) of every layer's keys and
    values. In place where a layer's tensors are in its room and `keep` only moves rows from
    past its new end into holes (`swap_remove`): a copy of the moved rows, not of the cache."""
    n = len(keep)
    in_place = all(i == j or i >= n for j, i in enumerate(keep))
    index = None
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is None or not t.numel():
                continue
            if in_place and isinstance(layer, SlotLayer) and layer.holds(name, t):
                for j, i in enumerate(keep):
                    if i != j:
                        t[j] = t[i]
                setattr(layer, name, t[:n])
            else:
                if index is None:
                    index = torch.tensor(keep, dtype=torch.long, device=t.device)
                setattr(layer, name, t.index_select(0, index))


def join_rows(a: DynamicCache, b: DynamicCache) -> DynamicCache:
    """`a` with `b`'s rows after its own, every layer holding keys on both sides. `a`'s rows
    keep their slots where they are (masked slots after them where `b` is wider), `b`'s are
    left padded to the width; padding slots are zeros, which the caller masks. Written into
    `a`'s rooms where they are big enough: the running rows are not copied."""
    for la, lb in zip(a.layers, b.layers, strict=True):
        for name in ("keys", "values"):
            x, y = getattr(la, name), getattr(lb, name)
            na, wa = x.shape[0], x.shape[2]
            width = max(wa, y.shape[2])
            rows = na + y.shape[0]
            if isinstance(la, SlotLayer):
                out = la.room_for(name, rows, width, x)
            else:
                out = x.new_empty((rows, x.shape[1], width, x.shape[3]))
                out[:na, :, :wa] = x
            pad = width - y.shape[2]
            if wa < width:  # each op costs ~10 us: skip the empty ones
                out[:na, :, wa:] = 0
            if pad:
                out[na:, :, :pad] = 0
            out[na:, :, pad:] = y
            setattr(la, name, out)
    return a


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
    return _grown(x, width, dim, value, front=True)


def pad_right(x: torch.Tensor, width: int, dim: int, value: float = 0) -> torch.Tensor:
    """`x` with `dim` grown to `width` by slots of `value` after its own (running rows,
    when rows with longer prompts join: `join_rows`)."""
    return _grown(x, width, dim, value, front=False)


def _grown(x: torch.Tensor, width: int, dim: int, value: float, front: bool) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    fill = torch.full(shape, value, dtype=x.dtype, device=x.device)
    return torch.cat([fill, x] if front else [x, fill], dim=dim)


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
