"""The in-place KV cache (`SlotCache`): the same keys and values as transformers'
`DynamicCache` through everything the engine and the draft heads do to a cache, without
copying the cache on every append."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mmspec.methods.kv_slots import (
    SlotCache,
    SlotLayer,
    gather_new_slots,
    join_rows,
    keep_rows,
    select_rows,
    swap_remove,
)
from mmspec.models.loader import load_target


def _kv(b: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, q, 4, generator=g), torch.randn(b, 2, q, 4, generator=g)


def _same(a: DynamicCache, b: DynamicCache) -> None:
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


def test_every_cache_operation_keeps_dynamic_caches_contents() -> None:
    slot, dyn = SlotCache(), DynamicCache()
    seed = 0

    def append(q: int, b: int = 3) -> None:
        nonlocal seed
        seed += 1
        for layer in (0, 1):
            k, v = _kv(b, q, seed * 10 + layer)
            got, want = slot.update(k, v, layer), dyn.update(k, v, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    append(50)  # prefill
    for q in (1, 1, 7):  # steps, a tree
        append(q)
    _same(slot, dyn)
    # a verification kept some of its new slots per row (the engine's commit)
    index = torch.tensor([[0, 3], [1, 2], [6, 6]])
    for cache in (slot, dyn):
        gather_new_slots(cache, index, cache_len=52)
    _same(slot, dyn)
    append(5)
    for cache in (slot, dyn):  # draft levels cropped (a head's tree search)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :56], layer.values[:, :, :56]
    append(2)
    _same(slot, dyn)
    for cache in (slot, dyn):  # a row left
        select_rows(cache, torch.tensor([0, 2]))
    append(1, b=2)
    append(300, b=2)  # past the room it had
    _same(slot, dyn)


def test_appending_within_the_room_writes_in_place() -> None:
    cache = SlotCache()
    cache.update(*_kv(2, 40, 0), 0)
    first = cache.layers[0].keys.data_ptr()
    for step in range(20):
        keys, _ = cache.update(*_kv(2, 1, step + 1), 0)
        assert keys.data_ptr() == first and keys.shape[2] == 41 + step
    # DynamicLayer copies the cache on every append: what SlotLayer saves
    dyn = DynamicCache()
    dyn.update(*_kv(2, 40, 0), 0)
    before = dyn.layers[0].keys.data_ptr()
    assert dyn.update(*_kv(2, 1, 1), 0)[0].data_ptr() != before


def test_slot_caches_are_made_of_slot_layers() -> None:
    target = load_target("tiny-llava")
    made = SlotCache(config=target.model.config)
    assert made.layers and all(type(x) is SlotLayer for x in made.layers)
    lazy = SlotCache()
    lazy.update(*_kv(1, 3, 0), 2)  # layers appear as they are first written
    assert len(lazy.layers) == 3 and all(type(x) is SlotLayer for x in lazy.layers)
    assert issubclass(SlotLayer, DynamicLayer)


def _filled(rows: int, slots: int, seed: int, cls: type = SlotCache) -> DynamicCache:
    cache = cls()
    for layer in (0, 1):
        cache.update(*_kv(rows, slots, seed * 10 + layer), layer)
    return cache


def _ptrs(cache: DynamicCache) -> list[int]:
    return [t.data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)]


def test_swap_remove_fills_holes_from_the_end() -> None:
    assert swap_remove([False, True, False, False]) == [0, 3, 2]
    assert swap_remove([True, False, True, False, False]) == [3, 1, 4]
    assert swap_remove([False, False, True]) == [0, 1]
    assert swap_remove([True, True]) == []
    for done in ([True, False] * 3, [False, True, True, False, True, False, False]):
        keep = swap_remove(done)
        assert sorted(keep) == [i for i, d in enumerate(done) if not d]
        assert all(i == j or i >= len(keep) for j, i in enumerate(keep))


@pytest.mark.parametrize("keep", [[0, 3, 2], [1, 2], [2, 0, 1], [0, 0, 1]])
def test_keeping_rows_equals_selecting_them(keep: list[int]) -> None:
    """In place for orders that only move rows from past the new end into holes (the first
    two); any other order (a permutation, a repeat) falls back to a selection."""
    slot, dyn = _filled(4, 9, 1), _filled(4, 9, 1, DynamicCache)
    before = _ptrs(slot)
    keep_rows(slot, keep)
    select_rows(dyn, torch.tensor(keep))
    _same(slot, dyn)
    moved_in_place = all(i == j or i >= len(keep) for j, i in enumerate(keep))
    assert (_ptrs(slot) == before) == moved_in_place
    for layer in (0, 1):  # and it keeps appending like the selection
        k, v = _kv(len(keep), 2, 50 + layer)
        slot.update(k, v, layer), dyn.update(k, v, layer)
    _same(slot, dyn)


@pytest.mark.parametrize(("wa", "wb"), [(9, 4), (4, 9), (6, 6)])
def test_joining_rows_pads_the_narrower_side(wa: int, wb: int) -> None:
    """The running rows keep their slots (zeros after them when the joiners are wider), the
    joiners are left padded; written into the running rows' room when it has the rows."""
    a, b = _filled(3, wa, 2), _filled(1, wb, 3)
    keep_rows(a, [0, 2])  # a row left: its room keeps three rows
    want = []
    for la, lb in zip(a.layers, b.layers):
        for name in ("keys", "values"):
            x, y = getattr(la, name), getattr(lb, name)
            width = max(wa, wb)
            want.append(
                torch.cat(
                    [
                        torch.nn.functional.pad(x, (0, 0, 0, width - wa)),
                        torch.nn.functional.pad(y, (0, 0, width - wb, 0)),
                    ]
                )
            )
    before = _ptrs(a)
    joined = join_rows(a, b)
    got = [t for layer in joined.layers for t in (layer.keys, layer.values)]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    fits = max(wa, wb) <= 64 + wa  # the room's slack
    assert (_ptrs(joined) == before) == fits
    dyn = DynamicCache()
    for i, w in enumerate(want[::2]):
        dyn.update(w, want[2 * i + 1], i)
    for layer in (0, 1):  # appending after the join
        k, v = _kv(3, 1, 70 + layer)
        joined.update(k, v, layer), dyn.update(k, v, layer)
    _same(joined, dyn)


def test_a_join_past_the_rooms_rows_moves_to_a_bigger_room() -> None:
    a, b = _filled(2, 5, 4), _filled(2, 7, 5)
    joined = join_rows(a, b)
    assert joined.layers[0].keys.shape == (4, 2, 7, 4)
    assert torch.equal(joined.layers[0].keys[2:], b.layers[0].keys)
    assert joined.layers[0].holds("keys", joined.layers[0].keys)
