"""Compare two runs of the same grid cell by cell and decide whether NEW regressed against BASE.

A cell is (model, method, batch_size, temperature, topic), with the pooled "all" topic too. A
method is matched by what ran: its registered method and the arguments it ran with, defaults
included (results/variants.py), whatever each run named it; so a variant renamed between runs
still lines up, and a changed default (or setting) makes a new cell, not a regression. Where
either run did not record arguments (a run from before variants, an imported run), methods are
matched by name.
Per cell and metric (speedup, MAT, tokens/s, latency p50/p90/p99, energy per token):

- the point estimate on each side and their ratio NEW / BASE;
- an interval of that ratio, normal on its log: log(NEW / BASE) +- z * sqrt(se_b^2 + se_n^2),
  where se is the standard error of a side's log statistic. Below 500 rows a side's se is
  bootstrapped: its rows are resampled (pairs of method and `ar` rows stay together for
  speedup), seeded per cell and metric, so a rerun prints the same numbers. From 500 rows on
  it is closed-form (delta method for ratios of sums, binomial ranks for percentiles): the
  two agree there (the rank-based p99 is the wider, the safe side), and a bootstrap of a
  million rows would take minutes;
- z is Bonferroni-adjusted over the m (cell, metric) pairs tested: every interval is at level
  1 - (1 - confidence) / m, so a comparison of two runs of the same code raises a false alarm
  with probability at most 1 - confidence (5%), however many cells the grid has;
- a verdict: a **regression** is a change worse than the relative threshold (default 5%)
  *and* significant (the interval lies wholly on the worse side of 1). A cell with fewer than
  `min_samples` rows on either side is "insufficient data", never a regression.

Hard failures need no statistics: any greedy output of NEW that differs from `ar`'s on the
same (sample, turn, repeat) key (a missing hash counts as different), any cell of NEW with
more error rows than BASE, and (unless allowed) a (model, method, batch size, temperature)
of BASE that NEW lacks altogether, as when every shard of a method failed. Any of them fails
the comparison whatever the timings say.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import polars as pl

from mmspec.reports.answer_import import source_format
from mmspec.reports.formatting import DASH, num, signed_pct, transition
from mmspec.reports.markdown import markdown_table
from mmspec.reports.metrics import ALL_TOPIC, GROUP_KEYS, SETTING_COLUMNS, load_rows, static_rows
from mmspec.reports.paired import BASELINE, SAME_WORK
from mmspec.results.environment import Environment, software
from mmspec.results.layout import manifest_or_empty

DEFAULT_THRESHOLD = 0.05
DEFAULT_MIN_SAMPLES = 10
DEFAULT_RESAMPLES = 1000
# From this many rows on, a side's standard error is closed-form instead of bootstrapped.
ANALYTIC_MIN_ROWS = 500
DEFAULT_CONFIDENCE = 0.95

# Verdicts of one metric in one cell.
REGRESSION = "regression"
IMPROVEMENT = "improvement"
UNCHANGED = "ok"
INSUFFICIENT = "insufficient data"
NOT_APPLICABLE = "n/a"

# A cell without its topic: the unit of the hard checks (errors and lossless are not per topic).
RUN_CELL_KEYS = GROUP_KEYS[:-1]
# Bootstrap draws are generated in blocks of at most this many indices, so a cell with many
# rows does not need a (resamples x rows) matrix in memory at once.
_MAX_DRAWS = 4_000_000
_COLUMNS = [
    *GROUP_KEYS,
    *SETTING_COLUMNS,
    "workload",
    "sample_id",
    "turn",
    "repeat",
    "status",
    "total_s",
    "new_tokens",
    "steps",
    "accepted_tokens",
    "energy_j",
    "output_sha256",
]


@dataclass(frozen=True, order=True)
class CellKey:
    """One cell of a run: what a row of the report's tables describes, as runs are matched.

    `method` and `setting` are the registered method and its resolved arguments (canonical
    JSON), or the method's name and "" where arguments are not compared (see the module doc);
    `name` is what the run calls it, for display.
    """

    model: str
    method: str
    batch_size: int
    temperature: float
    topic: str
    setting: str = ""
    name: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        return self.name or self.method

    def sort_key(self) -> tuple[Any, ...]:
        # "all" sorts after real topics, as in the report.
        return (
            self.model,
            self.method,
            self.setting,
            self.batch_size,
            self.temperature,
            self.topic == ALL_TOPIC,
            self.topic,
        )

    def describe(self) -> str:
        topic = "" if self.topic == ALL_TOPIC else f", {self.topic}"
        return (
            f"{self.label} on {self.model} (batch size {self.batch_size}, "
            f"T={self.temperature:g}{topic})"
        )


@dataclass(frozen=True)
class MetricChange:
    """One metric of one cell, BASE vs NEW."""

    metric: MetricSpec
    base: float | None
    new: float | None
    n_base: int
    n_new: int
    ratio: float | None  # new / base
    ci_low: float | None  # confidence interval of the ratio
    ci_high: float | None
    verdict: str

    @property
    def change(self) -> float | None:
        """Relative change NEW vs BASE (-0.2 = 20% lower)."""
        return None if self.ratio is None else self.ratio - 1.0


@dataclass(frozen=True)
class CellComparison:
    key: CellKey
    changes: tuple[MetricChange, ...]

    @property
    def regressions(self) -> list[MetricChange]:
        return [c for c in self.changes if c.verdict == REGRESSION]

    @property
    def verdict(self) -> str:
        verdicts = {c.verdict for c in self.changes}
        for verdict in (REGRESSION, INSUFFICIENT, IMPROVEMENT, UNCHANGED):
            if verdict in verdicts:
                return verdict
        return NOT_APPLICABLE


@dataclass(frozen=True)
class HardFailure:
    """A failure of NEW that no threshold excuses: a lossless mismatch or more error rows."""

    kind: str  # "lossless" | "errors" | "missing"
    key: CellKey  # topic "all": these checks are per run cell
    detail: str


@dataclass
class Comparison:
    """Everything `compare` decided; `render_comparison` turns it into Markdown."""

    base: dict[str, Any]  # run labels: run_id, git_sha, host, started_at, path
    new: dict[str, Any]
    threshold: float
    min_samples: int
    confidence: float
    resamples: int
    seed: int
    tests: int = 0  # (cell, metric) pairs tested: the Bonferroni family
    settings_note: str = ""  # set when methods had to be matched by name (see _load_runs)
    cells: list[CellComparison] = field(default_factory=list)
    hard_failures: list[HardFailure] = field(default_factory=list)
    only_base: list[CellKey] = field(default_factory=list)
    only_new: list[CellKey] = field(default_factory=list)

    @property
    def regressions(self) -> list[tuple[CellKey, MetricChange]]:
        return [(c.key, m) for c in self.cells for m in c.regressions]

    @property
    def failed(self) -> bool:
        """True when `compare` must exit non-zero."""
        return bool(self.hard_failures or self.regressions)


# ----------------------------------------------------------------------------- statistics


_Z95 = NormalDist().inv_cdf(0.975)


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return num.sum(axis=-1) / den.sum(axis=-1)


def _ratio_of_sums_se(num: np.ndarray, den: np.ndarray) -> float:
    # Delta method: the ratio moves with the mean of the residuals num - R * den.
    n = len(num)
    residual = num - (num.sum() / den.sum()) * den
    return math.sqrt(float((residual**2).sum()) / (n - 1) / n) / float(den.mean())


def _quantile(q: float) -> Callable[[np.ndarray], np.ndarray]:
    def fn(values: np.ndarray) -> np.ndarray:
        # Linear interpolation, as the report's latency percentiles.
        return np.quantile(values, q, axis=-1)

    return fn


def _quantile_se(q: float) -> Callable[[np.ndarray], float]:
    def se(values: np.ndarray) -> float:
        # The order statistics bracketing a 95% distribution-free interval of the quantile
        # (binomial ranks nq +- 1.96 sqrt(nq(1-q))); half its width over 1.96 is the se.
        x = np.sort(values)
        n = len(x)
        half = _Z95 * math.sqrt(n * q * (1 - q))
        low = max(0, math.floor(n * q - half))
        high = min(n - 1, math.ceil(n * q + half))
        return float(x[high] - x[low]) / (2 * _Z95)

    return se


@dataclass
class Estimator:
    """A statistic of one side's per-row arrays, and its uncertainty.

    `fn(*arrays)` reduces the last axis, so one function gives the point estimate (on the
    arrays) and the bootstrap (on (draws, n) resamples of them); `se_fn(*arrays)` is the
    statistic's large-sample standard error.
    """

    arrays: tuple[np.ndarray, ...]
    fn: Callable[..., np.ndarray]
    se_fn: Callable[..., float]

    @classmethod
    def ratio(cls, num: np.ndarray, den: np.ndarray) -> Estimator:
        """sum(num) / sum(den), e.g. tokens per second."""
        return cls((num, den), ratio_of_sums, _ratio_of_sums_se)

    @classmethod
    def quantile(cls, values: np.ndarray, q: float) -> Estimator:
        """The q-quantile of `values` (linear interpolation)."""
        return cls((values,), _quantile(q), _quantile_se(q))

    @property
    def n(self) -> int:
        return len(self.arrays[0])

    def point(self) -> float | None:
        if self.n == 0:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            value = float(self.fn(*(a[None, :] for a in self.arrays))[0])
        return value if math.isfinite(value) else None

    def bootstrap(self, rng: np.random.Generator, resamples: int) -> np.ndarray:
        """The statistic on `resamples` resamples of the rows (with replacement)."""
        out = np.empty(resamples)
        block = max(1, _MAX_DRAWS // max(self.n, 1))
        for start in range(0, resamples, block):
            size = min(block, resamples - start)
            idx = rng.integers(0, self.n, size=(size, self.n))
            with np.errstate(divide="ignore", invalid="ignore"):
                out[start : start + size] = self.fn(*(a[idx] for a in self.arrays))
        return out

    def log_se(self, rng: np.random.Generator, resamples: int) -> float | None:
        """Standard error of log(statistic); None where the log or the spread is undefined."""
        point = self.point()
        if point is None or point <= 0 or self.n < 2:
            return None
        if self.n >= ANALYTIC_MIN_ROWS:
            with np.errstate(divide="ignore", invalid="ignore"):
                se = self.se_fn(*self.arrays) / point
            return se if math.isfinite(se) else None
        draws = self.bootstrap(rng, resamples)
        draws = draws[np.isfinite(draws) & (draws > 0)]
        # Resamples with an undefined statistic (a zero denominator) are dropped; when that is
        # more than a few, the spread would describe other data.
        if len(draws) < 0.9 * resamples:
            return None
        return float(np.std(np.log(draws), ddof=1))


@dataclass
class _CellRows:
    """The per-row values of one cell that the metrics are computed from."""

    total_s: np.ndarray
    new_tokens: np.ndarray
    steps: np.ndarray
    accepted: np.ndarray
    energy_j: np.ndarray  # rows with an energy reading only
    energy_tokens: np.ndarray  # new_tokens of those same rows
    pair_ar_s: np.ndarray  # total_s of `ar` on the same key, for rows paired with `ar`
    pair_s: np.ndarray  # this method's total_s on those keys


@dataclass(frozen=True)
class MetricSpec:
    """A compared metric: its name, table label, direction, number format and estimator."""

    name: str
    label: str
    higher_is_better: bool
    spec: str  # format spec of its values
    estimator: Callable[[_CellRows], Estimator]


def _latency(q: float) -> Callable[[_CellRows], Estimator]:
    return lambda c: Estimator.quantile(c.total_s, q)


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "speedup_global", "speedup", True, ".3f", lambda c: Estimator.ratio(c.pair_ar_s, c.pair_s)
    ),
    MetricSpec("MAT", "MAT", True, ".3f", lambda c: Estimator.ratio(c.accepted, c.steps)),
    MetricSpec(
        "tokens_per_s", "tokens/s", True, ".4g", lambda c: Estimator.ratio(c.new_tokens, c.total_s)
    ),
    MetricSpec("latency_p50_s", "p50 s", False, ".4g", _latency(0.5)),
    MetricSpec("latency_p90_s", "p90 s", False, ".4g", _latency(0.9)),
    MetricSpec("latency_p99_s", "p99 s", False, ".4g", _latency(0.99)),
    MetricSpec(
        "energy_per_token_j",
        "J/token",
        False,
        ".4g",
        lambda c: Estimator.ratio(c.energy_j, c.energy_tokens),
    ),
)
# The baseline's speedup is 1 and its MAT 0 by definition: comparing them says nothing.
_SKIP_FOR_BASELINE = {"speedup_global", "MAT"}


_EMPTY = np.empty(0)


@dataclass
class _RunData:
    label: dict[str, Any]
    cells: dict[CellKey, _CellRows]
    errors: dict[CellKey, int]  # per run cell (topic "all")
    present: set[CellKey]  # run cells with any row, ok or not (topic "all")
    mismatches: dict[CellKey, tuple[int, int, list[str]]]  # (differing, paired, examples)


@dataclass(frozen=True)
class _Keys:
    """Builds a run's CellKeys from its rows' key values (GROUP_KEYS, or RUN_CELL_KEYS)."""

    # method name -> (registered method, resolved arguments); None: match by name
    settings: dict[str, tuple[str, str]] | None

    def key(self, values: Sequence[Any]) -> CellKey:
        model, name, batch_size, temperature, topic = values
        method, setting = str(name), ""
        if self.settings is not None:
            method, setting = self.settings[method]
        return CellKey(
            str(model), method, int(batch_size), float(temperature), str(topic), setting, str(name)
        )

    def run_key(self, values: Sequence[Any]) -> CellKey:
        return self.key([*values, ALL_TOPIC])


def _settings(frame: pl.DataFrame) -> dict[str, tuple[str, str]] | None:
    """Each method name's (registered method, resolved arguments); None when some rows have
    no arguments recorded."""
    pairs = frame.select("method", *SETTING_COLUMNS).unique()
    if pairs["method_args"].null_count():
        return None
    return {name: (base, args) for name, base, args in pairs.iter_rows()}


def _array(frame: pl.DataFrame, column: str) -> np.ndarray:
    return frame[column].cast(pl.Float64).to_numpy()


def _run_label(run_dir: Path) -> dict[str, Any]:
    manifest = manifest_or_empty(run_dir)
    env = Environment.from_manifest(manifest)
    return {
        "path": str(run_dir),
        "run_id": manifest.get("run_id") or run_dir.name,
        "git_sha": manifest.get("git_sha"),
        "host": manifest.get("host"),
        "started_at": manifest.get("started_at"),
        "grid_sha256": manifest.get("grid_sha256"),
        "workload_sha256": manifest.get("workload_sha256"),
        "accelerator": env.accelerator if env is not None else None,
        "software": software(manifest),
        "imported": source_format(manifest),
    }


def _partitions(frame: pl.DataFrame, keys: _Keys) -> list[tuple[CellKey, pl.DataFrame]]:
    """The rows of each cell: per topic, then pooled over topics as the "all" topic."""
    per_topic = frame.partition_by(GROUP_KEYS, as_dict=True)
    pooled = frame.partition_by(RUN_CELL_KEYS, as_dict=True)
    return [(keys.key(k), part) for k, part in per_topic.items()] + [
        (keys.run_key(k), part) for k, part in pooled.items()
    ]


def _read_rows(run_dir: Path) -> pl.DataFrame:
    return static_rows(load_rows(run_dir)).select(_COLUMNS).collect()


def _load_run(run_dir: Path, frame: pl.DataFrame, keys: _Keys) -> _RunData:
    ok = frame.filter(pl.col("status") == "ok")
    errors = {
        keys.run_key(k): int(n)
        for *k, n in frame.filter(pl.col("status") != "ok")
        .group_by(RUN_CELL_KEYS)
        .len()
        .iter_rows()
    }
    # Paired as the report pairs: the same work (SAME_WORK) under `ar`, both ok.
    baseline = ok.filter(pl.col("method") == BASELINE).select(
        *SAME_WORK, ar_total_s=pl.col("total_s"), ar_sha=pl.col("output_sha256")
    )
    # m:1: a duplicated ar row (a shard counted twice) fails loudly instead of skewing ratios.
    paired = ok.join(baseline, on=SAME_WORK, how="inner", validate="m:1")

    cells: dict[CellKey, _CellRows] = {}
    for key, part in _partitions(ok, keys):
        energy = part.filter(pl.col("energy_j").is_not_null())
        cells[key] = _CellRows(
            total_s=_array(part, "total_s"),
            new_tokens=_array(part, "new_tokens"),
            steps=_array(part, "steps"),
            accepted=_array(part, "accepted_tokens"),
            energy_j=_array(energy, "energy_j"),
            energy_tokens=_array(energy, "new_tokens"),
            pair_ar_s=_EMPTY,
            pair_s=_EMPTY,
        )
    for key, part in _partitions(paired, keys):
        cells[key].pair_ar_s = _array(part, "ar_total_s")
        cells[key].pair_s = _array(part, "total_s")
    present = {keys.run_key(k) for k in frame.select(RUN_CELL_KEYS).unique().iter_rows()}
    return _RunData(_run_label(run_dir), cells, errors, present, _mismatches(paired, keys))


def _load_runs(base_dir: Path, new_dir: Path) -> tuple[_RunData, _RunData, str]:
    """Both runs, keyed alike, and a note when only one of them recorded method arguments
    (methods are then matched by name)."""
    base_rows, new_rows = _read_rows(base_dir), _read_rows(new_dir)
    base_settings, new_settings = _settings(base_rows), _settings(new_rows)
    by_setting = base_settings is not None and new_settings is not None
    note = ""
    if not by_setting and (base_settings, new_settings) != (None, None):
        side = "BASE" if base_settings is None else "NEW"
        note = (
            f"> Note: {side} did not record method arguments (a run from before variants, or "
            "an imported run): methods are matched by name, not by their arguments."
        )
    return (
        _load_run(base_dir, base_rows, _Keys(base_settings if by_setting else None)),
        _load_run(new_dir, new_rows, _Keys(new_settings if by_setting else None)),
        note,
    )


def _mismatches(paired: pl.DataFrame, keys: _Keys) -> dict[CellKey, tuple[int, int, list[str]]]:
    """Per greedy run cell: outputs that differ from `ar`'s, of how many paired keys."""
    greedy = paired.filter((pl.col("temperature") == 0) & (pl.col("method") != BASELINE))
    # A missing hash cannot prove equality, so it counts as a mismatch.
    differs = ~(pl.col("output_sha256") == pl.col("ar_sha")).fill_null(False)
    label = pl.format("{}#{} r{}", "sample_id", "turn", "repeat")
    summary = (
        greedy.sort("workload", "sample_id", "turn", "repeat")
        .group_by(RUN_CELL_KEYS, maintain_order=True)
        .agg(
            differing=differs.sum(),
            paired=pl.len(),
            examples=label.filter(differs).head(5),
        )
        .filter(pl.col("differing") > 0)
    )
    return {
        keys.run_key(row[: len(RUN_CELL_KEYS)]): (int(row[-3]), int(row[-2]), list(row[-1]))
        for row in summary.iter_rows()
    }


