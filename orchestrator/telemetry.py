"""Telemetry: a sampler thread per worker recording power, energy and memory as a time series.

Two samplers share one interface and one Arrow schema:
  NvmlSampler  the worker's GPU through NVML (nvidia-ml-py): power, the total energy counter,
               memory used, utilisation; plus the process's CPU % and RSS.
  HostSampler  the host through psutil (process CPU %, RSS, system CPU %) and RAPL package
               energy from /sys/class/powercap where readable.

Every reading is stamped with `time.perf_counter()`, the clock the engine times rows with, so a
row's window (batch start -> batch start + total_s) can be looked up directly.

Example:
    >>> sampler = make_sampler("cpu", hz=20)
    >>> sampler.start()
    >>> t0 = sampler.mark(); work(); t1 = sampler.mark()
    >>> sampler.energy_j(t0, t1), sampler.peak_memory_bytes(t0, t1)
    >>> sampler.close()
"""

from __future__ import annotations

import bisect
import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pyarrow as pa
import pynvml
import torch

log = logging.getLogger(__name__)

DEFAULT_HZ = 20.0
MIN_HZ, MAX_HZ = 10.0, 50.0
POWERCAP_ROOT = Path("/sys/class/powercap")
TELEMETRY_SCHEMA_VERSION = 1

TELEMETRY_SCHEMA = pa.schema(
    [
        # time.perf_counter() of the worker process: aligns with row timings on that worker only
        pa.field("ts", pa.float64(), nullable=False),
        pa.field("wall_time", pa.float64(), nullable=False),  # time.time(): aligns across hosts
        pa.field("power_w", pa.float64()),  # GPU board power; host: RAPL package power
        pa.field("energy_j", pa.float64()),  # cumulative since the sampler's first reading
        pa.field("mem_used_bytes", pa.int64()),  # GPU memory used (all processes); null on host
        pa.field("util_pct", pa.float64()),  # GPU utilisation; host: system-wide CPU %
        pa.field("cpu_pct", pa.float64()),  # this process, may exceed 100 with several threads
        pa.field("rss_bytes", pa.int64()),  # this process's resident set
    ],
    metadata={"mmspec.telemetry_schema_version": str(TELEMETRY_SCHEMA_VERSION)},
)

# the per-shard slice a worker hands over: the series plus where it was measured
SHARD_TELEMETRY_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("host", pa.string()),
        pa.field("device_uuid", pa.string()),
        *TELEMETRY_SCHEMA,
    ],
    metadata=TELEMETRY_SCHEMA.metadata,
)

# NVML's library-not-found is the normal state of a CPU host: say it once per process, not per
# worker runner
_nvml_missing_reported = False


@dataclass(slots=True)
class Reading:
    """One sample of every source; field order and names match TELEMETRY_SCHEMA."""

    ts: float
    wall_time: float
    power_w: float | None = None
    energy_j: float | None = None
    mem_used_bytes: int | None = None
    util_pct: float | None = None
    cpu_pct: float | None = None
    rss_bytes: int | None = None


assert [f.name for f in fields(Reading)] == TELEMETRY_SCHEMA.names


@dataclass(frozen=True)
class WindowStats:
    """Telemetry of one time window (a shard, a batch)."""

    t0: float  # perf_counter seconds
    t1: float
    energy_j: float | None  # None without an energy counter
    mean_power_w: float | None
    peak_power_w: float | None
    peak_memory_bytes: int | None


