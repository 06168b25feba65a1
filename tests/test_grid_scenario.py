"""The grid's serving keys (`scenario`, `slo`): parsing, bad input, hashing, cells, ids, shards,
rows; and the Poisson arrival pattern (orchestrator/arrivals.py)."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mmspec.cli.main import Hooks, main
from mmspec.orchestrator import ray_session as ray_session_module
from mmspec.orchestrator.arrivals import arrival_times
from mmspec.orchestrator.grid import (
    GridError,
    check_streams,
    expand,
    grid_sha256,
    load_grid,
    make_shards,
    parse_grid,
    to_dict,
)
from mmspec.orchestrator.shard_rows import base_row, expected_keys
from mmspec.results.cells import (
    ContinuousScenario,
    PoissonScenario,
    Slo,
    StaticScenario,
)
from mmspec.results.ids import cell_id
from tests.conftest import mmspec_split
from tests.fake_runner import FakeRunner, make_samples

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BASE: dict[str, Any] = {
    "name": "t",
    "workloads": [{"builtin": "synthetic", "limit": 12}],
    "models": [{"id": "tiny-qwen2.5-vl"}, {"id": "tiny-llava"}],
    "methods": ["ar", "pld"],
    "method_args": {"pld": {"ngram": 4, "num_pred": 10}},
    "batch_sizes": [1, 4],
    "temperatures": [0.0, 0.7],
    "max_new_tokens": 16,
    "exclude": [{"method": "pld", "batch_size": 4}],
}
# grid_sha256 of BASE as the code before `scenario` existed computed it (commit d843a28): a
# grid that names no scenario must keep its hash, or no run from before could be resumed
BASE_SHA256 = "84e3ec201d2986bcc78a6f5a136d3f3299d047455969434f6cdfa63e2ab85b1a"

SERVING = {
    "static": {},
    "continuous": {"concurrency": [1, 4]},
    "poisson": {"rates": [0.5, 2], "requests": 6, "seed": 3, "max_concurrency": 4},
}


def with_(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def write(tmp_path: Path, data: Any, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- parsing


def test_scenarios_and_slo_are_parsed_in_canonical_order() -> None:
    # the file's order does not matter: scenarios come out static, continuous, poisson
    written = {"poisson": SERVING["poisson"], "continuous": {"concurrency": [4, 1]}, "static": None}
    grid = parse_grid(with_(scenario=written, slo={"ttft_s": 2, "tpot_s": 0.25}), "g.yaml")
    assert grid.scenarios == (
        StaticScenario(),
        ContinuousScenario((4, 1)),
        PoissonScenario((0.5, 2.0), requests=6, seed=3, max_concurrency=4),
    )
    assert grid.slo == Slo(ttft_s=2.0, tpot_s=0.25)
    assert isinstance(grid.slo.ttft_s, float)


def test_poisson_defaults_take_the_grid_seed_and_every_sample() -> None:
    grid = parse_grid(with_(seed=7, scenario={"poisson": {"rates": [1]}}, exclude=[]), "g.yaml")
    assert grid.scenarios == (PoissonScenario((1.0,), requests=None, seed=7, max_concurrency=8),)


def test_slo_may_set_one_objective() -> None:
    assert parse_grid(with_(slo={"tpot_s": 0.1}), "g.yaml").slo == Slo(None, 0.1)


@pytest.mark.parametrize("written", ["static", {"static": {}}, {"static": None}])
def test_a_grid_without_serving_keys_hashes_as_before(written: Any) -> None:
    plain = parse_grid(BASE, "g.yaml")
    assert grid_sha256(plain) == BASE_SHA256
    assert "scenario" not in to_dict(plain) and "slo" not in to_dict(plain)
    named = parse_grid(with_(scenario=written), "g.yaml")
    assert named == plain and grid_sha256(named) == BASE_SHA256


def test_serving_keys_change_the_hash() -> None:
    hashes = {
        grid_sha256(parse_grid(data, "g.yaml"))
        for data in (
            BASE,
            with_(scenario=SERVING),
            with_(scenario={**SERVING, "continuous": {"concurrency": [1, 8]}}),
            with_(scenario=SERVING, slo={"ttft_s": 1}),
            with_(scenario=SERVING, slo={"ttft_s": 2}),
        )
    }
    assert len(hashes) == 5


@pytest.mark.parametrize(
    "changes",
    [
        {"scenario": SERVING, "slo": {"ttft_s": 2.0, "tpot_s": 0.2}},
        {"scenario": {"poisson": {"rates": [1]}}, "slo": {"tpot_s": 0.2}, "exclude": []},
        {"scenario": {"continuous": {"concurrency": [2, 4]}}},
    ],
)
def test_manifest_round_trip(changes: dict[str, Any]) -> None:
    """The manifest stores to_dict and a resume parses it again: the same grid, the same hash
    (through JSON, as the manifest file holds it)."""
    grid = parse_grid(with_(**changes), "g.yaml")
    stored = json.loads(json.dumps(to_dict(grid)))
    again = parse_grid(stored, "manifest.json")
    assert again == grid
    assert grid_sha256(again) == grid_sha256(grid)
    assert to_dict(again) == to_dict(grid)


# (grid changes, the key path the message must name, what the message must also say)
BAD = {
    "concurrency 0": (
        {"scenario": {"continuous": {"concurrency": [4, 0]}}},
        "scenario.continuous.concurrency[1]",
        ["got 0", "integers >= 1"],
    ),
    "concurrency not an integer": (
        {"scenario": {"continuous": {"concurrency": [1.5]}}},
        "scenario.continuous.concurrency[0]",
        ["got 1.5"],
    ),
    "concurrency twice": (
        {"scenario": {"continuous": {"concurrency": [4, 4]}}},
        "scenario.continuous.concurrency[1]",
        ["duplicate"],
    ),
    "concurrency not a list": (
        {"scenario": {"continuous": {"concurrency": 4}}},
        "scenario.continuous.concurrency",
        ["non-empty list"],
    ),
    "concurrency missing": (
        {"scenario": {"continuous": {}}},
        "scenario.continuous.concurrency",
        ["missing required key"],
    ),
    "continuous with a poisson key": (
        {"scenario": {"continuous": {"concurrency": [1], "rates": [1]}}},
        "scenario.continuous.rates",
        ["unknown key", "concurrency"],
    ),
    "rate 0": (
        {"scenario": {"poisson": {"rates": [1, 0]}}},
        "scenario.poisson.rates[1]",
        ["got 0", "numbers > 0"],
    ),
    "rate negative": (
        {"scenario": {"poisson": {"rates": [-2]}}},
        "scenario.poisson.rates[0]",
        ["got -2"],
    ),
    "rate infinite": (
        {"scenario": {"poisson": {"rates": [float("inf")]}}},
        "scenario.poisson.rates[0]",
        ["numbers > 0"],
    ),
    "rate twice": (
        {"scenario": {"poisson": {"rates": [1, 1.0]}}},
        "scenario.poisson.rates[1]",
        ["duplicate"],
    ),
    "rates missing": (
        {"scenario": {"poisson": {"requests": 4}}},
        "scenario.poisson.rates",
        ["missing required key"],
    ),
    "requests 0": (
        {"scenario": {"poisson": {"rates": [1], "requests": 0}}},
        "scenario.poisson.requests",
        ["got 0", "integers >= 1"],
    ),
    "requests a string": (
        {"scenario": {"poisson": {"rates": [1], "requests": "all"}}},
        "scenario.poisson.requests",
        ["got 'all'"],
    ),
    "max_concurrency 0": (
        {"scenario": {"poisson": {"rates": [1], "max_concurrency": 0}}},
        "scenario.poisson.max_concurrency",
        ["integers >= 1"],
    ),
    "arrival seed negative": (
        {"scenario": {"poisson": {"rates": [1], "seed": -1}}},
        "scenario.poisson.seed",
        ["integers >= 0"],
    ),
    "unknown scenario name": (
        {"scenario": "burst"},
        "scenario",
        ["unknown scenario 'burst'", "static", "continuous", "poisson"],
    ),
    "unknown scenario key": (
        {"scenario": {"static": {}, "burst": {"rate": 1}}},
        "scenario.burst",
        ["unknown key", "static, continuous, poisson"],
    ),
    "a serving scenario without settings": (
        {"scenario": "continuous"},
        "scenario",
        ["needs its settings", "concurrency"],
    ),
    "empty scenario mapping": ({"scenario": {}}, "scenario", ["names no scenario"]),
    "static with settings": (
        {"scenario": {"static": {"batch_sizes": [1]}}},
        "scenario.static.batch_sizes",
        ["unknown key"],
    ),
    "ttft 0": ({"slo": {"ttft_s": 0}}, "slo.ttft_s", ["got 0", "numbers > 0"]),
    "tpot negative": ({"slo": {"ttft_s": 1, "tpot_s": -0.1}}, "slo.tpot_s", ["got -0.1"]),
    "slo not a number": ({"slo": {"ttft_s": "fast"}}, "slo.ttft_s", ["got 'fast'"]),
    "slo unknown key": ({"slo": {"ttft": 1}}, "slo.ttft", ["unknown key", "ttft_s, tpot_s"]),
    "empty slo": ({"slo": {}}, "slo", ["no objective", "ttft_s"]),
    "slo not a mapping": ({"slo": 2}, "slo", ["expected a mapping"]),
    "exclude a scenario the grid lacks": (
        {"exclude": [{"scenario": "poisson"}]},
        "exclude[0].scenario",
        ["'poisson' is not in the grid", "static"],
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_serving_input_names_file_and_key(tmp_path: Path, case: str) -> None:
    changes, key, says = BAD[case]
    path = write(tmp_path, with_(**changes))
    with pytest.raises(GridError) as info:
        load_grid(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}:"), message
    for text in says:
        assert text in message, message


def test_batch_sizes_without_a_static_scenario_are_flagged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grid = parse_grid(with_(scenario={"continuous": {"concurrency": [2]}}, exclude=[]), "g.yaml")
    assert "no static scenario uses them" in caplog.text
    assert {c.scenario for c in expand(grid)} == {"continuous"}


def test_serving_example_is_valid() -> None:
    mmspec_split("testmini")  # the example reads MMSpec testmini; skipped without it
    grid = load_grid(EXAMPLES / "serving.yaml")
    assert [s.name for s in grid.scenarios] == ["static", "continuous", "poisson"]
    assert grid.slo is not None and grid.methods[0] == "ar"
    assert to_dict(parse_grid(json.loads(json.dumps(to_dict(grid))), "m.json")) == to_dict(grid)


def test_demo_grid_has_a_continuous_cell_per_method() -> None:
    grid = load_grid(EXAMPLES / "grid.yaml")
    continuous = [c for c in expand(grid) if c.scenario == "continuous"]
    assert {c.method for c in continuous} == set(grid.methods)
    assert {c.model.id for c in continuous} == {m.id for m in grid.models}


# ----------------------------------------------------------------------------- cells and ids


def serving_grid(**changes: Any) -> Any:
    return parse_grid(with_(**{"scenario": SERVING, "exclude": [], **changes}), "g.yaml")


def test_cells_of_each_scenario() -> None:
    grid = serving_grid(temperatures=[0.0])
    cells = [c for c in expand(grid) if c.model.id == "tiny-llava" and c.method == "pld"]
    loads = [(c.scenario, c.batch_size, c.rate, c.arrival_seed, c.requests) for c in cells]
    assert loads == [
        ("static", 1, None, None, None),
        ("static", 4, None, None, None),
        ("continuous", 1, None, None, None),
        ("continuous", 4, None, None, None),
        ("poisson", 4, 0.5, 3, 6),
        ("poisson", 4, 2.0, 3, 6),
    ]
    assert [c.serving for c in cells] == [False, False, True, True, True, True]
    assert [c.cell_id.split("__")[2] for c in cells] == [
        "bs1",
        "bs4",
        "cc1",
        "cc4",
        "poisson0.5x4",
        "poisson2x4",
    ]
    every = expand(grid)
    assert len({c.cell_id for c in every}) == len(every) == 2 * 2 * 6


def test_static_cell_ids_are_unchanged() -> None:
    # run folders from before the serving scenario resume only if these stay as they were
    assert cell_id("tiny-qwen2.5-vl", "pld", 4, 0.0, 0, "synthetic") == (
        "tiny-qwen2.5-vl__pld__bs4__t0__r0__synthetic"
    )
    assert cell_id("m/x", "pld", 2, 0.7, 1, "w", "static") == "m--x__pld__bs2__t0.7__r1__w"
    for cell in expand(parse_grid(BASE, "g.yaml")):
        legacy = cell_id(
            cell.model.id, cell.method, cell.batch_size, cell.temperature, cell.repeat, "synthetic"
        )
        assert cell.cell_id == legacy and cell.scenario == "static" and cell.rate is None


def test_serving_ids_are_path_safe_and_distinct() -> None:
    ids = {cell_id("m", "ar", 8, 0.0, 0, "w", "poisson", r) for r in (0.1, 1e-05, 1.0, 10.0, 1e20)}
    assert len(ids) == 5
    assert all("/" not in i and i.count("__") == 5 for i in ids)
    assert cell_id("m", "ar", 4, 0.0, 0, "w", "continuous") == "m__ar__cc4__t0__r0__w"
    with pytest.raises(ValueError):
        cell_id("m", "ar", 4, 0.0, 0, "w", "poisson")  # a poisson id needs its rate


def test_exclude_may_name_a_scenario() -> None:
    grid = serving_grid(exclude=[{"scenario": "continuous"}])
    assert "continuous" not in {c.scenario for c in expand(grid)}
    # with batch_size: one concurrency of one scenario (a serving cell's batch size is its cap)
    grid = serving_grid(exclude=[{"scenario": "continuous", "batch_size": 4, "method": "pld"}])
    gone = {c.cell_id for c in expand(serving_grid())} - {c.cell_id for c in expand(grid)}
    # pld's cc4 cells only: one per model and temperature
    assert sorted(i.split("__")[1:3] for i in gone) == [["pld", "cc4"]] * 2 * 2


# ----------------------------------------------------------------------------- shards and rows


def test_a_serving_cell_is_one_shard_of_its_stream() -> None:
    grid = serving_grid(shard_size=2)
    samples = make_samples(12)
    shards = make_shards(expand(grid), {"synthetic": samples}, "run", grid.shard_size)
    by_cell: dict[str, list[Any]] = {}
    for shard in shards:
        by_cell.setdefault(shard.cell.cell_id, []).append(shard)
    for cell in expand(grid):
        mine = by_cell[cell.cell_id]
        if cell.scenario == "static":
            assert sum(len(s.samples) for s in mine) == 12 and len(mine) == 12 // max(
                2, cell.batch_size
            )
            continue
        [shard] = mine
        assert shard.shard_id == f"{cell.cell_id}__s000"
        wanted = samples[:6] if cell.scenario == "poisson" else samples
        assert shard.samples == tuple(wanted)


def test_a_stream_longer_than_its_workload_is_refused_before_anything_starts() -> None:
    grid = serving_grid()  # poisson asks for 6 requests
    check_streams(grid, {"synthetic": make_samples(6)})
    with pytest.raises(GridError) as info:
        check_streams(grid, {"synthetic": make_samples(5)})
    assert str(info.value).startswith("g.yaml: scenario.poisson.requests: 6 requests")
    assert "has 5 samples" in str(info.value)
    with pytest.raises(ValueError, match="6 requests"):
        make_shards(expand(grid), {"synthetic": make_samples(5)}, "run", 8)


def test_rows_carry_the_cells_scenario_and_rate() -> None:
    grid = serving_grid()
    shards = make_shards(expand(grid), {"synthetic": make_samples(6)}, "run", 8)
    seen = set()
    for shard in shards:
        sample = shard.samples[0]
        row = base_row(shard, sample, 0)
        assert (row.scenario, row.rate, row.batch_size) == (
            shard.cell.scenario,
            shard.cell.rate,
            shard.cell.batch_size,
        )
        seen.add((row.scenario, row.rate))
    assert seen == {("static", None), ("continuous", None), ("poisson", 0.5), ("poisson", 2.0)}
    # a multi-turn sample owes a row per turn in a stream as in a batch
    [stream] = [s for s in shards if s.cell.scenario == "continuous" and s.cell.batch_size == 4][:1]
    assert len(expected_keys(stream)) == sum(len(s.turns) for s in stream.samples)


# ----------------------------------------------------------------------------- arrivals


def test_arrivals_repeat_for_a_seed_and_differ_across_seeds() -> None:
    times = arrival_times(0, 20, 1.0)
    assert times == arrival_times(0, 20, 1.0)
    assert times != arrival_times(1, 20, 1.0)
    assert len(times) == 20 and times[0] > 0
    assert all(b >= a for a, b in itertools.pairwise(times))
    # a shorter stream is the start of the longer one's pattern
    assert arrival_times(0, 5, 1.0) == pytest.approx(times[:5])


def test_rates_scale_one_pattern() -> None:
    base = np.array(arrival_times(4, 30, 1.0))
    for rate in (0.25, 2.0, 8.0):
        assert np.allclose(np.array(arrival_times(4, 30, rate)), base / rate)


def test_mean_gap_is_one_over_the_rate() -> None:
    rate, n = 4.0, 20000
    gaps = np.diff([0.0, *arrival_times(11, n, rate)])
    # the mean of n exponential gaps has standard deviation (1/rate)/sqrt(n): allow 5 of them
    assert abs(gaps.mean() - 1 / rate) < 5 / rate / np.sqrt(n)
    assert abs(gaps.std() - 1 / rate) < 0.05 / rate  # exponential: sd equals the mean


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan")])
def test_a_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        arrival_times(0, 3, rate)


# ----------------------------------------------------------------------------- CLI


def _grid_file(tmp_path: Path, **changes: Any) -> Path:
    data = with_(out=str(tmp_path / "runs"), **{"exclude": [], **changes})
    data["models"] = [{"id": "tiny-llava"}]
    return write(tmp_path, data)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**kwargs: Any) -> None:
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(ray_session_module, "ray_session", refuse)


def _submit(*args: str) -> Any:
    return CliRunner().invoke(main, ["submit", *args], obj=Hooks(runner_cls=FakeRunner))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        (
            {"scenario": {"continuous": {"concurrency": [1, 0]}}},
            "scenario.continuous.concurrency[1]",
        ),
        ({"scenario": {"poisson": {"rates": [1], "requests": 13}}}, "scenario.poisson.requests"),
    ],
    ids=["bad concurrency", "more requests than samples"],
)
def test_submit_refuses_bad_serving_input(
    tmp_path: Path, no_ray: None, changes: dict[str, Any], key: str
) -> None:
    path = _grid_file(tmp_path, **changes)
    for mode in ("--dry-run", "--local"):
        result = _submit(str(path), mode)
        assert result.exit_code == 2, result.output
        assert f"{path}: {key}:" in result.stderr
        assert not (tmp_path / "runs").exists()


def test_dry_run_plans_one_shard_per_serving_cell(tmp_path: Path, no_ray: None) -> None:
    scenario = {"static": {}, "continuous": {"concurrency": [2]}, "poisson": {"rates": [1]}}
    path = _grid_file(tmp_path, scenario=scenario, batch_sizes=[4], temperatures=[0])
    result = _submit(str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    # per method: 12 samples in static shards of 8 (2) + one stream per serving cell (2)
    assert "6 cells, 8 shards (8 to run)" in result.stdout
