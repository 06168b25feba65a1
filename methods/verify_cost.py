"""The target's verification cost t(T): seconds of one verify forward of T tokens per row.

Measured as the engine verifies: T tokens per row (the root and T - 1 drafts) with the
engine's 4D additive mask and explicit positions, over the KV cache of a prefilled prompt
replicated to the batch size; the cache is cropped back after each forward. A chain stands for
every tree of T nodes: the mask's contents do not change the kernels. One warm-up round first
(kernel choice per shape, allocator growth), then `repeats` timed rounds interleaved over
every (batch size, T), so drift spreads over all points; each point keeps the fastest of its
rounds by default: interference (a co-located worker, the telemetry thread) only ever adds
time, and a roofline wants what the machine can do (`keep=statistics.median` for a typical
time). On a GPU the device is synchronised at both ends of each forward.

Who reads it: the runner measures it once per worker and batch size, before any timed window,
and its rows carry it (results/schema.py, `verify_cost_*`) for the report's roofline
(reports/roofline.py); benchmarks/gpu_evidence.py prints it.

Example:
    [cost] = measure_verify_costs(target, conversation, image, batch_sizes=[4])
    dict(zip(cost.tokens, cost.seconds))[1]  # t(1) at batch size 4
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import DynamicCache

from mmspec.methods.kv_slots import SlotCache, additive_mask, select_rows
from mmspec.models.target import Message, Target

# Powers of two up to 64 tokens per row: the largest default tree of our methods (Lookahead's
# decoding_length, the root included) fits, and 7 points keep a worker's calibration short.
DEFAULT_T_VALUES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_REPEATS = 5


@dataclass(frozen=True)
class VerifyCost:
    """t(T) at one batch size: `seconds[i]` is the time of one verify forward with `tokens[i]`
    tokens per row (the kept statistic of the timed rounds)."""

    batch_size: int
    context_len: int  # cached prompt tokens every row's verify attends to
    tokens: tuple[int, ...]  # T, ascending
    seconds: tuple[float, ...]  # (len(tokens),)


def device_sync(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (a no-op on CPU): timings end when the work does."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@torch.inference_mode()
def measure_verify_costs(
    target: Target,
    conversation: list[Message],
    image: Image.Image | None,
    batch_sizes: Sequence[int],
    t_values: Sequence[int] = DEFAULT_T_VALUES,
    repeats: int = DEFAULT_REPEATS,
    keep: Callable[[list[float]], float] = min,
) -> list[VerifyCost]:
    """t(T) per batch size, over the cached context of one prompt (`conversation`, `image`):
    `keep` of `repeats` timed rounds after a warm-up.

    Returns one VerifyCost per batch size, in the order given.
    """
    sync = device_sync(target.device)
    tokens = tuple(sorted(set(t_values)))
    prompt = target.encode([conversation], [image])
    base = SlotCache(config=target.model.config)
    _, next_pos = target.prefill(prompt, base)
    cache_len = base.get_seq_length()
    caches = {b: _replicated(base, b) for b in dict.fromkeys(batch_sizes)}
    del base
    times: dict[tuple[int, int], list[float]] = {}
    for rep in range(repeats + 1):  # rep 0: the warm-up
        for b, cache in caches.items():  # rep-major: drift spreads over every point
            for t in tokens:
                ids, pos, mask = _chain_inputs(target, b, t, cache_len, int(next_pos[0]))
                sync()
                t0 = time.perf_counter()
                target.verify(ids, pos, mask, cache)
                sync()
                if rep:
                    times.setdefault((b, t), []).append(time.perf_counter() - t0)
                _crop(cache, cache_len)
    return [
        VerifyCost(b, cache_len, tokens, tuple(keep(times[(b, t)]) for t in tokens))
        for b in batch_sizes
    ]


def _replicated(cache: DynamicCache, rows: int) -> DynamicCache:
    out = copy.deepcopy(cache)
    select_rows(out, torch.zeros(rows, dtype=torch.long, device=cache.layers[0].keys.device))
    return out


def _crop(cache: DynamicCache, length: int) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def _chain_inputs(
    target: Target, rows: int, t: int, cache_len: int, next_pos: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify inputs for a T-token chain per row, built as the engine builds a tree's: ids
    (rows, T), positions (rows, T), additive mask (rows, 1, T, cache_len + T)."""
    dev = target.device
    gen = torch.Generator().manual_seed(t)
    vocab = target.model.config.get_text_config().vocab_size
    ids = torch.randint(vocab, (rows, t), generator=gen).to(dev)
    positions = (next_pos + torch.arange(t)).expand(rows, -1).to(dev)
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    prefix = torch.ones(t, cache_len, dtype=torch.bool, device=dev)
    visible = torch.cat([prefix, causal], dim=1).expand(rows, -1, -1)
    return ids, positions, additive_mask(visible, target.dtype)
