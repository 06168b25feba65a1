"""Continuous batching is lossless: rows joining a running batch change no row's output.

Every registered method (trained heads and every `viskip+X` included) serves a stream whose
requests join mid-batch at fixed decoding steps (tests/serving.py); greedy outputs must equal
`ar`'s one request at a time, and the sampled distribution at T = 1 must equal `ar`'s.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from mmspec.methods.engine import Engine, Request
from mmspec.methods.registry import get_drafter, method_names
from mmspec.models.loader import load_target
from mmspec.models.target import Target
from mmspec.orchestrator.runner import conversation
from mmspec.workloads import Sample, load_mmspec, synthetic_suite
from tests.conftest import mmspec_split
from tests.serving import StepSource
from tests.test_sampling import chi2_two_sample_p, red_circle_prompt

MODELS = ["tiny-qwen2.5-vl", "tiny-llava"]
MAX_NEW_TOKENS = 40
MAX_BATCH = 3


def _samples() -> list[Sample]:
    """Synthetic first turns and MMSpec testmini ones (their images differ in size)."""
    picked = synthetic_suite(per_topic=1, seed=0)[:4]
    with contextlib.suppress(pytest.skip.Exception):
        mini = load_mmspec(mmspec_split("testmini"))
        picked += [mini[i] for i in (5, 23, 32, 51)]  # PLD accepts drafts on the last three
    return picked


class Stream:
    """One model's requests and `ar`'s answers to them, one request at a time."""

    def __init__(self, model: str) -> None:
        torch.set_num_threads(1)
        self.target = load_target(model, device="cpu")
        samples = _samples()
        self.convs = [conversation(s, [], True) for s in samples]
        self.images = [s.load_image() for s in samples]
        ar = Engine(self.target, get_drafter("ar")())
        self.expected = [
            ar.generate([c], [i], MAX_NEW_TOKENS)[0].tokens for c, i in zip(self.convs, self.images)
        ]

    def requests(self) -> list[Request]:
        return [Request(k, c, i, 0.0) for k, (c, i) in enumerate(zip(self.convs, self.images))]


@pytest.fixture(scope="module", params=MODELS)
def stream(request: pytest.FixtureRequest) -> Iterator[Stream]:
    yield Stream(request.param)


@pytest.mark.parametrize("method", method_names())
def test_joining_rows_keep_greedy_outputs(stream: Stream, method: str) -> None:
    engine = Engine(stream.target, get_drafter(method)())
    source = StepSource(engine, stream.requests(), every=3, per_release=2)
    wall = engine.serve(source, MAX_BATCH, MAX_NEW_TOKENS)
    assert not source.errors
    assert source.joins_mid_batch >= 2, "no row joined a running batch: the test shows nothing"
    got = [source.results[k].tokens for k in range(len(stream.convs))]
    assert got == stream.expected
    for r in source.results.values():  # latency records are whole and ordered
        assert len(r.token_times_s) == len(r.tokens)
        assert r.token_times_s == sorted(r.token_times_s)
        assert 0 <= r.queue_s <= r.ttft_s == r.token_times_s[0] <= r.total_s <= wall
    if method != "ar" and not method.startswith("viskip+"):
        assert sum(r.accepted for r in source.results.values()) > 0, method


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_each_request_keeps_its_own_answer_cap(stream: Stream, method: str) -> None:
    """A request's own `max_new_tokens` (an API request's `max_tokens`) cuts its answer there,
    mid-acceptance too; the others keep the stream's cap, and every row stays `ar`'s."""
    caps = [1, 3, None, 7, 2, None, 5, 12]
    requests = [
        dataclasses.replace(r, max_new_tokens=cap) for r, cap in zip(stream.requests(), caps)
    ]
    engine = Engine(stream.target, get_drafter(method)())
    source = StepSource(engine, requests, every=2, per_release=2)
    engine.serve(source, MAX_BATCH, MAX_NEW_TOKENS)
    assert source.joins_mid_batch >= 2
    for k, cap in enumerate(caps[: len(stream.convs)]):
        want = stream.expected[k][: cap or MAX_NEW_TOKENS]
        got = source.results[k]
        assert got.tokens == want, k
        cut = cap is not None and len(stream.expected[k]) > cap
        assert got.stop == ("length" if cut else stream_stop(stream, k)), k
    with pytest.raises(ValueError, match="request 3: max_new_tokens must be >= 1, got 0"):
        Request(3, [], None, 0.0, max_new_tokens=0)


def stream_stop(stream: Stream, k: int) -> str:
    """How `ar` alone ended request k under the stream's cap."""
    return "eos" if stream.expected[k][-1] in stream.target.eos_token_ids else "length"