class Sampler(ABC):
    """A background thread taking a `Reading` `hz` times a second; queries by time window.

    Window queries (`energy_j`, `peak_power_w`, ...) use the readings that cover the window: the
    last at or before t0 through the first at or after t1, so a window shorter than the sampling
    period still has values. A query whose window ends after the newest reading takes a reading
    first, so a window that just closed is always covered.
    """

    kind: ClassVar[str]
    _memory_column: ClassVar[str]  # the column peak_memory_bytes reads

    def __init__(self, hz: float = DEFAULT_HZ) -> None:
        if not MIN_HZ <= hz <= MAX_HZ:
            raise ValueError(f"sampling rate must be {MIN_HZ:g}-{MAX_HZ:g} Hz, got {hz}")
        self.hz = hz
        # readings in time order; _ts mirrors their ts for bisect
        self._readings: list[Reading] = []
        self._ts: list[float] = []
        # the thread and mark() both read: sources are stateful (counter wrap, CPU % deltas)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._read_failure_logged = False  # a failing source logs once, not 20 times a second

    # ---- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Take a first reading and start the sampling thread (no-op if running)."""
        if self._thread is not None or self._closed:
            return
        self.mark()
        self._stop_event.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"mmspec-{self.kind}-sampler", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and take a last reading; the recorded series stays queryable."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop_event.set()
        # bounded: at interpreter exit (a __del__) a daemon thread may never be scheduled again
        thread.join(timeout=1.0 + 2.0 / self.hz)
        self.mark()

    def close(self) -> None:
        """Stop and release the sources; no reading can be taken afterwards."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        self._release()

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mark(self) -> float:
        """Take a reading now and return its timestamp (perf_counter seconds)."""
        if self._closed:
            return time.perf_counter()
        with self._lock:
            try:
                reading = self._read()
            except Exception:  # a flaky source must not stop the series or the run
                if not self._read_failure_logged:
                    log.warning("%s sampler: reading failed", self.kind, exc_info=True)
                    self._read_failure_logged = True
                return time.perf_counter()
            self._readings.append(reading)
            self._ts.append(reading.ts)
            return reading.ts

    def discard_before(self, t: float) -> None:
        """Drop readings older than t, keeping the last one before it so t stays covered."""
        with self._lock:
            keep = max(0, bisect.bisect_right(self._ts, t) - 1)
            del self._readings[:keep], self._ts[:keep]

    # ---- queries -------------------------------------------------------------------------
    def energy_j(self, t0: float, t1: float) -> float | None:
        """Joules between t0 and t1 from the energy counter, interpolated linearly between
        readings; None without a counter or when the window is not covered."""
        window = [(r.ts, r.energy_j) for r in self._window(t0, t1) if r.energy_j is not None]
        e0, e1 = _interpolate(window, t0), _interpolate(window, t1)
        if e0 is None or e1 is None:
            return None
        return max(0.0, e1 - e0)

    def mean_power_w(self, t0: float, t1: float) -> float | None:
        """Energy / time where there is a counter, else the mean of the power readings."""
        energy = self.energy_j(t0, t1)
        if energy is not None and t1 > t0:
            return energy / (t1 - t0)
        powers = [r.power_w for r in self._window(t0, t1) if r.power_w is not None]
        return sum(powers) / len(powers) if powers else None

    def peak_power_w(self, t0: float, t1: float) -> float | None:
        return _max(r.power_w for r in self._window(t0, t1))

    def peak_memory_bytes(self, t0: float, t1: float) -> int | None:
        """GPU memory used (NVML) or the process's RSS (host), highest reading in the window."""
        return _max(getattr(r, self._memory_column) for r in self._window(t0, t1))

    def stats(self, t0: float, t1: float) -> WindowStats:
        return WindowStats(
            t0,
            t1,
            self.energy_j(t0, t1),
            self.mean_power_w(t0, t1),
            self.peak_power_w(t0, t1),
            self.peak_memory_bytes(t0, t1),
        )

    def split_energy(self, t0: float, durations: Sequence[float]) -> list[float | None]:
        """Each row's share of a batch's energy; durations[i] is row i's t0 -> end (total_s).

        The rows still running share each stretch between two row ends equally, so the shares
        add up to the batch's energy up to its last row's end, and a batch of one gets its
        whole window. All None when there is no counter.
        """
        ends = sorted(set(durations))
        shares: dict[float, float] = {}
        acc, prev_e = 0.0, 0.0
        for end in ends:
            cumulative = self.energy_j(t0, t0 + end) if end > 0 else 0.0
            if cumulative is None:
                return [None] * len(durations)
            live = sum(1 for d in durations if d >= end)
            acc += max(0.0, cumulative - prev_e) / live
            shares[end], prev_e = acc, cumulative
        return [shares[d] for d in durations]

    def table(self, t0: float | None = None, t1: float | None = None) -> pa.Table:
        """The readings with t0 <= ts <= t1 (all by default) as a TELEMETRY_SCHEMA table."""
        with self._lock:
            lo = 0 if t0 is None else bisect.bisect_left(self._ts, t0)
            hi = len(self._ts) if t1 is None else bisect.bisect_right(self._ts, t1)
            readings = self._readings[lo:hi]
        columns = {name: [getattr(r, name) for r in readings] for name in TELEMETRY_SCHEMA.names}
        return pa.Table.from_pydict(columns, schema=TELEMETRY_SCHEMA)

    # ---- internals -----------------------------------------------------------------------
    @abstractmethod
    def _read(self) -> Reading:
        """One reading of every source (called under the lock)."""

    def _release(self) -> None:
        """Release the sources (the NVML handle)."""
        return None  # the host's sources need no release

    def _loop(self) -> None:
        period = 1.0 / self.hz
        next_t = time.perf_counter() + period
        while not self._stop_event.wait(max(0.0, next_t - time.perf_counter())):
            self.mark()
            # after a stall (a suspended process) skip the missed ticks instead of bursting
            next_t = max(next_t + period, time.perf_counter())

    def _window(self, t0: float, t1: float) -> list[Reading]:
        """Readings covering [t0, t1]; takes a reading first if the newest is older than t1."""
        if not self._ts or self._ts[-1] < t1:
            self.mark()
        with self._lock:
            if not self._ts:
                return []
            lo = max(0, bisect.bisect_right(self._ts, t0) - 1)
            hi = bisect.bisect_left(self._ts, t1)
            return self._readings[lo : hi + 1]


