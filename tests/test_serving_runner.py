"""The runner's stream mode (serving cells): the request source it hands `Engine.serve`, the rows
it makes of a stream (failures included), the stream's energy split, and end to end on a tiny
model against a static `ar` run."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from mmspec.methods.engine import Generation, Request
from mmspec.orchestrator.arrivals import arrival_times
from mmspec.orchestrator.runner import (
    ShardRunner,
    StreamSource,
    _Conversation,
    split_stream_energy,
)
from mmspec.orchestrator.shard_rows import expected_keys
from mmspec.orchestrator.shards import Shard
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.schema import rows_to_table
from mmspec.workloads.sample import Sample
from mmspec.workloads.synthetic import synthetic_suite

MODEL = "tiny-qwen2.5-vl"


def _samples() -> tuple[Sample, ...]:
    """Four synthetic samples, the last one a three-turn conversation."""
    suite = synthetic_suite(per_topic=1, seed=0)
    multi = [s for s in suite if len(s.turns) > 1]
    single = [s for s in suite if len(s.turns) == 1]
    assert multi, "the synthetic suite lost its multi-turn topic"
    return (*single[:3], multi[0])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _sample(sid: str, turns: int = 1) -> Sample:
    return Sample(sid, "general vqa", "x", tuple(f"q{t}?" for t in range(turns)), _png())


def _cell(scenario: str, batch_size: int, rate: float | None = None, **kw: Any) -> Cell:
    return Cell(
        f"c-{scenario}-{batch_size}",
        ModelConfig(MODEL),
        "ar",
        {},
        batch_size,
        kw.pop("temperature", 0.0),
        0,
        0,
        kw.pop("max_new_tokens", 8),
        "synthetic",
        scenario=scenario,
        rate=rate,
        arrival_seed=0 if scenario == "poisson" else None,
        **kw,
    )


# ----------------------------------------------------------------------------- the source


def _source(samples: list[Sample], arrivals: list[float]) -> StreamSource:
    convs = [_Conversation(s, s.load_image()) for s in samples]
    return StreamSource(convs, arrivals, lambda s, t: hash((s.id, t)) % 1000, lambda tok: "ans")


def test_source_returns_requests_as_they_arrive() -> None:
    src = _source([_sample("a"), _sample("b"), _sample("c")], [0.5, 0.1, 2.0])
    assert src.next_arrival_s() == pytest.approx(0.1)
    assert src.arrivals(0.0) == []
    first = src.arrivals(1.0)
    assert [r.arrival_s for r in first] == [0.1, 0.5]  # arrival order, not sample order
    assert src.arrivals(1.0) == []  # never twice
    assert src.next_arrival_s() == 2.0
    [last] = src.arrivals(5.0)
    assert src.next_arrival_s() is None
    ids = [r.id for r in (*first, last)]
    assert len(set(ids)) == 3
    assert all(r.image is not None and r.messages[0]["role"] == "user" for r in first)


def test_a_finished_turn_queues_the_next_one_with_the_answer() -> None:
    src = _source([_sample("m", turns=2)], [0.0])
    [turn0] = src.arrivals(0.0)
    assert len(turn0.messages) == 1
    src.finished(turn0, Generation(tokens=[1, 2]), None, now_s=3.25)
    assert src.next_arrival_s() == 3.25  # the follow-up arrives when its predecessor ended
    [turn1] = src.arrivals(3.25)
    assert turn1.id != turn0.id and turn1.seed != turn0.seed
    assert [m["role"] for m in turn1.messages] == ["user", "assistant", "user"]
    assert turn1.messages[1]["content"][0]["text"] == "ans"
    # the image goes with the first user turn only
    assert [c["type"] for c in turn1.messages[0]["content"]] == ["image", "text"]
    assert [c["type"] for c in turn1.messages[2]["content"]] == ["text"]
    src.finished(turn1, Generation(tokens=[3]), None, now_s=4.0)
    assert src.next_arrival_s() is None
    assert list(src.outcomes) == [("m", 0), ("m", 1)]


def test_a_failed_turn_fails_the_rest_of_its_conversation() -> None:
    src = _source([_sample("m", turns=3), _sample("s")], [0.0, 0.0])
    turn0, other = src.arrivals(0.0)
    src.finished(turn0, None, "ContextLengthError: too long", now_s=1.0)
    assert src.next_arrival_s() is None  # nothing follows a failure
    src.finished(other, Generation(tokens=[5]), None, now_s=1.0)
    errors = {k: o.error for k, o in src.outcomes.items() if o.error}
    assert errors == {("m", t): "ContextLengthError: too long" for t in range(3)}
    assert src.outcomes[("s", 0)].result is not None


def test_a_closed_loop_sends_a_first_turn_when_a_client_is_free() -> None:
    """Two clients: a third conversation is sent only when one of the first two ended - its
    last turn, not its first - and arrives then."""
    src = StreamSource(
        [_Conversation(s, None) for s in (_sample("m", turns=2), _sample("a"), _sample("b"))],
        [0.0, 0.0, 0.0],
        lambda s, t: 0,
        lambda tok: "ans",
        clients=2,
    )
    m0, a = src.arrivals(0.0)
    assert src.arrivals(5.0) == [] and src.next_arrival_s() is None  # both clients busy
    src.finished(m0, Generation(tokens=[1]), None, now_s=1.0)  # m goes on: its client too
    [m1] = src.arrivals(1.0)
    assert src.arrivals(1.0) == []
    src.finished(a, Generation(tokens=[2]), None, now_s=1.5)
    assert src.next_arrival_s() == 1.5
    [b] = src.arrivals(1.5)
    assert (b.arrival_s, b.messages[0]["content"][-1]["text"]) == (1.5, "q0?")
    src.finished(m1, None, "boom", now_s=2.0)  # a failure frees the client as well
    src.finished(b, Generation(tokens=[3]), None, now_s=2.5)
    assert src.next_arrival_s() is None
    assert set(src.outcomes) == {("m", 0), ("a", 0), ("m", 1), ("b", 0)}


# ----------------------------------------------------------------------------- a fake engine


@dataclass
class FakeServe:
    """`Engine.serve` on a virtual clock: every request decodes for 1 s, at most `max_batch`
    at once, first come first served. Raises after `fail_after` requests finished."""

    fail_after: int | None = None
    seen: list[Request] = field(default_factory=list)
    heartbeat: int = 0

    def serve(self, source: Any, max_batch: int, max_new_tokens: int, temperature: float) -> float:
        now, waiting, running, finished = 0.0, [], [], 0
        while True:
            waiting += source.arrivals(now)
            while waiting and len(running) < max_batch:
                request = waiting.pop(0)
                self.seen.append(request)
                running.append((request, now))
            if not running:
                nxt = source.next_arrival_s()
                if nxt is None:
                    return now
                now = max(now, nxt)
                continue
            request, began = running.pop(0)
            now = max(now, began + 1.0)
            if self.fail_after is not None and finished == self.fail_after:
                raise RuntimeError("CUDA out of memory (fake)")
            tokens = [len(request.messages), request.id]
            queue = began - request.arrival_s
            result = Generation(
                tokens=tokens,
                prompt_tokens=3,
                steps=2,
                total_s=now - request.arrival_s,
                arrival_s=request.arrival_s,
                queue_s=queue,
                ttft_s=queue + 0.5,
                token_times_s=[queue + 0.5, now - request.arrival_s],
            )
            finished += 1
            source.finished(request, result, None, now)


@pytest.fixture(scope="module")
def runner() -> Iterator[ShardRunner]:
    made = ShardRunner(ModelConfig(MODEL), "ar", {}, threads=1, verify_t=())
    try:
        yield made
    finally:
        made.close()


def _keys(rows: list[Any]) -> list[tuple[str, int]]:
    return [(r.sample_id, r.turn) for r in rows]


def test_stream_rows_cover_every_turn_once(
    runner: ShardRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeServe()
    monkeypatch.setattr(runner, "engine", fake)
    samples = (_sample("a"), _sample("m", turns=3), _sample("b"), _sample("c"))
    shard = Shard("run", "sh", _cell("continuous", 2), samples)
    rows = runner.run(shard)
    assert _keys(rows) == expected_keys(shard)
    assert all(r.status == "ok" for r in rows)
    rows_to_table(rows)  # the schema takes them
    by_key = {(r.sample_id, r.turn): r for r in rows}
    # continuous: a closed loop of 2 clients. "a" and "m" are sent at 0; "b" when "a" ended
    # (m's client is busy through its three turns), "c" when "b" ended
    end = {k: r.arrival_s + r.total_s for k, r in by_key.items()}
    first = [by_key[s.id, 0].arrival_s for s in samples]
    assert first == [0.0, 0.0, end["a", 0], end["b", 0]] and first[3] > first[2] > 0
    assert by_key["m", 1].arrival_s == pytest.approx(by_key["m", 0].total_s)
    assert by_key["m", 2].output_tokens[0] == 5  # it saw both earlier turns and answers
    for r in rows:
        assert (r.scenario, r.rate, r.batch_size, r.batch_index) == ("continuous", None, 2, 0)
        assert r.batch_s == rows[0].batch_s > 0
        assert r.token_times_s == [r.queue_s + 0.5, r.total_s]
        assert r.ttft_s == r.queue_s + 0.5
        assert r.output_text == runner.target.decode(r.output_tokens)
    assert max(r.queue_s for r in rows) == 0  # 2 clients, 2 rows: no request waits
    assert len({r.id for r in fake.seen}) == len(rows)


def test_poisson_first_turns_arrive_at_the_drawn_times(
    runner: ShardRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "engine", FakeServe())
    samples = tuple(_sample(f"s{i}") for i in range(5))
    rows = runner.run(Shard("run", "sh", _cell("poisson", 8, rate=2.0), samples))
    assert [r.arrival_s for r in rows] == pytest.approx(arrival_times(0, 5, 2.0))
    assert all(r.rate == 2.0 and r.scenario == "poisson" for r in rows)


def test_a_bad_image_fails_its_rows_and_the_stream_goes_on(
    runner: ShardRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeServe()
    monkeypatch.setattr(runner, "engine", fake)
    broken = Sample("bad", "general vqa", "x", ("q?", "and?"), b"not an image", "bad.png")
    samples = (_sample("a"), broken, _sample("b"))
    rows = runner.run(Shard("run", "sh", _cell("poisson", 2, rate=1.0), samples))
    assert _keys(rows) == [("a", 0), ("bad", 0), ("bad", 1), ("b", 0)]
    status = {(r.sample_id, r.turn): r.status for r in rows}
    assert status == {("a", 0): "ok", ("bad", 0): "error", ("bad", 1): "error", ("b", 0): "ok"}
    assert "bad.png" in rows[1].error
    # the others keep their places in the arrival pattern
    times = arrival_times(0, 3, 1.0)
    assert [rows[0].arrival_s, rows[3].arrival_s] == pytest.approx([times[0], times[2]])


def test_a_failing_stream_keeps_the_rows_it_measured(
    runner: ShardRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "engine", FakeServe(fail_after=2))
    samples = (_sample("a"), _sample("b"), _sample("m", turns=2), _sample("c"))
    shard = Shard("run", "sh", _cell("continuous", 1), samples)
    rows = runner.run(shard)
    assert _keys(rows) == expected_keys(shard)
    ok = [r for r in rows if r.status == "ok"]
    assert _keys(ok) == [("a", 0), ("b", 0)]  # concurrency 1: the first two finished
    failed = [r for r in rows if r.status == "error"]
    assert len(failed) == 3 and all("CUDA out of memory (fake)" in r.error for r in failed)
    assert all(r.batch_s == ok[0].batch_s for r in ok)


# ----------------------------------------------------------------------------- energy


class _SteadyPower:
    """A sampler whose counter reads `watts` x seconds since 0."""

    def __init__(self, watts: float) -> None:
        self.watts = watts

    def energy_j(self, t0: float, t1: float) -> float:
        return self.watts * (t1 - t0)


def _result(arrival: float, queue: float, total: float) -> Generation:
    return Generation(arrival_s=arrival, queue_s=queue, total_s=total)


def test_stream_energy_is_shared_by_the_rows_decoding() -> None:
    results = [
        _result(0.0, 0.0, 4.0),  # decodes 0..4
        _result(0.0, 2.0, 4.0),  # queued until 2, decodes 2..4
        _result(10.0, 0.0, 1.0),  # alone, 10..11, after an idle wait
    ]
    shares = split_stream_energy(_SteadyPower(100.0), 5.0, results)
    assert shares == pytest.approx([200 + 100, 100, 100])
    # idle stretches (4..10) belong to no row
    assert sum(shares) == pytest.approx(100.0 * (4 + 1))


def test_stream_energy_without_a_counter_is_unknown() -> None:
    class NoCounter:
        def energy_j(self, t0: float, t1: float) -> None:
            return None

    assert split_stream_energy(NoCounter(), 0.0, [_result(0, 0, 1)] * 2) == [None, None]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(("scenario", "rate"), [("continuous", None), ("poisson", 20.0)])
def test_a_stream_generates_what_static_ar_does(
    runner: ShardRunner, scenario: str, rate: float | None
) -> None:
    """Greedy `ar` through Engine.serve, rows joining as others leave (concurrency 2 over four
    samples, one of them three turns): every (sample, turn) gets one ok row with the tokens a
    static batch gives it."""
    samples = _samples()
    static = runner.run(Shard("run", "static", _cell("static", 2), samples))
    stream = runner.run(Shard("run", "stream", _cell(scenario, 2, rate=rate), samples))
    assert (
        _keys(stream)
        == _keys(static)
        == expected_keys(Shard("r", "x", _cell("static", 2), samples))
    )
    assert all(r.status == "ok" for r in static + stream), [r.error for r in static + stream]
    assert [r.output_tokens for r in stream] == [r.output_tokens for r in static]
    for r in stream:
        assert r.batch_index == 0 and r.batch_s == stream[0].batch_s > 0
        assert len(r.token_times_s) == r.new_tokens > 0
        assert 0 <= r.queue_s <= r.ttft_s <= r.token_times_s[-1] <= r.total_s
        assert r.arrival_s + r.total_s <= r.batch_s + 1e-6
    for r in static:
        assert r.scenario == "static" and r.arrival_s == 0 and r.queue_s == 0
        assert r.ttft_s >= r.prefill_s > 0 and len(r.token_times_s) == r.new_tokens
    if rate is not None:
        firsts = [r.arrival_s for r in stream if r.turn == 0]
        assert firsts == pytest.approx(arrival_times(0, len(samples), rate))