# ----------------------------------------------------------------------------- the comparison


def _seed_for(seed: int, key: CellKey, metric: str) -> np.random.Generator:
    # Seeded per cell and metric, not by position: adding a cell leaves the others' numbers as
    # they were.
    # (and not by name: a variant renamed between runs keeps its numbers)
    identity = (key.model, key.method, key.setting, key.batch_size, key.temperature, key.topic)
    digest = zlib.crc32(repr((identity, metric)).encode())
    return np.random.default_rng([seed, digest])


def _verdict(
    spec: MetricSpec, ratio: float, ci: tuple[float, float] | None, threshold: float
) -> str:
    worse = ratio < 1 - threshold if spec.higher_is_better else ratio > 1 + threshold
    better = ratio > 1 + threshold if spec.higher_is_better else ratio < 1 - threshold
    if ci is None:
        return UNCHANGED
    low, high = ci
    below, above = high < 1.0, low > 1.0  # the whole interval on one side of "no change"
    if spec.higher_is_better:
        significant_worse, significant_better = below, above
    else:
        significant_worse, significant_better = above, below
    if worse and significant_worse:
        return REGRESSION
    if better and significant_better:
        return IMPROVEMENT
    return UNCHANGED


@dataclass(frozen=True)
class _Measured:
    """One metric of one cell before the verdict: estimates and the log ratio's spread."""

    spec: MetricSpec
    base: float | None
    new: float | None
    n_base: int
    n_new: int
    ratio: float | None
    log_se: float | None  # of log(NEW / BASE); None when not testable
    status: str | None  # INSUFFICIENT or NOT_APPLICABLE when decided without a test

    @property
    def testable(self) -> bool:
        return self.status is None and self.log_se is not None


