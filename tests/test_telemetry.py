"""Telemetry: NVML against the real bindings (no GPU here) and a scripted stand-in, the host
sampler for real, RAPL wraparound on a fake powercap tree, and the runner's integration."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from mmspec.orchestrator import runner as runner_module
from mmspec.orchestrator import telemetry
from mmspec.orchestrator.runner import ShardRunner
from mmspec.orchestrator.shards import Shard
from mmspec.orchestrator.telemetry import (
    SHARD_TELEMETRY_SCHEMA,
    TELEMETRY_SCHEMA,
    HostSampler,
    NvmlSampler,
    RaplCounter,
    make_sampler,
)
from mmspec.results.cells import Cell, ModelConfig
from mmspec.workloads.synthetic import synthetic_suite

TARGET_UUID = "1b2c3d4e-0000-1111-2222-333344445555"  # as torch reports it: no "GPU-"


class FakeNvml:
    """A scripted pynvml: tests set the values the next reading sees.

    The target GPU is index 2 of three, so finding it by index 0 (torch's cuda:0 under
    CUDA_VISIBLE_DEVICES) would read the wrong device's values.
    """

    NVML_SUCCESS = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_FI_DEV_POWER_INSTANT = 186
    NVML_VALUE_TYPE_UNSIGNED_INT = 1

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, instant: bool = True, counter: bool = True) -> None:
        self.uuids = [
            "GPU-aaaaaaaa-0000-0000-0000-000000000000",
            "GPU-bbbbbbbb-0000-0000-0000-000000000000",
            "GPU-" + TARGET_UUID.upper(),
        ]
        self.instant, self.counter = instant, counter
        self.inits = 0
        # per handle: scripted values (mJ, mW, bytes, %); the other GPUs read huge numbers
        self.energy_mj = [10**9, 10**9, 0]
        self.instant_mw = [999_000, 999_000, 0]
        self.average_mw = [999_000, 999_000, 0]
        self.mem_used = [10**12, 10**12, 0]
        self.util = [100, 100, 0]

    def set(self, **values: int) -> None:
        """Script the target GPU: set(energy_mj=..., instant_mw=..., mem_used=...)."""
        for name, value in values.items():
            getattr(self, name)[2] = value

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.uuids[handle]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        if not self.counter:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return self.energy_mj[handle]

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self.average_mw[handle]

    def nvmlDeviceGetFieldValues(self, handle: int, field_ids: list[int]) -> list[Any]:
        assert field_ids == [self.NVML_FI_DEV_POWER_INSTANT]
        ok = self.NVML_SUCCESS if self.instant else self.NVML_ERROR_NOT_SUPPORTED
        value = SimpleNamespace(uiVal=self.instant_mw[handle])
        return [SimpleNamespace(nvmlReturn=ok, valueType=1, value=value)]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=self.mem_used[handle], total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=self.util[handle], memory=0)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    monkeypatch.setattr(telemetry, "pynvml", fake)
    return fake


def _nvml() -> NvmlSampler:
    """An NVML sampler on the fake, not started: readings come only from mark()."""
    return NvmlSampler("cuda:0", uuid=TARGET_UUID)


def _marks(sampler: NvmlSampler, fake: FakeNvml, script: list[dict[str, int]]) -> list[float]:
    """One reading per step of the script, a few ms apart; their timestamps."""
    stamps = []
    for values in script:
        fake.set(**values)
        stamps.append(sampler.mark())
        time.sleep(0.002)
    return stamps


# ---- NVML: the real bindings without a GPU ---------------------------------------------------


def test_real_nvml_without_library_falls_back_to_host_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML is present on this host")
    assert telemetry.pynvml is pynvml  # the real module, not a stand-in
    monkeypatch.setattr(telemetry, "_nvml_missing_reported", False)
    with caplog.at_level(logging.INFO, logger=telemetry.__name__):
        first, second = make_sampler("cuda:0"), make_sampler("cuda")
    assert isinstance(first, HostSampler) and isinstance(second, HostSampler)
    said = [r for r in caplog.records if "NVML library not found" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING


def test_cpu_device_gets_the_host_sampler_without_touching_nvml(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(telemetry, "pynvml", None)  # any NVML call would raise
    assert isinstance(make_sampler("cpu"), HostSampler)


# ---- NVML: scripted values -------------------------------------------------------------------


def test_gpu_is_found_by_uuid_not_index(fake_nvml: FakeNvml) -> None:
    sampler = _nvml()
    assert sampler._handle == 2
    fake_nvml.set(mem_used=5 * 2**30, util=37)
    sampler.mark()
    row = sampler.table().to_pylist()[-1]
    assert row["mem_used_bytes"] == 5 * 2**30 and row["util_pct"] == 37.0
    assert row["rss_bytes"] > 0  # the process columns come along on a GPU worker too


def test_make_sampler_uses_nvml_when_it_initialises(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "cuda_uuid", lambda device: TARGET_UUID)
    sampler = make_sampler("cuda:0")
    assert isinstance(sampler, NvmlSampler) and sampler._handle == 2
    sampler.close()
    assert fake_nvml.inits == 0  # close() undoes its nvmlInit


def test_unknown_uuid_falls_back_to_host(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(telemetry, "cuda_uuid", lambda device: "ffffffff-no-such-gpu")
    with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
        assert isinstance(make_sampler("cuda:0"), HostSampler)
    assert "ffffffff-no-such-gpu" in caplog.text
    assert fake_nvml.inits == 0


def test_energy_between_timestamps_is_interpolated_from_the_counter(fake_nvml: FakeNvml) -> None:
    sampler = _nvml()
    fake_nvml.set(energy_mj=50_000)  # the counter counts from driver load, not from zero
    t = _marks(
        sampler,
        fake_nvml,
        [{"energy_mj": 50_000}, {"energy_mj": 52_000}, {"energy_mj": 58_000}],
    )
    assert sampler.energy_j(t[0], t[2]) == pytest.approx(8.0)
    assert sampler.energy_j(t[1], t[2]) == pytest.approx(6.0)
    mid = (t[0] + t[1]) / 2
    assert sampler.energy_j(t[0], mid) == pytest.approx(1.0)
    assert sampler.energy_j(mid, t[2]) == pytest.approx(7.0)
    assert sampler.energy_j(t[0] - 1.0, t[1]) is None  # before the first reading: unknown
    assert sampler.table().column("energy_j").to_pylist() == pytest.approx([0.0, 2.0, 8.0])


def test_split_energy_shares_each_stretch_among_rows_still_running(fake_nvml: FakeNvml) -> None:
    sampler = _nvml()
    t = _marks(
        sampler,
        fake_nvml,
        [{"energy_mj": 0}, {"energy_mj": 10_000}, {"energy_mj": 30_000}],
    )
    # rows 0 and 2 end at t1, row 1 at t2: 10 J shared by three, then 20 J for row 1 alone
    shares = sampler.split_energy(t[0], [t[1] - t[0], t[2] - t[0], t[1] - t[0]])
    assert shares == pytest.approx([10 / 3, 10 / 3 + 20, 10 / 3])
    assert sum(shares) == pytest.approx(30.0)
    assert sampler.split_energy(t[0], [t[2] - t[0]]) == pytest.approx([30.0])


def test_peak_memory_and_power_over_a_window(fake_nvml: FakeNvml) -> None:
    sampler = _nvml()
    gib = 2**30
    t = _marks(
        sampler,
        fake_nvml,
        [
            {"energy_mj": 0, "instant_mw": 100_000, "mem_used": 1 * gib},
            {"energy_mj": 1_000, "instant_mw": 300_000, "mem_used": 3 * gib},
            {"energy_mj": 2_000, "instant_mw": 200_000, "mem_used": 2 * gib},
            {"energy_mj": 3_000, "instant_mw": 150_000, "mem_used": 1 * gib},
        ],
    )
    assert sampler.peak_memory_bytes(t[0], t[3]) == 3 * gib
    assert sampler.peak_power_w(t[0], t[3]) == pytest.approx(300.0)
    assert sampler.peak_memory_bytes(t[2], t[3]) == 2 * gib
    assert sampler.peak_power_w(t[2], t[3]) == pytest.approx(200.0)
    # with a counter, mean power is energy over time
    assert sampler.mean_power_w(t[0], t[3]) == pytest.approx(3.0 / (t[3] - t[0]))
    stats = sampler.stats(t[0], t[3])
    assert stats.energy_j == pytest.approx(3.0) and stats.peak_memory_bytes == 3 * gib


def test_mean_power_without_counter_averages_the_readings(
    fake_nvml: FakeNvml,
) -> None:
    fake_nvml.counter = False
    sampler = _nvml()
    t = _marks(sampler, fake_nvml, [{"instant_mw": w} for w in (100_000, 300_000, 200_000)])
    assert sampler.energy_j(t[0], t[2]) is None
    assert sampler.split_energy(t[0], [t[2] - t[0]]) == [None]
    assert sampler.mean_power_w(t[0], t[2]) == pytest.approx(200.0)


def test_power_prefers_the_instant_field(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(instant_mw=123_456, average_mw=100_000)
    sampler = _nvml()
    sampler.mark()
    assert sampler.table().column("power_w")[-1].as_py() == pytest.approx(123.456)


@pytest.mark.parametrize("why", ["driver says not supported", "bindings lack the field"])
def test_power_falls_back_to_the_average(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    if why == "driver says not supported":
        fake_nvml.instant = False
    else:
        monkeypatch.delattr(FakeNvml, "NVML_FI_DEV_POWER_INSTANT")
    fake_nvml.set(instant_mw=123_456, average_mw=100_000)
    sampler = _nvml()
    sampler.mark()
    assert sampler.table().column("power_w")[-1].as_py() == pytest.approx(100.0)


def test_thread_samples_at_the_configured_rate(fake_nvml: FakeNvml) -> None:
    with pytest.raises(ValueError, match="10-50 Hz"):
        NvmlSampler("cuda:0", hz=200, uuid=TARGET_UUID)
    sampler = NvmlSampler("cuda:0", hz=50, uuid=TARGET_UUID)
    sampler.start()
    time.sleep(0.3)
    sampler.close()
    n = sampler.table().num_rows
    assert 8 <= n <= 25  # ~15 ticks, plus the start and stop readings
    ts = sampler.table().column("ts").to_pylist()
    assert ts == sorted(ts)
    assert not sampler._thread and fake_nvml.inits == 0
    count = sampler.table().num_rows
    time.sleep(0.05)
    assert sampler.table().num_rows == count  # stopped means stopped


def test_discard_before_keeps_the_window_covered(fake_nvml: FakeNvml) -> None:
    sampler = _nvml()
    t = _marks(sampler, fake_nvml, [{"energy_mj": e} for e in (0, 1_000, 2_000, 3_000)])
    sampler.discard_before((t[1] + t[2]) / 2)
    assert sampler.table().num_rows == 3  # t[1] stays: it covers the window's start
    assert sampler.energy_j((t[1] + t[2]) / 2, t[3]) == pytest.approx(1.5)


# ---- host ------------------------------------------------------------------------------------


def test_host_sampler_for_real() -> None:
    sampler = HostSampler(hz=50)
    sampler.start()
    t0 = sampler.mark()
    ballast = bytearray(64 * 2**20)  # RSS must see it
    deadline = time.perf_counter() + 0.25
    while time.perf_counter() < deadline:  # keep a core busy so CPU % has something to say
        sum(range(1000))
    t1 = sampler.mark()
    sampler.close()
    table = sampler.table()
    assert table.schema == TELEMETRY_SCHEMA and table.num_rows >= 5
    assert min(table.column("rss_bytes").to_pylist()) > 0
    assert sampler.peak_memory_bytes(t0, t1) >= len(ballast)
    cpu = [v for v in table.column("cpu_pct").to_pylist() if v is not None]
    assert cpu and max(cpu) > 0
    assert any(v is not None for v in table.column("util_pct").to_pylist())
    assert table.column("mem_used_bytes").null_count == table.num_rows
    readable = RaplCounter.open() is not None
    if readable:
        assert sampler.energy_j(t0, t1) is not None and sampler.energy_j(t0, t1) >= 0
    else:
        assert sampler.energy_j(t0, t1) is None
        assert table.column("energy_j").null_count == table.num_rows


def _zone(root: Path, name: str, kind: str, energy: int, max_range: int) -> Path:
    zone = root / name
    zone.mkdir()
    (zone / "name").write_text(kind + "\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone / "energy_uj"


def test_rapl_sums_packages_and_unwraps_the_counter(tmp_path: Path) -> None:
    pkg0 = _zone(tmp_path, "intel-rapl:0", "package-0", 900_000, 1_000_000)
    pkg1 = _zone(tmp_path, "intel-rapl:1", "package-1", 5_000, 1_000_000)
    core = _zone(tmp_path, "intel-rapl:0:0", "core", 0, 1_000_000)  # inside package 0
    psys = _zone(tmp_path, "intel-rapl:2", "psys", 0, 1_000_000)  # overlaps the packages
    rapl = RaplCounter.open(tmp_path)
    assert rapl is not None
    pkg0.write_text("100000\n")  # wrapped: 100 000 µJ to the top, 100 000 past zero
    pkg1.write_text("15000\n")
    core.write_text("999999\n")
    psys.write_text("999999\n")
    assert rapl.read_j() == pytest.approx(0.21)
    pkg0.write_text("400000\n")
    assert rapl.read_j() == pytest.approx(0.51)


def test_rapl_unreadable_is_none(tmp_path: Path) -> None:
    assert RaplCounter.open(tmp_path / "missing") is None
    (tmp_path / "intel-rapl:0").mkdir()  # a zone without readable counters
    assert RaplCounter.open(tmp_path) is None


def test_host_sampler_energy_and_power_from_rapl(tmp_path: Path) -> None:
    energy = _zone(tmp_path, "intel-rapl:0", "package-0", 0, 10**12)
    sampler = HostSampler(powercap=tmp_path)
    t0 = sampler.mark()
    time.sleep(0.01)
    energy.write_text(f"{2 * 10**6}\n")  # 2 J
    t1 = sampler.mark()
    assert sampler.energy_j(t0, t1) == pytest.approx(2.0)
    power = sampler.table().column("power_w").to_pylist()
    assert power[0] is None and power[1] == pytest.approx(2.0 / (t1 - t0))


# ---- runner ----------------------------------------------------------------------------------


def _shard(runner: ShardRunner, shard_id: str) -> Shard:
    samples = tuple(synthetic_suite(per_topic=1, seed=0)[:3])
    cell = Cell("c0", runner.model_config, "ar", {}, 2, 0.0, 0, 0, 8, "synthetic")
    return Shard("run", shard_id, cell, samples)


def test_runner_records_telemetry_per_shard() -> None:
    runner = ShardRunner(ModelConfig("tiny-llava"), "ar", {}, threads=1)
    try:
        rows = runner.run(_shard(runner, "s0"))
        ok = [r for r in rows if r.status == "ok"]
        assert ok and all(r.peak_mem_bytes and r.peak_mem_bytes > 0 for r in ok)
        table = runner.last_telemetry
        assert table is not None and table.schema == SHARD_TELEMETRY_SCHEMA
        assert table.num_rows >= 2  # at least the shard's start and end
        assert set(table.column("shard_id").to_pylist()) == {"s0"}
        assert set(table.column("cell_id").to_pylist()) == {"c0"}
        assert set(table.column("host").to_pylist()) == {ok[0].host}
        assert runner.last_stats is not None and runner.last_stats.peak_memory_bytes > 0
        runner.run(_shard(runner, "s1"))
        assert set(runner.last_telemetry.column("shard_id").to_pylist()) == {"s1"}
    finally:
        runner.close()
    assert runner._sampler._thread is None


def test_runner_splits_batch_energy_across_rows(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU drawing a steady 100 W: a batch's row energies add up to 100 W x its last row's
    end, and each row gets at least its equal share of the time all rows ran together."""
    start = time.perf_counter()
    fake_nvml.energy_mj = _Clock(start, 100_000)  # 100 W = 100 000 mJ per second
    monkeypatch.setattr(
        runner_module, "make_sampler", lambda device, hz: NvmlSampler(device, hz, TARGET_UUID)
    )
    runner = ShardRunner(ModelConfig("tiny-llava"), "ar", {}, threads=1)
    try:
        rows = [r for r in runner.run(_shard(runner, "s0")) if r.status == "ok"]
    finally:
        runner.close()
    for batch in {r.batch_index for r in rows}:
        batch_rows = [r for r in rows if r.batch_index == batch]
        total = sum(r.energy_j for r in batch_rows)
        assert total == pytest.approx(100.0 * max(r.total_s for r in batch_rows), rel=0.05)
        first_end = min(r.total_s for r in batch_rows)
        for r in batch_rows:
            assert r.energy_j >= 100.0 * first_end / len(batch_rows) * 0.95
    # the shard also pays for image loading and decoding between batches (1 mJ: int rounding)
    assert runner.last_stats.energy_j >= sum(r.energy_j for r in rows) - 1e-3


class _Clock:
    """A list-like energy counter per handle: the target's reads mJ from the wall clock."""

    def __init__(self, start: float, mw: int) -> None:
        self.start, self.mw = start, mw

    def __getitem__(self, handle: int) -> int:
        return int((time.perf_counter() - self.start) * self.mw) if handle == 2 else 10**9
