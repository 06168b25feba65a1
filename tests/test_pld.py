"""PLD's lookup rules on crafted token sequences: MMSpec's (the default) and HF's (an option).

Each case pins one rule of MMSpec's `method/pld/spec_model_pld.py` (commit fd33670), so CI
guards fidelity without the reference code; benchmarks/parity runs the reference itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from mmspec.methods.pld import PromptLookup, lookup_continuation
from mmspec.methods.registry import get_drafter

IMG = 99  # an image placeholder id


def latest(seq: list[int], ngram: int = 2, num_pred: int = 3, image: int | None = IMG) -> list[int]:
    return lookup_continuation(np.array(seq), ngram, ngram, num_pred, "latest", image)


def first(seq: list[int], ngram: int = 2, min_ngram: int = 1, num_pred: int = 3) -> list[int]:
    return lookup_continuation(np.array(seq), ngram, min_ngram, num_pred, "first")


def test_the_latest_match_wins() -> None:
    seq = [1, 2, 3, 4, 1, 2, 5, 6, 0, 1, 2]
    assert latest(seq) == [5, 6, 0]
    assert first(seq) == [3, 4, 1]  # HF: the earliest


def test_windows_must_end_before_the_query() -> None:
    # the only earlier occurrence of (7, 7) overlaps the query (7, 7) at the end
    seq = [5, 7, 7, 7]
    assert latest(seq) == []
    assert first(seq) == [7]


def test_a_continuation_with_an_image_token_is_skipped_for_an_earlier_match() -> None:
    seq = [1, 2, 3, 4, 8, 1, 2, IMG, 6, 0, 1, 2]
    assert latest(seq) == [3, 4, 8]
    assert latest(seq, image=None) == [IMG, 6, 0]


def test_a_query_with_an_image_token_drafts_nothing() -> None:
    seq = [IMG, 4, 5, 6, IMG, 4]
    assert latest(seq) == []
    assert latest(seq, image=None) == [5, 6, IMG]


def test_fixed_n_by_default_and_fallback_as_an_option() -> None:
    seq = [1, 2, 3, 9, 8, 7, 3]  # no earlier (7, 3); 3 alone recurs
    assert latest(seq) == []
    assert lookup_continuation(np.array(seq), 2, 1, 3, "latest", IMG) == [9, 8, 7]
    assert first(seq) == [9, 8, 7]


def test_the_draft_may_run_into_the_query_and_stops_at_the_sequence_end() -> None:
    seq = [4, 5, 4, 5]  # the match at 0 continues with the query itself
    assert latest(seq, num_pred=10) == [4, 5]


def test_too_short_sequences_draft_nothing() -> None:
    assert latest([1, 2, 1]) == []  # fewer than 2n tokens
    assert latest([1, 2, 1, 2]) == [1, 2]


def test_defaults_are_mmspecs() -> None:
    pld = get_drafter("pld")()
    assert (pld.ngram, pld.min_ngram, pld.num_pred, pld.match) == (4, 4, 10, "latest")
    hf = PromptLookup(match="first", min_ngram=1)
    assert (hf.ngram, hf.min_ngram) == (4, 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"match": "earliest"}, "match must be one of latest, first"),
        ({"ngram": 2, "min_ngram": 3}, "1 <= min_ngram <= ngram"),
        ({"num_pred": 0}, "num_pred >= 1"),
    ],
)
def test_bad_options(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptLookup(**args)