# ---- NVML ----------------------------------------------------------------------------------
class NvmlSampler(Sampler):
    """A GPU through NVML, found by UUID: NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES, so
    torch's cuda:0 may be NVML's index 3.

    Power prefers the instantaneous field (NVML_FI_DEV_POWER_INSTANT) where the driver has it:
    nvmlDeviceGetPowerUsage is a 1 s average on recent GPUs and smears short batches.
    """

    kind = "nvml"
    _memory_column = "mem_used_bytes"

    def __init__(
        self, device: torch.device | str = "cuda", hz: float = DEFAULT_HZ, uuid: str | None = None
    ) -> None:
        """Args:
        device: the torch CUDA device whose GPU to sample.
        uuid: the GPU's UUID, when known; by default torch's for `device`.
        Raises pynvml.NVMLError when NVML does not initialise, LookupError when no GPU matches.
        """
        super().__init__(hz)
        pynvml.nvmlInit()
        try:
            self.uuid = uuid or cuda_uuid(device)
            self._handle = _nvml_handle(self.uuid)
        except BaseException:
            pynvml.nvmlShutdown()
            raise
        self._proc = _ProcessProbe()
        self._instant_field = self._probe_instant_field()
        self._avg_power = _nvml_try(pynvml.nvmlDeviceGetPowerUsage, self._handle) is not None
        # counter value at the first reading (mJ); the series counts from there
        self._energy0_mj: int | None = None
        self._has_counter = (
            _nvml_try(pynvml.nvmlDeviceGetTotalEnergyConsumption, self._handle) is not None
        )
        if not self._has_counter:
            log.info("GPU %s has no NVML energy counter; energy will be null", self.uuid)

    def _read(self) -> Reading:
        ts, wall = time.perf_counter(), time.time()
        energy = None
        if self._has_counter:
            mj = _nvml_try(pynvml.nvmlDeviceGetTotalEnergyConsumption, self._handle)
            if mj is not None:
                if self._energy0_mj is None:
                    self._energy0_mj = mj
                energy = (mj - self._energy0_mj) / 1000.0
        mem = _nvml_try(pynvml.nvmlDeviceGetMemoryInfo, self._handle)
        util = _nvml_try(pynvml.nvmlDeviceGetUtilizationRates, self._handle)
        cpu, rss = self._proc.sample()
        return Reading(
            ts=ts,
            wall_time=wall,
            power_w=self._power_w(),
            energy_j=energy,
            mem_used_bytes=None if mem is None else int(mem.used),
            util_pct=None if util is None else float(util.gpu),
            cpu_pct=cpu,
            rss_bytes=rss,
        )

    def _power_w(self) -> float | None:
        if self._instant_field is not None:
            values = _nvml_try(pynvml.nvmlDeviceGetFieldValues, self._handle, [self._instant_field])
            mw = None if values is None else _field_value(values)
            if mw is not None:
                return mw / 1000.0
        if self._avg_power:
            mw = _nvml_try(pynvml.nvmlDeviceGetPowerUsage, self._handle)
            return None if mw is None else mw / 1000.0
        return None

    def _probe_instant_field(self) -> int | None:
        field_id = getattr(pynvml, "NVML_FI_DEV_POWER_INSTANT", None)  # absent in old bindings
        if field_id is None:
            return None
        values = _nvml_try(pynvml.nvmlDeviceGetFieldValues, self._handle, [field_id])
        return field_id if values is not None and _field_value(values) is not None else None

    def _release(self) -> None:
        pynvml.nvmlShutdown()  # NVML counts inits; this undoes ours only


