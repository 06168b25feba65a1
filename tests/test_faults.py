"""Fault handling without Ray: OOM fallback in the runner, telemetry files, slot planning.

The multi-node fault tests (actor killed, node lost, driver killed) are in test_cluster.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch

from mmspec.methods.engine import Generation
from mmspec.models.target import ContextLengthError
from mmspec.orchestrator import store
from mmspec.orchestrator.grid import GridError, parse_grid, to_dict
from mmspec.orchestrator.oom import halves, is_out_of_memory, reduced_batch_note
from mmspec.orchestrator.shard_rows import expected_keys
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.worker import Worker
from mmspec.results import layout
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.schema import rows_to_table
from mmspec.workloads.sample import Sample
from mmspec.workloads.synthetic import synthetic_suite
from tests.fake_runner import FakeRunner, make_samples

# ---------------------------------------------------------------- OOM fallback


class FakeTarget:
    """Just what ShardRunner asks of a target outside generation."""

    device = torch.device("cpu")

    def decode(self, tokens: list[int]) -> str:
        return " ".join(map(str, tokens))


class FakeEngine:
    """Tokens from a hash of each conversation: the same whatever the batch, like greedy
    decoding; a batch of more than `limit` rows raises `error` instead of running."""

    def __init__(self, target: Any, drafter: Any) -> None:
        self.limit: int | None = None  # None: everything fits
        self.error: type[BaseException] = torch.cuda.OutOfMemoryError
        self.batches: list[int] = []  # rows per generate call, in call order

    def generate(
        self, conversations: list[Any], images: list[Any], max_new_tokens: int, *args: Any
    ) -> list[Generation]:
        self.batches.append(len(conversations))
        if self.limit is not None and len(conversations) > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 20.00 GiB")
        too_long = [i for i, c in enumerate(conversations) if "TOO LONG" in json.dumps(c)]
        if too_long:  # as Target.encode does, before any generation
            raise ContextLengthError("prompt + max_new_tokens exceeds the context", too_long)
        results = []
        for conv in conversations:
            digest = hashlib.sha256(json.dumps(conv, sort_keys=True).encode()).digest()
            tokens = list(digest[:max_new_tokens])
            results.append(Generation(tokens=tokens, steps=len(tokens), total_s=0.001))
        return results


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from mmspec.orchestrator import runner as runner_module

    monkeypatch.setattr(runner_module, "load_target", lambda *a, **k: FakeTarget())
    monkeypatch.setattr(runner_module, "Engine", FakeEngine)
    runner = runner_module.ShardRunner(ModelConfig("tiny-llava"), "ar", {}, threads=1)
    assert runner.engine.batches == [1]  # the warm-up generation, before any shard
    runner.engine.batches.clear()
    yield runner
    close = getattr(runner, "close", None)
    if close is not None:
        close()


def oom_shard(runner: Any) -> Shard:
    samples = synthetic_suite(per_topic=1, seed=0)  # six samples, the last multi-turn
    cell = Cell("c", runner.model_config, "ar", {}, 4, 0.0, 0, 0, 8, "synthetic")
    return Shard("run", "c__s000", cell, tuple(samples))


def by_key(rows: list[Any]) -> dict[tuple[str, int], Any]:
    return {(r.sample_id, r.turn): r for r in rows}


@pytest.mark.parametrize(
    ("limit", "error", "ran_at", "first_turn_batches"),
    [
        # 4 -> 2 + 2 -> 1 + 1 + 1 + 1; then the shard's second batch: 2 -> 1 + 1
        (1, torch.cuda.OutOfMemoryError, 1, [4, 2, 1, 1, 2, 1, 1, 2, 1, 1]),
        (2, MemoryError, 2, [4, 2, 2, 2]),  # 4 -> 2 + 2; the second batch (2 rows) fits
    ],
)
def test_an_oom_batch_is_rerun_in_halves(
    runner: Any, limit: int, error: type[BaseException], ran_at: int, first_turn_batches: list[int]
) -> None:
    shard = oom_shard(runner)
    reference = by_key(runner.run(shard))
    runner.engine.limit, runner.engine.error, runner.engine.batches = limit, error, []
    rows = runner.run(shard)
    got = by_key(rows)
    assert len(rows) == len(got) == len(reference) == len(expected_keys(shard))  # each once
    assert {r.status for r in rows} == {"ok"}
    # outputs do not depend on the batch (as greedy decoding's): the halves give the same
    assert {k: r.output_sha256 for k, r in got.items()} == {
        k: r.output_sha256 for k, r in reference.items()
    }
    # batch 0 (4 rows) ran out of memory and ran at `ran_at` rows; the note says so
    first = [got[s.id, 0] for s in shard.samples[:4]]
    assert {r.error for r in first} == {reduced_batch_note(4, ran_at)}
    assert {r.batch_index for r in first} == {0}
    assert all(r.batch_size == 4 for r in rows)  # the cell's batch size is the cell's
    second = [got[s.id, 0] for s in shard.samples[4:]]
    assert {r.error for r in second} == ({None} if limit >= 2 else {reduced_batch_note(2, 1)})
    # the multi-turn sample's later turns run alone: they fit, and say nothing
    later_turns = len(shard.samples[5].turns) - 1
    assert later_turns > 0 and got[shard.samples[5].id, 1].error is None
    assert runner.engine.batches == first_turn_batches + [1] * later_turns


def test_oom_at_one_row_becomes_error_rows(runner: Any) -> None:
    shard = oom_shard(runner)
    runner.engine.limit = 0
    rows = runner.run(shard)  # never raises
    assert len(by_key(rows)) == len(rows) == len(expected_keys(shard))
    assert {r.status for r in rows} == {"error"}
    assert all(r.error.startswith("OutOfMemoryError: CUDA out of memory") for r in rows)


def test_other_errors_are_not_split(runner: Any) -> None:
    shard = oom_shard(runner)
    runner.engine.limit, runner.engine.error = 0, ValueError
    rows = runner.run(shard)
    batches = runner.engine.batches
    assert batches == [4, 2]  # one try per batch: a bad input does not get smaller
    assert {r.status for r in rows} == {"error"}


def test_only_the_prompts_that_do_not_fit_the_context_fail(runner: Any) -> None:
    samples = [
        Sample(id=f"s{i}", topic="general vqa", category="c", turns=(text,), image_bytes=None)
        for i, text in enumerate(["fits", "TOO LONG", "fits too", "TOO LONG again"])
    ]
    cell = Cell("c", runner.model_config, "ar", {}, 4, 0.0, 0, 0, 8, "synthetic")
    rows = runner.run(Shard("run", "c__s000", cell, tuple(samples)))
    assert [(r.sample_id, r.status) for r in rows] == [
        ("s1", "error"), ("s3", "error"), ("s0", "ok"), ("s2", "ok")
    ]  # fmt: skip
    assert all(r.error.startswith("ContextLengthError: prompt") for r in rows[:2])
    assert runner.engine.batches == [4, 2]  # the rest ran together, once


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(
        RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error
    assert halves([1, 2, 3]) == ([1, 2], [3])
    assert halves([1, 2]) == ([1], [2])


# ---------------------------------------------------------------- telemetry in the store


def make_shard(index: int = 0) -> Shard:
    cell = Cell("m__pld__bs2__t0__r0__w", ModelConfig("m"), "pld", {}, 2, 0.0, 0, 0, 8, "synthetic")
    return Shard("run", f"{cell.cell_id}__s{index:03d}", cell, tuple(make_samples(4)))


def telemetry_for(shard: Shard, ts: tuple[float, ...] = (0.0, 0.05)) -> pa.Table:
    return pa.table({"shard_id": [shard.shard_id] * len(ts), "ts": list(ts)})


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run_dir = store.create_run_dir(tmp_path / "runs", "demo")
    store.write_manifest(run_dir, {"run_id": run_dir.name})
    return run_dir


def results_of(shard: Shard) -> pa.Table:
    return rows_to_table(FakeRunner(shard.cell.model, "pld", {}).run(shard))


def test_telemetry_sits_beside_results_not_under_them(run_dir: Path) -> None:
    shard = make_shard()
    path = store.write_shard(run_dir, shard, results_of(shard), telemetry_for(shard))
    tele = layout.telemetry_path(run_dir, shard.cell, shard.shard_id)
    assert tele.relative_to(run_dir / "telemetry") == path.relative_to(run_dir / "results")
    assert layout.telemetry_files(run_dir) == [tele]
    assert layout.result_files(run_dir) == [path]  # what reports scan: no telemetry
    with pa.memory_map(str(tele)) as source:
        assert pa.ipc.open_file(source).read_all().equals(telemetry_for(shard))
    # written again (a retried shard): replaced, never duplicated
    store.write_shard(run_dir, shard, results_of(shard), telemetry_for(shard, (1.0,)))
    assert layout.telemetry_files(run_dir) == [tele]
    with pa.memory_map(str(tele)) as source:
        assert pa.ipc.open_file(source).read_all().num_rows == 1


def test_telemetry_is_written_before_the_completion_marker(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = make_shard()
    written: list[str] = []
    replace = store.os.replace

    def spy(src: Any, dst: Any) -> None:
        written.append(Path(dst).relative_to(run_dir).parts[0])
        replace(src, dst)

    monkeypatch.setattr(store.os, "replace", spy)
    store.write_shard(run_dir, shard, results_of(shard), telemetry_for(shard))
    assert written == ["telemetry", "results"]


def test_bad_telemetry_writes_nothing(run_dir: Path) -> None:
    shard, other = make_shard(0), make_shard(1)
    with pytest.raises(store.StoreError, match="telemetry holds rows of"):
        store.write_shard(run_dir, shard, results_of(shard), telemetry_for(other))
    with pytest.raises(store.StoreError, match="not an Arrow table"):
        store.write_shard(run_dir, shard, results_of(shard), {"ts": [1.0]})  # type: ignore[arg-type]
    assert layout.completed_shards(run_dir) == set()
    assert layout.telemetry_files(run_dir) == []


def test_stale_telemetry_temp_files_are_removed(run_dir: Path) -> None:
    shard = make_shard()
    tmp = layout.telemetry_path(run_dir, shard.cell, shard.shard_id)
    tmp = tmp.with_name(tmp.name + ".tmp")
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"half")
    assert store.remove_stale_tmp(run_dir) == 1 and not tmp.exists()


class TelemetryRunner(FakeRunner):
    """A FakeRunner that keeps a series, and forgets to set it on shards named in `skip`."""

    skip: tuple[str, ...] = ()

    def run(self, shard: Shard) -> list[Any]:
        rows = super().run(shard)
        if shard.shard_id not in self.skip:
            self.last_telemetry = telemetry_for(shard)
        return rows


def test_worker_returns_the_runners_telemetry() -> None:
    first, second = make_shard(0), make_shard(1)
    TelemetryRunner.skip = (second.shard_id,)
    worker = Worker(TelemetryRunner, first.cell.model, "pld", {}, "cpu", 1)
    table, telemetry = worker.run(first)
    assert table.num_rows == 4 and telemetry is not None
    assert set(telemetry.column("shard_id").to_pylist()) == {first.shard_id}
    # a runner that did not set it this time: no stale series from the shard before
    _, telemetry = worker.run(second)
    assert telemetry is None


def test_worker_results_cross_ray_as_arrow_ipc() -> None:
    from mmspec.orchestrator.worker import unpack_table

    first, second = make_shard(0), make_shard(1)
    TelemetryRunner.skip = (second.shard_id,)
    worker = Worker(TelemetryRunner, first.cell.model, "pld", {}, "cpu", 1)
    table, telemetry = worker.run(first)
    packed, packed_telemetry = worker.run_packed(first)
    assert isinstance(packed, bytes) and isinstance(packed_telemetry, bytes)
    got = unpack_table(packed)
    assert got.equals(table) and got.schema.equals(table.schema, check_metadata=True)
    assert telemetry is not None and unpack_table(packed_telemetry).equals(telemetry)
    assert worker.run_packed(second)[1] is None


# ---------------------------------------------------------------- grid and slot planning


GRID = {
    "name": "demo",
    "workloads": [{"builtin": "synthetic", "limit": 6}],
    "models": ["tiny-llava"],
    "methods": ["pld"],
}


def test_gpus_per_worker_grid_key() -> None:
    assert parse_grid(GRID).gpus_per_worker == 1
    grid = parse_grid({**GRID, "gpus_per_worker": 2})
    assert grid.gpus_per_worker == 2
    assert parse_grid(to_dict(grid)) == grid
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(GridError, match=r"g\.yaml: gpus_per_worker: got .*positive integers"):
            parse_grid({**GRID, "gpus_per_worker": bad}, "g.yaml")


def test_plan_slots_per_node() -> None:
    from mmspec.orchestrator.scheduler import SchedulingError, plan_slots

    nodes = [{"CPU": 8.0, "GPU": 3.0}, {"CPU": 8.0, "GPU": 3.0}, {"CPU": 4.0}]
    total = {"CPU": 20.0, "GPU": 6.0}
    assert plan_slots(total, None, 1, 1, nodes) == (6, True)
    # a worker cannot span nodes: 2 GPUs per worker fit once per 3-GPU node, not 6 // 2 times
    assert plan_slots(total, None, 1, 2, nodes) == (2, True)
    assert plan_slots(total, 1, 1, 2, nodes) == (1, True)
    with pytest.raises(SchedulingError, match="no node of this cluster has that many GPUs"):
        plan_slots(total, None, 1, 4, nodes)
    cpu_nodes = [{"CPU": 3.0}, {"CPU": 3.0}]
    assert plan_slots({"CPU": 6.0}, None, 2, 1, cpu_nodes) == (2, False)  # not 6 // 2
    assert plan_slots({"CPU": 6.0}, 5, 2, 1, cpu_nodes) == (5, False)  # workers wins
    # no node holds a 4-thread worker: refused at once, not left pending for capacity_wait_s
    for workers in (None, 1):
        with pytest.raises(SchedulingError, match="no node of this cluster has that many CPUs"):
            plan_slots({"CPU": 6.0}, workers, 4, 1, cpu_nodes)


def test_actor_options_reserve_gpus_per_worker() -> None:
    from mmspec.orchestrator.scheduler import SchedulerSettings, actor_options

    options = actor_options(SchedulerSettings(slots=2, use_gpu=True, gpus_per_worker=2))
    assert options["num_gpus"] == 2 and "num_cpus" not in options


def test_expected_cost_orders_shards() -> None:
    from mmspec.orchestrator.scheduler import expected_cost, model_scale

    assert model_scale("Qwen/Qwen2.5-VL-7B-Instruct") == 7.0
    assert model_scale("llava-hf/llava-1.5-13b-hf") == 13.0
    assert model_scale("tiny-qwen2.5-vl") == 1.0
    base = make_shard()
    cell = base.cell

    def cost(**changes: Any) -> float:
        shard = dataclasses.replace(base, cell=dataclasses.replace(cell, **changes))
        return expected_cost(shard, {"slow": 3.0})

    assert cost(max_new_tokens=16) == pytest.approx(2 * cost())
    assert cost(method="slow") == pytest.approx(3 * cost())
    assert cost(model=ModelConfig("x-7B")) == pytest.approx(7 * cost())
    assert cost(batch_size=8) == pytest.approx(cost(batch_size=2) / 2)  # sqrt(8 / 2)
    longer = dataclasses.replace(base, samples=tuple(make_samples(8)))  # sample 5: two turns
    assert expected_cost(longer) == pytest.approx(expected_cost(base) * 9 / 4)


def test_a_pair_gets_another_actor_only_if_that_finishes_it_sooner() -> None:
    from mmspec.orchestrator.scheduler import SchedulerSettings, _Run, _Slot, expected_cost
    from mmspec.orchestrator.worker import pair_of

    cell = make_shard().cell
    shards = [dataclasses.replace(make_shard(i), samples=tuple(make_samples(2))) for i in range(20)]
    pair, cost = pair_of(cell), expected_cost(shards[0])
    run = _Run(SchedulerSettings(slots=2), FakeRunner, lambda *a: None)
    run.slots = [_Slot(actor=object(), pair=pair), _Slot()]
    for shard in shards[:5]:
        run.cost[shard.shard_id] = cost
        run.enqueue(shard)
    # nothing measured yet: join (the optimistic default)
    assert run.next_pair() == pair
    run.clock.record(pair, 1.0, cost, fresh=False)  # a shard takes 1 s on a warm actor
    run.clock.record(pair, 11.0, cost, fresh=True)  # the first one took 11: 10 s to start up
    assert run.clock.startup(pair) == pytest.approx(10.0)
    # 5 s of work left for the one actor on it: a new actor would still be loading
    assert run.next_pair() is None
    for shard in shards[5:]:
        run.cost[shard.shard_id] = cost
        run.enqueue(shard)
    assert run.next_pair() == pair  # 20 s left: worth it
    run.slots[0].actor = None  # nobody serves the pair: it always gets an actor
    while len(run.queues.get(pair, ())) > 1:
        run.pop(pair)
    assert run.next_pair() == pair


def test_a_shard_waits_behind_the_running_one_only_while_the_pair_has_enough_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mmspec.orchestrator import scheduler
    from mmspec.orchestrator.scheduler import SchedulerSettings, _Run, _Slot, expected_cost
    from mmspec.orchestrator.worker import pair_of

    class FakeProbe:  # actor.progress.options(...).remote(): a reading never answered
        def options(self, **kwargs: Any) -> FakeProbe:
            return self

        def remote(self) -> object:
            return object()

    class FakeActor:  # stands in for a Worker actor handle: `run.remote` gives a fresh ref
        def __init__(self, *args: Any) -> None:
            self.sent: list[str] = []
            self.run_packed = self  # actor.run_packed.remote(shard)
            self.progress = FakeProbe()

        def remote(self, shard: Shard) -> object:
            self.sent.append(shard.shard_id)
            return object()

    def fail(ref: Any) -> Any:
        raise RuntimeError("the runner failed")

    monkeypatch.setattr(scheduler.ray, "kill", lambda *a, **k: None)
    monkeypatch.setattr(scheduler.ray, "get", fail)
    shards = [make_shard(i) for i in range(5)]
    pair = pair_of(shards[0].cell)
    run = _Run(SchedulerSettings(slots=2, prefetch=1), FakeRunner, lambda *a: None)
    run.actor_cls = type("FakeActorClass", (), {"remote": staticmethod(FakeActor)})
    first, second = FakeActor(), FakeActor()
    run.slots = [_Slot(actor=first, pair=pair), _Slot(actor=second, pair=pair)]
    for shard in shards:
        run.cost[shard.shard_id] = expected_cost(shard)
        run.enqueue(shard)
    ids = [s.shard_id for s in shards]

    run.dispatch(run.slots[0])  # one to run, one behind it: 3 left for 2 actors
    assert first.sent == ids[:2]
    run.dispatch(run.slots[1])  # one to run; 2 left for 2 actors: none waits behind it
    assert second.sent == ids[2:3]
    assert [s.shard_id for s in run.queues[pair]] == ids[3:]

    # the running shard fails: it is blamed and retried, the one behind it is not
    run.collect(run.slots[0].inflight[-1])  # whichever ref comes back, the oldest is settled
    assert run.attempts == {ids[0]: 1} and run.retries == 1
    replacement = run.slots[0].actor
    assert replacement is not first and run.slots[0].pair == pair
    assert replacement.sent == ids[:2]  # both again, in their order, on a fresh actor
    assert [s.shard_id for s in run.queues[pair]] == ids[3:]