def test_a_full_batch_makes_arrivals_wait(stream: Stream) -> None:
    engine = Engine(stream.target, get_drafter("ar")())
    source = StepSource(engine, stream.requests(), every=1, per_release=4)
    engine.serve(source, 1, 8)
    waits = [source.results[k].queue_s for k in range(len(stream.convs))]
    assert waits[0] < waits[1] < waits[2]  # one row at a time: each waits for the one before


def test_joining_requests_are_encoded_beside_the_decoding_rows(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While rows decode, a joining request's encoding runs on the frontend thread and the
    running rows keep stepping meanwhile; with nothing decoding it is encoded in line. Either
    way the outputs stay `ar`'s."""
    engine = Engine(stream.target, get_drafter("ar")())
    encode = stream.target.encode
    seen: list[tuple[str, int, int]] = []  # (thread, heartbeat before, heartbeat after)

    def slow_encode(*args, **kwargs):
        before = engine.heartbeat
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.02)  # a slow image: the batch must not wait for it
        out = encode(*args, **kwargs)
        seen.append((threading.current_thread().name, before, engine.heartbeat))
        return out

    monkeypatch.setattr(stream.target, "encode", slow_encode)
    source = StepSource(engine, stream.requests(), every=2, per_release=1)
    engine.serve(source, MAX_BATCH, MAX_NEW_TOKENS)
    assert [source.results[k].tokens for k in range(len(stream.convs))] == stream.expected
    assert seen[0][0] == threading.main_thread().name  # the first: nothing to overlap with
    beside = [(b, a) for name, b, a in seen if name.startswith("mmspec-encode")]
    assert beside, "no request was encoded beside decoding rows"
    assert any(after > before for before, after in beside), "the batch waited for encoding"


def test_a_prompt_too_long_fails_alone(stream: Stream, monkeypatch: pytest.MonkeyPatch) -> None:
    lens = [
        len(stream.target.encode([c], [i]).tokens()[0]) for c, i in zip(stream.convs, stream.images)
    ]
    too_long = {k for k, n in enumerate(lens) if n == max(lens)}
    assert len(too_long) < len(lens)
    monkeypatch.setattr(stream.target, "context_length", max(lens) + MAX_NEW_TOKENS - 1)
    engine = Engine(stream.target, get_drafter("pld")())
    source = StepSource(engine, stream.requests(), every=2, per_release=2)
    engine.serve(source, MAX_BATCH, MAX_NEW_TOKENS)
    assert set(source.errors) == too_long
    assert all("context" in e for e in source.errors.values())
    for k in set(range(len(lens))) - too_long:  # the others ran, undisturbed
        assert source.results[k].tokens == stream.expected[k]


# ---- sampling ---------------------------------------------------------------------------
N = 300
TEMPERATURE = 1.0
POSITIONS = (1, 2, 3)
ALPHA = 1e-3


def _sampled(target: Target, method: str, seed0: int, joining: bool) -> list[list[int]]:
    conv, image = red_circle_prompt()
    engine = Engine(target, get_drafter(method)())
    if not joining:
        seeds = list(range(seed0, seed0 + N))
        return [r.tokens for r in engine.generate([conv] * N, [image] * N, 6, TEMPERATURE, seeds)]
    requests = [Request(k, conv, image, 0.0, seed0 + k) for k in range(N)]
    source = StepSource(engine, requests, every=1, per_release=16)
    engine.serve(source, 48, 6, TEMPERATURE)
    assert source.joins_mid_batch > 5
    return [source.results[k].tokens for k in range(N)]


@pytest.fixture(scope="module")
def llava() -> Target:
    return load_target("tiny-llava")


@pytest.fixture(scope="module")
def sampled_reference(llava: Target) -> list[list[int]]:
    return _sampled(llava, "ar", 10_000, joining=False)


def _min_p(x: list[list[int]], y: list[list[int]]) -> float:
    return min(
        chi2_two_sample_p([t[p] for t in x if len(t) > p], [t[p] for t in y if len(t) > p])
        for p in POSITIONS
    )


@pytest.mark.parametrize("method", method_names())
def test_joining_rows_keep_the_sampled_distribution(llava, sampled_reference, method) -> None:
    got = _sampled(llava, method, 0, joining=True)
    assert _min_p(got, sampled_reference) > ALPHA / len(POSITIONS)
    # the stream's own seeds decide: the same stream twice samples the same tokens
    if method == "ar":
        assert got == _sampled(llava, method, 0, joining=True)
        assert collections.Counter(map(tuple, got)) != collections.Counter(
            map(tuple, sampled_reference)
        )