def _measure(
    spec: MetricSpec,
    base: Estimator,
    new: Estimator,
    min_samples: int,
    resamples: int,
    rng: np.random.Generator,
) -> _Measured:
    b, n = base.point(), new.point()
    ratio = None if b is None or n is None or b == 0 else n / b

    def measured(log_se: float | None = None, status: str | None = None) -> _Measured:
        return _Measured(spec, b, n, base.n, new.n, ratio, log_se, status)

    if base.n == 0 and new.n == 0:
        return measured(status=NOT_APPLICABLE)
    if base.n < min_samples or new.n < min_samples:
        return measured(status=INSUFFICIENT)
    if ratio is None:
        return measured(status=NOT_APPLICABLE)
    se_b, se_n = base.log_se(rng, resamples), new.log_se(rng, resamples)
    if se_b is None or se_n is None:
        return measured()
    return measured(log_se=math.hypot(se_b, se_n))


def _z(confidence: float, family: int) -> float:
    # Bonferroni: each of `family` two-sided intervals at level 1 - (1 - confidence) / family.
    return NormalDist().inv_cdf(1 - (1 - confidence) / (2 * max(1, family)))


def _judge(m: _Measured, z: float, threshold: float) -> MetricChange:
    ci = None
    if m.testable:
        assert m.ratio is not None and m.log_se is not None
        centre = math.log(m.ratio)
        ci = (math.exp(centre - z * m.log_se), math.exp(centre + z * m.log_se))
    if m.status is not None:
        verdict = m.status
    else:
        assert m.ratio is not None
        verdict = _verdict(m.spec, m.ratio, ci, threshold)
    low, high = ci if ci is not None else (None, None)
    return MetricChange(m.spec, m.base, m.new, m.n_base, m.n_new, m.ratio, low, high, verdict)


