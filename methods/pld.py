"""Prompt lookup decoding (PLD): draft the continuation of an earlier occurrence of the suffix.

Matches the HF `prompt_lookup_num_tokens` rule so the two can be compared: try n-gram sizes
from `ngram` down to `min_ngram`; for the first size whose trailing n-gram occurs earlier in
the sequence, the earliest occurrence that has a continuation wins; draft up to `num_pred`
tokens of that continuation. Prompt and generated tokens are both searched.
"""

from __future__ import annotations

import numpy as np

from mmspec.methods.base import DraftContext, Drafter
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree


def lookup_continuation(seq: np.ndarray, ngram: int, min_ngram: int, num_pred: int) -> list[int]:
    """Continuation of the earliest earlier match of seq's trailing n-gram, longest n first."""
    n_tokens = len(seq)
    for n in range(min(ngram, n_tokens - 1), min_ngram - 1, -1):
        tail = seq[n_tokens - n :]
        # windows that start before the tail itself, so each has at least one token after it
        windows = np.lib.stride_tricks.sliding_window_view(seq[: n_tokens - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return seq[start : min(start + num_pred, n_tokens)].tolist()
    return []


@register("pld")
class PromptLookup(Drafter):
    def __init__(self, ngram: int = 4, num_pred: int = 10, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= ngram:
            raise ValueError(f"pld needs 1 <= min_ngram <= ngram, got {min_ngram}, {ngram}")
        if num_pred < 1:
            raise ValueError(f"pld needs num_pred >= 1, got {num_pred}")
        self.ngram, self.num_pred, self.min_ngram = ngram, num_pred, min_ngram

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        return [
            DraftTree.chain(
                lookup_continuation(np.asarray(t), self.ngram, self.min_ngram, self.num_pred)
            )
            for t in ctx.tokens
        ]
