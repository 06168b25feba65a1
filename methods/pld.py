"""Prompt lookup decoding (PLD): draft the continuation of an earlier occurrence of the suffix.

Two lookup rules; prompt and generated tokens are both searched, image placeholder tokens
included:

- `match: latest` (the default; MMSpec's `method/pld/spec_model_pld.py`): the query is the
  trailing `ngram` tokens, ending with the pending token. A query holding an image token drafts
  nothing; only windows that end before the query count; the latest match wins, skipping any
  whose continuation holds an image token; the draft is up to `num_pred` tokens after it.
- `match: first` (HF `prompt_lookup_num_tokens`, Saxena's original PLD): windows may overlap
  the query; the earliest match that has a continuation wins; image tokens are not special.

Either rule tries n-gram sizes from `ngram` down to `min_ngram` (default: `ngram`, MMSpec's
fixed n; HF's variant is `{match: first, min_ngram: 1}`).
"""

from __future__ import annotations

import numpy as np

from mmspec.methods.base import DraftContext, Drafter
from mmspec.methods.registry import register
from mmspec.methods.tree import DraftTree
from mmspec.models.target import Target

MATCHES = ("latest", "first")


def latest_continuation(
    seq: np.ndarray, n: int, num_pred: int, image_token: int | None = None
) -> list[int]:
    """MMSpec's rule for one n-gram size (see the module docstring)."""
    n_tokens = len(seq)
    if n_tokens < 2 * n:  # the query and at least one whole window before it
        return []
    query = seq[n_tokens - n :]
    if image_token is not None and (query == image_token).any():
        return []
    windows = np.lib.stride_tricks.sliding_window_view(seq[: n_tokens - n], n)
    for hit in np.flatnonzero((windows == query).all(axis=1))[::-1]:
        start = int(hit) + n
        candidate = seq[start : start + num_pred]
        if image_token is None or not (candidate == image_token).any():
            return candidate.tolist()
    return []


def first_continuation(seq: np.ndarray, n: int, num_pred: int) -> list[int]:
    """HF's rule for one n-gram size (see the module docstring)."""
    n_tokens = len(seq)
    if n_tokens <= n:
        return []
    tail = seq[n_tokens - n :]
    # windows that start before the tail itself, so each has at least one token after it
    windows = np.lib.stride_tricks.sliding_window_view(seq[: n_tokens - 1], n)
    hits = np.flatnonzero((windows == tail).all(axis=1))
    if not hits.size:
        return []
    start = int(hits[0]) + n
    return seq[start : start + num_pred].tolist()


def lookup_continuation(
    seq: np.ndarray,
    ngram: int,
    min_ngram: int,
    num_pred: int,
    match: str = "latest",
    image_token: int | None = None,
) -> list[int]:
    """The draft for one row: the first n (from `ngram` down to `min_ngram`) that finds one."""
    for n in range(ngram, min_ngram - 1, -1):
        if match == "latest":
            draft = latest_continuation(seq, n, num_pred, image_token)
        else:
            draft = first_continuation(seq, n, num_pred)
        if draft:
            return draft
    return []


@register("pld")
class PromptLookup(Drafter):
    def __init__(
        self,
        ngram: int = 4,
        num_pred: int = 10,
        min_ngram: int | None = None,
        match: str = "latest",
    ) -> None:
        min_ngram = ngram if min_ngram is None else min_ngram
        if not 1 <= min_ngram <= ngram:
            raise ValueError(f"pld needs 1 <= min_ngram <= ngram, got {min_ngram}, {ngram}")
        if num_pred < 1:
            raise ValueError(f"pld needs num_pred >= 1, got {num_pred}")
        if match not in MATCHES:
            raise ValueError(f"pld match must be one of {', '.join(MATCHES)}, got {match!r}")
        self.ngram, self.num_pred, self.min_ngram, self.match = ngram, num_pred, min_ngram, match
        # image placeholder id, read from the target: MMSpec's rule never drafts across one
        self.image_token: int | None = None

    def load(self, target: Target) -> None:
        self.image_token = target.image_token_id

    def join(self, ctx: DraftContext) -> None:
        """Nothing per row: drafts come from `ctx.tokens` alone."""

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        return [
            DraftTree.chain(
                lookup_continuation(
                    np.asarray(t),
                    self.ngram,
                    self.min_ngram,
                    self.num_pred,
                    self.match,
                    self.image_token,
                )
            )
            for t in ctx.tokens
        ]