def compare_metric(
    spec: MetricSpec,
    base: Estimator,
    new: Estimator,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    family: int = 1,
    rng: np.random.Generator | None = None,
) -> MetricChange:
    """Point estimates, interval of NEW / BASE and the verdict of one metric on its own.

    `family`: how many such tests the caller makes (the Bonferroni divisor).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    measured = _measure(spec, base, new, min_samples, resamples, rng)
    return _judge(measured, _z(confidence, family), threshold)


def compare_runs(
    base_dir: str | Path,
    new_dir: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    allow_missing: bool = False,
) -> Comparison:
    """Compare every cell of NEW with the same cell of BASE (see the module doc).

    `allow_missing`: a run cell of BASE absent from NEW is listed, not a hard failure (for
    comparing runs of different grids).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    base, new, settings_note = _load_runs(Path(base_dir), Path(new_dir))
    result = Comparison(
        base=base.label,
        new=new.label,
        threshold=threshold,
        min_samples=min_samples,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
        settings_note=settings_note,
    )
    measured: list[tuple[CellKey, list[_Measured]]] = []
    # NEW's keys first: where the runs name one setting differently, NEW's name is shown
    keys = sorted(set(new.cells) | set(base.cells), key=CellKey.sort_key)
    for key in keys:
        if key not in new.cells:
            result.only_base.append(key)
            continue
        if key not in base.cells:
            result.only_new.append(key)
            continue
        specs = [
            s for s in METRICS if not (key.method == BASELINE and s.name in _SKIP_FOR_BASELINE)
        ]
        measured.append(
            (
                key,
                [
                    _measure(
                        spec,
                        spec.estimator(base.cells[key]),
                        spec.estimator(new.cells[key]),
                        min_samples,
                        resamples,
                        _seed_for(seed, key, spec.name),
                    )
                    for spec in specs
                ],
            )
        )
    # The family is known only once every pair is measured; then each is judged.
    result.tests = sum(m.testable for _, ms in measured for m in ms)
    z = _z(confidence, result.tests)
    for key, ms in measured:
        result.cells.append(CellComparison(key, tuple(_judge(m, z, threshold) for m in ms)))
    result.hard_failures = _hard_failures(base, new, allow_missing)
    return result


