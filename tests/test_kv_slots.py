"""The in-place KV cache (`SlotCache`): the same keys and values as transformers'
`DynamicCache` through everything the engine and the draft heads do to a cache, without
copying the cache on every append."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mmspec.methods.kv_slots import SlotCache, SlotLayer, gather_new_slots, select_rows
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
