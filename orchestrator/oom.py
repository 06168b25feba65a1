"""Out of memory during generation: recognise it, free what can be freed, split the batch.

A batch that runs out of memory is halved and each half run on its own (again halved if it
still does not fit, down to single samples); a single sample that still does not fit becomes
error rows. The rows of a reduced batch stay status "ok" (the measurement is real) and say in
their `error` column at which batch size they actually ran, e.g. "out of memory at batch size
4; ran at batch size 2", so a report can keep them out of batch-size comparisons. Their
`batch_s` and timings are those of the smaller batch they ran in; both halves keep the
original batch's `batch_index`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

REDUCED_BATCH_NOTE = "out of memory at batch size {failed}; ran at batch size {size}"
# allocators that report running out as a plain RuntimeError (CPU, MPS, older CUDA builds)
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "failed to allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch.cuda.OutOfMemoryError, MemoryError and allocator RuntimeErrors."""
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def release_memory(device: torch.device) -> None:
    """Return cached blocks after an OOM, so the smaller batch starts from a clean pool."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def halves(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """The first half (the larger one for an odd length) and the rest."""
    middle = (len(items) + 1) // 2
    return list(items[:middle]), list(items[middle:])


def reduced_batch_note(failed: int, size: int) -> str:
    return REDUCED_BATCH_NOTE.format(failed=failed, size=size)


def generate_unless_oom(generate: Callable[[], R], can_split: bool) -> R | None:
    """`generate()`, or None when it ran out of memory and the batch can still be halved.

    Returning (rather than handling the split inside an `except` block) drops the exception
    and its traceback, which pin the failed batch's tensors, before the halves start.
    """
    try:
        return generate()
    except Exception as exc:
        if not (can_split and is_out_of_memory(exc)):
            raise
        log.warning("generation ran out of memory (%s); halving the batch", exc)
        return None