def _hard_failures(base: _RunData, new: _RunData, allow_missing: bool) -> list[HardFailure]:
    failures = []
    if not allow_missing:
        for key in sorted(base.present - new.present, key=CellKey.sort_key):
            failures.append(HardFailure("missing", key, f"{key.describe()}: no rows in NEW"))
    for key, (differing, paired, examples) in sorted(
        new.mismatches.items(), key=lambda kv: kv[0].sort_key()
    ):
        more = ", …" if differing > len(examples) else ""
        failures.append(
            HardFailure(
                "lossless",
                key,
                f"{key.describe()}: {differing} of {paired} greedy outputs differ from ar "
                f"({', '.join(examples)}{more})",
            )
        )
    for key in sorted(new.errors, key=CellKey.sort_key):
        before, after = base.errors.get(key, 0), new.errors[key]
        if after > before:
            failures.append(
                HardFailure(
                    "errors", key, f"{key.describe()}: {after} error rows (BASE had {before})"
                )
            )
    return failures


# ----------------------------------------------------------------------------- Markdown


_MARK = {REGRESSION: " ▼", IMPROVEMENT: " ▲", INSUFFICIENT: " ?"}


def _brief(change: MetricChange | None) -> str:
    if change is None or (change.base is None and change.new is None):
        return DASH
    spec = change.metric.spec
    text = transition(change.base, change.new, spec)
    if change.ratio is not None:
        text += f" ({signed_pct(change.change)})"
    return text + _MARK.get(change.verdict, "")