def cuda_uuid(device: torch.device | str) -> str:
    """The UUID torch reports for a CUDA device (hex, no "GPU-" prefix)."""
    return str(torch.cuda.get_device_properties(torch.device(device)).uuid)


def _normalise_uuid(uuid: str | bytes) -> str:
    # NVML says "GPU-<hex>", torch says "<hex>"
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    text = text.strip().lower()
    return text.removeprefix("gpu-")


def _nvml_handle(uuid: str) -> Any:
    want = _normalise_uuid(uuid)
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        if _normalise_uuid(pynvml.nvmlDeviceGetUUID(handle)) == want:
            return handle
    raise LookupError(f"no NVML device has UUID {uuid}")


def _nvml_try(fn: Any, *args: Any) -> Any:
    """fn(*args), or None where NVML says the GPU or driver cannot (not supported, lost)."""
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


_FIELD_MEMBERS = {  # c_nvmlValue_t union member per NVML_VALUE_TYPE_*
    0: "dVal",
    1: "uiVal",
    2: "ulVal",
    3: "ullVal",
    4: "sllVal",
    5: "siVal",
    6: "usVal",
}


def _field_value(values: Any) -> float | None:
    """The first field value's number, None when NVML returned an error for it."""
    value = values[0]
    if value.nvmlReturn != pynvml.NVML_SUCCESS:
        return None
    member = _FIELD_MEMBERS.get(int(value.valueType))
    return None if member is None else float(getattr(value.value, member))


# ---- host ----------------------------------------------------------------------------------
class HostSampler(Sampler):
    """The host: this process's CPU % and RSS, system CPU %, RAPL package energy if readable."""

    kind = "host"
    _memory_column = "rss_bytes"

    def __init__(self, hz: float = DEFAULT_HZ, powercap: Path | str = POWERCAP_ROOT) -> None:
        super().__init__(hz)
        self._proc = _ProcessProbe()
        # system CPU % from our own deltas: psutil.cpu_percent keeps its baseline per thread, and
        # readings come from two threads
        self._cpu_times = _busy_total(psutil.cpu_times())
        self.rapl = RaplCounter.open(Path(powercap))  # None where /sys/class/powercap is closed
        self._prev: tuple[float, float] | None = None  # (ts, J) of the last reading, for power

    def _read(self) -> Reading:
        ts, wall = time.perf_counter(), time.time()
        energy = power = None
        if self.rapl is not None:
            energy = self.rapl.read_j()
            if self._prev is not None and ts > self._prev[0]:
                power = (energy - self._prev[1]) / (ts - self._prev[0])
            self._prev = (ts, energy)
        cpu, rss = self._proc.sample()
        busy, total = _busy_total(psutil.cpu_times())
        d_busy, d_total = busy - self._cpu_times[0], total - self._cpu_times[1]
        self._cpu_times = (busy, total)
        return Reading(
            ts=ts,
            wall_time=wall,
            power_w=power,
            energy_j=energy,
            util_pct=_percent(d_busy, d_total),
            cpu_pct=cpu,
            rss_bytes=rss,
        )


