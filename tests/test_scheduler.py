"""Scheduler on a local Ray node with a fake runner: coverage, retries, error rows, pair reuse."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from mmspec.orchestrator.grid import make_shards
from mmspec.orchestrator.ray_session import ray_session
from mmspec.orchestrator.shard_rows import ShardResultError, complete_table, expected_keys
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.worker import Worker, pair_of
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.ids import cell_id
from mmspec.results.schema import rows_to_table
from tests.fake_runner import FakeRunner, make_samples, ship_to_ray

SAMPLES = make_samples(10)  # sample 5 has two turns


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ship_to_ray()
    with ray_session(local=True) as session:
        assert session.mode in ("local", "existing")
        yield


def make_cells(
    models: tuple[str, ...] = ("m-a", "m-b"),
    batch_sizes: tuple[int, ...] = (1, 4),
    args: dict[str, Any] | None = None,
    method: str = "pld",
) -> list[Cell]:
    return [
        Cell(
            cell_id=cell_id(model, method, bs, 0.0, 0, "w"),
            model=ModelConfig(model),
            method=method,
            method_args=dict(args or {}),
            batch_size=bs,
            temperature=0.0,
            repeat=0,
            seed=0,
            max_new_tokens=8,
            workload="w",
        )
        for model in models
        for bs in batch_sizes
    ]


def run(
    shards: list[Shard],
    slots: int,
    max_retries: int = 2,
    order: list[str] | None = None,
    on_result: Any = None,
    **settings_kw: Any,
) -> tuple[Any, dict[str, pa.Table]]:
    from mmspec.orchestrator.scheduler import Scheduler, SchedulerSettings

    written: dict[str, pa.Table] = {}
    calls: Counter[str] = Counter()

    def sink(shard: Shard, table: pa.Table, telemetry: pa.Table | None) -> None:
        assert telemetry is None  # FakeRunner keeps none
        calls[shard.shard_id] += 1
        written[shard.shard_id] = table
        if order is not None:
            order.append(shard.shard_id)
        if on_result is not None:
            on_result(shard)

    settings = SchedulerSettings(
        slots=slots, threads_per_worker=1, max_retries=max_retries, **settings_kw
    )
    summary = Scheduler(settings, runner_cls=FakeRunner).run(shards, sink)
    assert set(calls.values()) <= {1}, "a shard reached the sink twice"
    return summary, written


def keys_of(tables: dict[str, pa.Table]) -> list[tuple[str, str, int]]:
    table = pa.concat_tables(tables.values())
    return list(
        zip(
            table.column("cell_id").to_pylist(),
            table.column("sample_id").to_pylist(),
            table.column("turn").to_pylist(),
            strict=True,
        )
    )


def test_every_cell_sample_turn_exactly_once(ray_local: None) -> None:
    cells = make_cells()
    shards = make_shards(cells, {"w": SAMPLES}, "run", shard_size=4)
    summary, written = run(shards, slots=2)
    assert set(written) == {s.shard_id for s in shards}
    got = keys_of(written)
    expected = [(s.cell.cell_id, k[0], k[1]) for s in shards for k in expected_keys(s)]
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    assert len(got) == len(cells) * (len(SAMPLES) + 1)  # one sample has two turns
    assert summary.shards == len(shards) and summary.failed == 0 and summary.retries == 0
    table = pa.concat_tables(written.values())
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("device_name").to_pylist()) == {"cpu"}  # device passed through
    # each actor's runner was built once and reused for every shard it ran
    instances = set(table.column("device_uuid").to_pylist())
    assert len(instances) <= summary.actors_started < len(shards)


def test_one_slot_loads_each_pair_once(ray_local: None) -> None:
    cells = make_cells(models=("m-a", "m-b"), batch_sizes=(1, 2, 4))
    shards = make_shards(cells, {"w": SAMPLES}, "run", shard_size=4)
    # interleave the pairs: reuse must come from the scheduler, not from the input order
    shards = sorted(shards, key=lambda s: (s.shard_id[-4:], s.cell.cell_id))
    summary, written = run(shards, slots=1)
    assert summary.actors_started == 2
    per_model: dict[str, set[str]] = {}
    for table in written.values():
        for model, instance in zip(
            table.column("model").to_pylist(), table.column("device_uuid").to_pylist(), strict=True
        ):
            per_model.setdefault(model, set()).add(instance)
    assert {m: len(i) for m, i in per_model.items()} == {"m-a": 1, "m-b": 1}


def test_failures_are_retried_then_recorded_as_error_rows(ray_local: None, tmp_path: Path) -> None:
    base = make_cells(models=("m-a",), batch_sizes=(2,))
    ids = [f"{base[0].cell_id}__s{i:03d}" for i in range(4)]
    args = {
        "marker_dir": str(tmp_path),
        "fail_always": [ids[0]],
        "fail_once": [ids[1]],
        "crash_once": [ids[2]],  # the worker process dies: Ray reports the actor dead
        "drop_rows": [ids[3]],
    }
    cells = make_cells(models=("m-a",), batch_sizes=(2,), args=args)
    shards = make_shards(cells, {"w": SAMPLES}, "run", shard_size=2)
    assert [s.shard_id for s in shards][:4] == ids
    summary, written = run(shards, slots=2, max_retries=2)

    assert set(written) == {s.shard_id for s in shards}
    assert summary.failed == 1
    assert summary.retries == 2 + 1 + 1  # fail_always twice, fail_once and crash_once once

    dead = written[ids[0]].to_pylist()
    assert {r["status"] for r in dead} == {"error"}
    assert all("fake failure on" in r["error"] for r in dead)
    assert [r["sample_id"] for r in dead] == [s.id for s in shards[0].samples]
    assert all(r["cell_id"] == cells[0].cell_id and r["method"] == "pld" for r in dead)

    assert {r["status"] for r in written[ids[1]].to_pylist()} == {"ok"}
    assert {r["status"] for r in written[ids[2]].to_pylist()} == {"ok"}

    dropped = written[ids[3]].to_pylist()
    assert [r["status"] for r in dropped] == ["ok", "error"]
    assert "no row" in dropped[-1]["error"]

    got = keys_of(written)
    assert len(got) == len(set(got)) == len(SAMPLES) + 1


def test_a_pair_that_cannot_load_fails_fast(ray_local: None) -> None:
    broken = make_cells(models=("m-broken",), batch_sizes=(1,), args={"init_fail": True})
    fine = make_cells(models=("m-fine",), batch_sizes=(1,))
    shards = make_shards(broken + fine, {"w": SAMPLES}, "run", shard_size=2)
    summary, written = run(shards, slots=1, max_retries=1)
    broken_ids = {s.shard_id for s in shards if s.cell in broken}
    assert summary.failed == len(broken_ids) == 5
    # two builds of the broken pair (first try + one retry), then one for the fine pair
    assert summary.actors_started == 3
    for shard_id in broken_ids:
        rows = written[shard_id].to_pylist()
        assert {r["status"] for r in rows} == {"error"}
        assert "fake model failed to load" in rows[0]["error"]
    fine_rows = [r for i, t in written.items() if i not in broken_ids for r in t.to_pylist()]
    assert {r["status"] for r in fine_rows} == {"ok"}


# ---------------------------------------------------------------- without Ray


def test_plan_slots() -> None:
    from mmspec.orchestrator.scheduler import plan_slots

    assert plan_slots({"CPU": 16.0, "GPU": 4.0}, None, 1) == (4, True)
    assert plan_slots({"CPU": 16.0, "GPU": 4.0}, 2, 1) == (2, True)
    assert plan_slots({"CPU": 16.0}, None, 4) == (4, False)
    assert plan_slots({"CPU": 2.0}, None, 1) == (2, False)
    assert plan_slots({"CPU": 2.0}, None, 8) == (1, False)
    assert plan_slots({"CPU": 2.0}, 3, 1) == (3, False)


def test_actor_options() -> None:
    from mmspec.orchestrator.scheduler import SchedulerSettings, actor_options

    gpu = actor_options(SchedulerSettings(slots=8, use_gpu=True, threads_per_worker=4))
    assert gpu["num_gpus"] == 1 and "num_cpus" not in gpu
    cpu = actor_options(SchedulerSettings(slots=2, use_gpu=False, threads_per_worker=3))
    assert cpu["num_cpus"] == 3 and "num_gpus" not in cpu
    assert cpu["max_restarts"] == 0 and cpu["max_task_retries"] == 0


def test_worker_in_process() -> None:
    cell = make_cells(models=("m-a",), batch_sizes=(2,))[0]
    [shard] = make_shards([cell], {"w": SAMPLES[:2]}, "run", shard_size=2)
    worker = Worker(FakeRunner, cell.model, cell.method, cell.method_args, "cpu", 1)
    assert worker.pair() == pair_of(cell)
    table, telemetry = worker.run(shard)
    assert table.num_rows == 2 and telemetry is None
    other = make_cells(models=("m-b",), batch_sizes=(2,))[0]
    [foreign] = make_shards([other], {"w": SAMPLES[:2]}, "run", shard_size=2)
    with pytest.raises(ValueError, match="not for this worker"):
        worker.run(foreign)


def test_complete_table_rejects_foreign_and_duplicate_rows() -> None:
    cell = make_cells(models=("m-a",), batch_sizes=(2,))[0]
    [shard] = make_shards([cell], {"w": SAMPLES[:2]}, "run", shard_size=2)
    rows = FakeRunner(cell.model, cell.method, {}).run(shard)
    with pytest.raises(ShardResultError, match="duplicate"):
        complete_table(shard, rows_to_table([*rows, rows[0]]))
    # a worker on other code (another schema version) is refused, not handed to the store
    table = rows_to_table(rows)
    skewed = table.replace_schema_metadata({"mmspec.schema_version": "0"})
    with pytest.raises(ShardResultError, match="not this driver's result schema"):
        complete_table(shard, skewed)
    with pytest.raises(ShardResultError, match="not this driver's result schema"):
        complete_table(shard, table.drop_columns(["method_args"]))
    assert complete_table(shard, table) is table
    rows[0].sample_id = "intruder"
    with pytest.raises(ShardResultError, match="unexpected rows"):
        complete_table(shard, rows_to_table(rows))


def test_longest_expected_first(ray_local: None) -> None:
    # "x-7B" reads as a 7B model: its pair goes first, then within a pair the longest shard
    cells = make_cells(models=("m-small", "x-7B"), batch_sizes=(1,))
    shards = make_shards(cells, {"w": SAMPLES}, "run", shard_size=4)  # 4, 4(+1 turn), 2 samples
    order: list[str] = []
    summary, _ = run(shards, slots=1, order=order)
    assert summary.actors_started == 2
    big, small = cells[1].cell_id, cells[0].cell_id
    expected = [f"{c}__s{i:03d}" for c in (big, small) for i in (1, 0, 2)]
    assert order == expected


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has exited; only its parent has not reaped it


def test_idle_actors_are_released_at_once(ray_local: None, tmp_path: Path) -> None:
    args = {"marker_dir": str(tmp_path), "trace": True, "delay_s": 0.5}
    cells = make_cells(models=("m-a",), batch_sizes=(1,), args=args)
    shards = make_shards(cells, {"w": SAMPLES[:5]}, "run", shard_size=4)
    assert [len(s.samples) for s in shards] == [4, 1]
    finished: list[str] = []
    first_dead: list[bool] = []

    def on_result(shard: Shard) -> None:
        finished.append(shard.shard_id)
        if len(finished) < 2:
            return
        # the first shard's actor had no work left: it was killed while the other one ran
        [marker] = tmp_path.glob(f"start-{finished[0]}-*")
        pid = json.loads(marker.read_text())["pid"]
        deadline = time.monotonic() + 10
        while not _dead(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        first_dead.append(_dead(pid))

    summary, _ = run(shards, slots=2, on_result=on_result)
    assert summary.actors_started == 2 and first_dead == [True]


def test_a_runner_that_cannot_load_reports_our_own_errors_in_one_line() -> None:
    from mmspec.methods.draft_checkpoint import CheckpointError
    from mmspec.orchestrator.worker import RunnerInitError

    class NoHead:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise CheckpointError("no trained eagle head for target 'x'")

    class Crashes:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise KeyError("deep inside")

    cell = make_cells(models=("m-a",), batch_sizes=(2,))[0]
    [shard] = make_shards([cell], {"w": SAMPLES[:2]}, "run", shard_size=2)
    with pytest.raises(RunnerInitError) as err:
        Worker(NoHead, cell.model, cell.method, cell.method_args, "cpu", 1).run(shard)
    assert str(err.value) == "CheckpointError: no trained eagle head for target 'x'"
    with pytest.raises(RunnerInitError) as err:  # a bug keeps its traceback
        Worker(Crashes, cell.model, cell.method, cell.method_args, "cpu", 1).run(shard)
    assert "Traceback" in str(err.value) and "deep inside" in str(err.value)


WATCHDOG = {"heartbeat_s": 0.2, "poll_s": 0.2}  # readings often, so the tests run in seconds


def test_a_hung_shard_is_killed_and_retried_on_a_fresh_actor(
    ray_local: None, tmp_path: Path
) -> None:
    base = make_cells(models=("m-a",), batch_sizes=(2,))
    hung = f"{base[0].cell_id}__s001"
    args = {"marker_dir": str(tmp_path), "hang_once": [hung]}
    cells = make_cells(models=("m-a",), batch_sizes=(2,), args=args)
    shards = make_shards(cells, {"w": SAMPLES}, "run", shard_size=2)
    assert hung in {s.shard_id for s in shards}
    summary, written = run(shards, slots=2, shard_timeout_s=3.0, **WATCHDOG)
    # the hang was real: the first attempt started, and would never have ended on its own
    assert (tmp_path / f"hang-{hung}").exists()
    assert summary.retries == 1 and summary.failed == 0
    assert summary.actors_started >= 3  # the hung actor was replaced
    assert {r["status"] for t in written.values() for r in t.to_pylist()} == {"ok"}
    got = keys_of(written)
    assert len(got) == len(set(got)) == len(SAMPLES) + 1


def test_a_shard_that_always_hangs_becomes_error_rows_naming_the_timeout(
    ray_local: None, tmp_path: Path
) -> None:
    base = make_cells(models=("m-a",), batch_sizes=(4,))
    hung = f"{base[0].cell_id}__s000"
    # a fresh marker directory for every attempt: each one hangs again
    cells = make_cells(models=("m-a",), batch_sizes=(4,), args={"hang_once": [hung]})

    class AlwaysHangs(FakeRunner):
        def _first_time(self, shard: Shard, what: str) -> bool:
            return True

    from mmspec.orchestrator.scheduler import Scheduler, SchedulerSettings

    shards = make_shards(cells, {"w": SAMPLES}, "run", shard_size=4)
    written: dict[str, pa.Table] = {}
    settings = SchedulerSettings(slots=1, max_retries=1, shard_timeout_s=1.5, **WATCHDOG)
    summary = Scheduler(settings, runner_cls=AlwaysHangs).run(
        shards, lambda shard, table, _: written.__setitem__(shard.shard_id, table)
    )
    assert summary.failed == 1 and summary.retries == 1
    dead = written[hung].to_pylist()
    assert {r["status"] for r in dead} == {"error"}
    timeout = "ShardTimeoutError: the worker made no progress"
    assert all(r["error"].startswith(timeout) for r in dead)
    others = [t for sid, t in written.items() if sid != hung]
    assert {r["status"] for t in others for r in t.to_pylist()} == {"ok"}


def test_a_long_shard_that_keeps_moving_is_never_killed(ray_local: None) -> None:
    # 8 samples x 0.3 s: 2.4 s per shard, past the 1.5 s limit, but progress every 0.3 s
    cells = make_cells(models=("m-a",), batch_sizes=(1,), args={"delay_s": 0.3})
    shards = make_shards(cells, {"w": SAMPLES[:8]}, "run", shard_size=8)
    summary, written = run(shards, slots=1, shard_timeout_s=1.5, **WATCHDOG)
    assert summary.retries == 0 and summary.failed == 0 and summary.actors_started == 1
    assert {r["status"] for t in written.values() for r in t.to_pylist()} == {"ok"}


def test_a_frozen_worker_process_is_replaced(ray_local: None, tmp_path: Path) -> None:
    """SIGSTOP: the process neither answers nor dies; Ray alone would wait minutes."""
    import os
    import signal
    import threading

    base = make_cells(models=("m-a",), batch_sizes=(1,))
    target = f"{base[0].cell_id}__s000"
    args = {"marker_dir": str(tmp_path), "trace": True, "slow": {target: 30.0}}
    cells = make_cells(models=("m-a",), batch_sizes=(1,), args=args)
    shards = make_shards(cells, {"w": SAMPLES[:4]}, "run", shard_size=2)
    stopped: list[int] = []

    def freeze_the_first_worker_on_target() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not stopped:
            for marker in tmp_path.glob(f"start-{target}-*"):
                pid = json.loads(marker.read_text())["pid"]
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
                (tmp_path / "slow-done").touch()
                break
            time.sleep(0.05)

    class NotSlowTwice(FakeRunner):
        def run(self, shard: Shard) -> Any:
            if (Path(self.args["marker_dir"]) / "slow-done").exists():
                self.args = {**self.args, "slow": {}}  # the retry runs at normal speed
            return super().run(shard)

    from mmspec.orchestrator.scheduler import Scheduler, SchedulerSettings

    freezer = threading.Thread(target=freeze_the_first_worker_on_target, daemon=True)
    freezer.start()
    written: dict[str, pa.Table] = {}
    settings = SchedulerSettings(slots=1, shard_timeout_s=2.0, **WATCHDOG)
    try:
        summary = Scheduler(settings, runner_cls=NotSlowTwice).run(
            shards, lambda shard, table, _: written.__setitem__(shard.shard_id, table)
        )
    finally:
        freezer.join()
        for pid in stopped:  # never leave a stopped process behind, killed or not
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert stopped, "the worker was never frozen: the test proved nothing"
    assert summary.retries == 1 and summary.failed == 0
    assert {r["status"] for t in written.values() for r in t.to_pylist()} == {"ok"}
    assert len(keys_of(written)) == 4