def _run_line(name: str, label: dict[str, Any]) -> str:
    sha = (label.get("git_sha") or DASH)[:12]
    line = (
        f"- **{name}**: `{label['run_id']}` · git `{sha}` · host {label.get('host') or DASH} · "
        f"started {label.get('started_at') or DASH}"
    )
    if label.get("accelerator"):
        line += f" · on {label['accelerator']}"
    if label.get("imported"):
        line += f" · imported ({label['imported']} answer files)"
    return line


def _provenance_notes(result: Comparison) -> list[str]:
    """Warnings when the two runs did not run the same grid or the same samples."""
    notes = []
    for field_name, what in (("grid_sha256", "grids"), ("workload_sha256", "workloads")):
        before, after = result.base.get(field_name), result.new.get(field_name)
        if before and after and before != after:
            notes.append(f"> Note: the {what} differ ({field_name} {before[:12]} vs {after[:12]}).")
    before, after = result.base.get("accelerator"), result.new.get("accelerator")
    if before and after and before != after:
        notes.append(
            f"> Note: the runs ran on different hardware ({before} vs {after}): times and "
            "speedups compare the machines as well as the code."
        )
    before, after = result.base.get("software") or {}, result.new.get("software") or {}
    changed = [
        f"{name} {before[name]} vs {after[name]}"
        for name in before
        if name in after and before[name] != after[name]
    ]
    if changed:
        # A warning, never a failure: an upgrade is often the very change being measured.
        notes.append(
            f"> Note: the environments differ ({'; '.join(changed)}): a change may come from "
            "them as well as from the code."
        )
    if result.settings_note:
        notes.append(result.settings_note)
    for side, label in (("BASE", result.base), ("NEW", result.new)):
        if label.get("imported"):
            notes.append(
                f"> Note: {side} was imported from {label['imported']} answer files: its "
                "lossless check compares answer texts, and it has no energy readings."
            )
    return [*notes, ""] if notes else []