def _busy_total(times: Any) -> tuple[float, float]:
    """(busy, total) CPU seconds over all cores; guest time is already inside user time."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


def _percent(part: float, whole: float) -> float | None:
    # clamped: float sums of jiffies leave +-1e-9 where the CPU was idle
    return round(min(100.0, max(0.0, 100.0 * part / whole)), 2) if whole > 0 else None


@dataclass
class _RaplZone:
    energy_file: Path
    max_uj: int  # the counter wraps to 0 past max_energy_range_uj
    last_uj: int


# top-level zones are packages (and psys); intel-rapl:N:M are parts of package N
_PACKAGE_ZONE = re.compile(r"intel-rapl:\d+")


class RaplCounter:
    """Package energy from powercap's µJ counters, summed over packages and unwrapped, in J."""

    def __init__(self, zones: list[_RaplZone]) -> None:
        self._zones = zones
        self._total_uj = 0

    @classmethod
    def open(cls, root: Path = POWERCAP_ROOT) -> RaplCounter | None:
        """The counter over every readable package zone under root; None if there is none
        (no powercap, or energy_uj root-only as on kernels since 5.10)."""
        zones = []
        for zone in sorted(root.glob("intel-rapl:*")):
            if not _PACKAGE_ZONE.fullmatch(zone.name):
                continue
            try:
                name_file = zone / "name"
                if name_file.is_file() and name_file.read_text().strip() == "psys":
                    continue  # the platform zone includes the packages: counting both doubles
                max_uj = int((zone / "max_energy_range_uj").read_text())
                now = int((zone / "energy_uj").read_text())
            except (OSError, ValueError):
                continue
            zones.append(_RaplZone(zone / "energy_uj", max_uj, now))
        return cls(zones) if zones else None

    def read_j(self) -> float:
        """Joules since the counter was opened."""
        for zone in self._zones:
            now = int(zone.energy_file.read_text())
            delta = now - zone.last_uj
            if delta < 0:  # wrapped; at 20 Hz it cannot wrap twice between readings
                delta += zone.max_uj
            self._total_uj += delta
            zone.last_uj = now
        return self._total_uj / 1e6


class _ProcessProbe:
    """This process's CPU % (since the previous call) and RSS."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # prime: the first call has no interval

    def sample(self) -> tuple[float | None, int | None]:
        try:
            with self._proc.oneshot():
                return self._proc.cpu_percent(None), int(self._proc.memory_info().rss)
        except psutil.Error:
            return None, None


# ---- choosing and labelling ----------------------------------------------------------------
def make_sampler(device: torch.device | str, hz: float = DEFAULT_HZ) -> Sampler:
    """NVML for a CUDA device whose NVML initialises, else the host sampler (not started)."""
    global _nvml_missing_reported
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return NvmlSampler(dev, hz)
        except pynvml.NVMLError as exc:
            if getattr(exc, "value", None) != pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
                log.warning("NVML failed for %s (%s); sampling the host instead", dev, exc)
            elif not _nvml_missing_reported:
                _nvml_missing_reported = True
                log.warning("NVML library not found; sampling the host instead of the GPU")
        except (LookupError, RuntimeError) as exc:  # e.g. a MIG slice: not a whole GPU's UUID
            log.warning("no NVML device for %s (%s); sampling the host instead", dev, exc)
    return HostSampler(hz)


def shard_table(
    table: pa.Table, shard_id: str, cell_id: str, host: str | None, device_uuid: str | None
) -> pa.Table:
    """A sampler's table labelled with where it was measured, as SHARD_TELEMETRY_SCHEMA."""
    n = table.num_rows
    labels = {"shard_id": shard_id, "cell_id": cell_id, "host": host, "device_uuid": device_uuid}
    columns = {name: pa.array([v] * n, pa.string()) for name, v in labels.items()}
    columns |= {name: table.column(name) for name in TELEMETRY_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=SHARD_TELEMETRY_SCHEMA)


def _interpolate(points: list[tuple[float, float]], t: float) -> float | None:
    """Value at t on the line through time-ordered (ts, value) points; None outside them."""
    if not points or t < points[0][0] or t > points[-1][0]:
        return None
    k = bisect.bisect_left([p[0] for p in points], t)
    t1, v1 = points[k]
    if t1 == t or k == 0:
        return v1
    t0, v0 = points[k - 1]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def _max(values: Any) -> Any:
    present = [v for v in values if v is not None]
    return max(present) if present else None