def headline(result: Comparison) -> str:
    """The first line of the summary: the verdict, for a glance or `head -1` in a CI log."""
    regressions = result.regressions
    insufficient = sum(c.verdict == INSUFFICIENT for c in result.cells)
    if result.failed:
        parts = []
        if regressions:
            cells = len({key for key, _ in regressions})
            parts.append(f"{len(regressions)} regression(s) in {cells} cell(s)")
        if result.hard_failures:
            parts.append(f"{len(result.hard_failures)} hard failure(s)")
        return f"**Compare: FAILED** ({'; '.join(parts)})."
    return (
        f"**Compare: OK**: no regression in {len(result.cells)} cells "
        f"({insufficient} with insufficient data)."
    )


def render_comparison(result: Comparison) -> str:
    """The Markdown summary of a comparison; its first line is the verdict."""
    pct = f"{100 * result.threshold:g}%"
    lines = [
        headline(result),
        "",
        f"# Compare: {result.base['run_id']} → {result.new['run_id']}",
        "",
        _run_line("BASE", result.base),
        _run_line("NEW", result.new),
        "",
        *_provenance_notes(result),
        f"A regression is a change worse than {pct} whose interval of NEW / BASE lies wholly "
        f"on the worse side of 1. Intervals are Bonferroni-adjusted over the {result.tests} "
        f"tests, so two runs of the same code raise a false alarm with probability at most "
        f"{100 * (1 - result.confidence):g}%; standard errors are bootstrapped "
        f"({result.resamples} resamples, seed {result.seed}) below {ANALYTIC_MIN_ROWS} rows, "
        f"closed-form above. Cells with fewer than {result.min_samples} rows on either side "
        "are marked ? (insufficient data). Speedup is global (total ar seconds / total method "
        "seconds over the keys both ran).",
        "",
    ]
    if result.hard_failures:
        lines += ["## Hard failures", ""]
        lines += [f"- {f.kind}: {f.detail}" for f in result.hard_failures]
        lines.append("")
    if result.regressions:
        lines += ["## Regressions", ""]
        rows = [
            (
                key.model,
                key.label,
                key.batch_size,
                f"{key.temperature:g}",
                key.topic,
                change.metric.label,
                num(change.base, change.metric.spec),
                num(change.new, change.metric.spec),
                signed_pct(change.change),
                f"[{change.ci_low:.3f}, {change.ci_high:.3f}]",
            )
            for key, change in result.regressions
        ]
        header = ("model", "method", "batch", "T", "topic", "metric", "BASE", "NEW", "change")
        # Names and numbers, printed exactly as the runs spell them.
        lines += markdown_table((*header, "interval of NEW/BASE"), rows, one_line=False)
        lines.append("")
    lines += ["## All cells", ""]
    rows = []
    for cell in result.cells:
        by_name = {c.metric.name: c for c in cell.changes}
        sizes = max(cell.changes, key=lambda c: c.n_base, default=None)
        counts = DASH if sizes is None else f"{sizes.n_base}/{sizes.n_new}"
        rows.append(
            (
                cell.key.model,
                cell.key.label,
                cell.key.batch_size,
                f"{cell.key.temperature:g}",
                cell.key.topic,
                counts,
                *(_brief(by_name.get(spec.name)) for spec in METRICS),
                cell.verdict,
            )
        )
    header = ("model", "method", "batch", "T", "topic", "rows B/N")
    lines += markdown_table((*header, *(s.label for s in METRICS), "verdict"), rows, one_line=False)
    lines += ["", "▼ regression · ▲ improvement · ? insufficient data · – not measured", ""]
    for title, keys in (
        ("Cells only in BASE", result.only_base),
        ("Cells only in NEW", result.only_new),
    ):
        if keys:
            lines += [f"## {title}", "", *(f"- {key.describe()}" for key in keys), ""]
    return "\n".join(lines)
