"""Sweeping a method's settings in one grid (issue 18): named variants and list-valued
method_args, their expansion, names, ids, validation, manifest, dry run and resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import mmspec.workloads
from mmspec.cli.main import Hooks, main
from mmspec.orchestrator import ray_session as ray_session_module
from mmspec.orchestrator.grid import (
    GridError,
    expand,
    grid_sha256,
    load_grid,
    make_shards,
    parse_grid,
    to_dict,
)
from mmspec.orchestrator.manifest import build_manifest
from mmspec.orchestrator.store import create_run_dir, write_manifest, write_shard
from mmspec.orchestrator.worker import Worker, pair_of
from mmspec.results.ids import method_id
from mmspec.results.layout import MANIFEST, completed_shards, read_manifest, result_files
from mmspec.results.variants import METHOD_VARIANTS, variants_of
from tests.fake_runner import FakeRunner, make_samples

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "sweep.yaml"

SWEEP: dict[str, Any] = {
    "name": "s",
    "workloads": [{"builtin": "synthetic", "limit": 6}],
    "models": ["tiny-qwen2.5-vl"],
    "methods": [
        "ar",
        "eagle2",
        {"name": "eagle2-wide", "method": "eagle2", "args": {"depth": 5, "top_k": 10}},
        "viskip+pld",
    ],
    "method_args": {"viskip+pld": {"viskip_threshold": [0.2, 0.35, 0.5], "ngram": 3}},
    "batch_sizes": [1, 4],
}
THRESHOLDS = [f"viskip+pld[viskip_threshold={t}]" for t in ("0.2", "0.35", "0.5")]


def sweep(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(SWEEP)
    data.update(changes)
    return data


@pytest.fixture(autouse=True)
def builtin_workloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mmspec.workloads, "builtin_workloads", lambda: ["synthetic"], raising=False)


# ----------------------------------------------------------------------------- expansion


def test_variants_and_sweeps_expand_to_named_cells() -> None:
    grid = parse_grid(sweep(), "g.yaml")
    assert [v.name for v in grid.variants] == ["ar", "eagle2", "eagle2-wide", *THRESHOLDS]
    cells = expand(grid)
    assert len(cells) == 6 * 2  # six methods and variants x two batch sizes
    assert len({c.cell_id for c in cells}) == len(cells)
    by_name = {c.method: c for c in cells if c.batch_size == 1}
    low = by_name[THRESHOLDS[0]]
    # the drafter is built from the registered method with the one value of the sweep
    assert low.registered_method == "viskip+pld"
    assert low.method_args == {"viskip_threshold": 0.2, "ngram": 3}
    assert low.cell_id == "tiny-qwen2.5-vl__viskip+pld_viskip_threshold_0.2__bs1__t0__r0__synthetic"
    wide = by_name["eagle2-wide"]
    assert (wide.registered_method, wide.method_args) == ("eagle2", {"depth": 5, "top_k": 10})
    # resolved: the drafter's defaults filled in, what every row records
    assert wide.resolved_args == {
        "checkpoint": None,
        "depth": 5,
        "top_k": 10,
        "total_token": 30,
        "threshold": 0.3,
    }
    assert low.resolved_args is not None and low.resolved_args["viskip_layers"] == [-1]
    assert by_name["eagle2"].resolved_args["depth"] == 3
    assert by_name["ar"].resolved_args == {}


def test_a_cartesian_sweep_names_every_swept_argument_in_order() -> None:
    data = sweep(
        methods=["ar", {"name": "tree", "method": "eagle2", "args": {"depth": [3, 5]}}],
        method_args={},
    )
    data["methods"][1]["args"]["top_k"] = [8, 10]
    grid = parse_grid(data, "g.yaml")
    names = [v.name for v in grid.variants[1:]]
    assert names == [
        "tree[depth=3,top_k=8]",
        "tree[depth=3,top_k=10]",
        "tree[depth=5,top_k=8]",
        "tree[depth=5,top_k=10]",
    ]
    assert {v.swept for v in grid.variants[1:]} == {("depth", "top_k")}
    assert len({method_id(n) for n in names}) == 4


def test_a_list_valued_argument_is_a_value_not_a_sweep() -> None:
    grid = parse_grid(
        sweep(methods=["ar", "viskip+pld"], method_args={"viskip+pld": {"viskip_layers": [-1, 0]}})
    )
    [variant] = [v for v in grid.variants if v.method == "viskip+pld"]
    assert variant.name == "viskip+pld" and variant.args == {"viskip_layers": [-1, 0]}


def test_a_list_of_one_value_is_a_sweep_of_one() -> None:
    grid = parse_grid(sweep(methods=["ar", "pld"], method_args={"pld": {"ngram": [3]}}))
    assert [v.name for v in grid.variants] == ["ar", "pld[ngram=3]"]


def test_the_canonical_form_round_trips_and_keeps_old_hashes() -> None:
    grid = parse_grid(sweep(), "g.yaml")
    assert parse_grid(to_dict(grid), "manifest") == grid
    assert to_dict(grid)["methods"][2] == SWEEP["methods"][2]
    # a grid without variants writes what it wrote before variants existed: same hash
    plain = parse_grid(sweep(methods=["ar", "pld"], method_args={"pld": {"ngram": 4}}))
    assert to_dict(plain)["methods"] == ["ar", "pld"]
    assert to_dict(plain)["method_args"] == {"pld": {"ngram": 4}}
    assert grid_sha256(plain) != grid_sha256(grid)


def test_exclude_names_an_entry_or_one_variant_of_its_sweep() -> None:
    whole = parse_grid(sweep(exclude=[{"method": "viskip+pld", "batch_size": 4}]))
    assert not [
        c for c in expand(whole) if c.registered_method == "viskip+pld" and c.batch_size == 4
    ]
    one = parse_grid(sweep(exclude=[{"method": THRESHOLDS[1]}]))
    assert THRESHOLDS[1] not in {c.method for c in expand(one)}
    assert {THRESHOLDS[0], THRESHOLDS[2]} <= {c.method for c in expand(one)}


# ----------------------------------------------------------------------------- bad input

BAD = {
    "unknown argument in a sweep": (
        sweep(method_args={"viskip+pld": {"viskip_thresh": [0.2, 0.5]}}),
        "method_args.viskip+pld",
        ["unknown option 'viskip_thresh'", "viskip_threshold"],
    ),
    "unknown argument of a variant": (
        sweep(
            methods=["ar", {"name": "w", "method": "eagle2", "args": {"width": 3}}], method_args={}
        ),
        "methods[1].args",
        ["unknown option 'width'", "depth"],
    ),
    "a list of lists for a list-valued argument": (
        sweep(method_args={"viskip+pld": {"viskip_layers": [[-1], [-1, 0]]}}),
        "method_args.viskip+pld.viskip_layers",
        ["takes a list as its value", "one variant per value", "method: viskip+pld"],
    ),
    "two variants with one name": (
        sweep(
            methods=[
                "ar",
                {"name": "w", "method": "eagle2", "args": {"depth": 4}},
                {"name": "w", "method": "eagle2", "args": {"depth": 5}},
            ],
            method_args={},
        ),
        "methods[2].name",
        ["'w' appears twice"],
    ),
    "a variant of an unknown method": (
        sweep(methods=["ar", {"name": "w", "method": "eagle9"}], method_args={}),
        "methods[1].method",
        ["unknown method 'eagle9'", "eagle2"],
    ),
    "an empty list": (
        sweep(method_args={"viskip+pld": {"viskip_threshold": []}}),
        "method_args.viskip+pld.viskip_threshold",
        ["an empty list sweeps nothing"],
    ),
    "a wrong value inside a sweep": (
        sweep(method_args={"viskip+pld": {"viskip_threshold": [0.2, "high"]}}),
        "method_args.viskip+pld.viskip_threshold[1]",
        ["got 'high'", "a number"],
    ),
    "a value given twice": (
        sweep(method_args={"viskip+pld": {"viskip_threshold": [0.2, 0.2]}}),
        "method_args.viskip+pld.viskip_threshold[1]",
        ["duplicate value 0.2"],
    ),
    "a value out of the drafter's range": (
        sweep(method_args={"viskip+pld": {"viskip_threshold": [0.2, 1.5]}}),
        "method_args.viskip+pld",
        ["viskip+pld[viskip_threshold=1.5]", "[0, 1]"],
    ),
    "a variant named as a registered method": (
        sweep(methods=["ar", {"name": "pld", "method": "eagle2"}], method_args={}),
        "methods[1].name",
        ["'pld' is a registered method", "method_args.pld"],
    ),
    "a variant of the baseline": (
        sweep(methods=["ar", {"name": "ar2", "method": "ar"}], method_args={}),
        "methods[1].method",
        ["no settings to vary"],
    ),
    "method_args for a variant": (
        sweep(method_args={"eagle2-wide": {"depth": 4}}),
        "method_args.eagle2-wide",
        ["is a variant", "args"],
    ),
    "the same setting twice": (
        sweep(
            methods=["ar", "eagle2", {"name": "e", "method": "eagle2", "args": {"depth": 3}}],
            method_args={},
        ),
        "methods[2]",
        ["'e' runs eagle2 with the same arguments as 'eagle2'"],
    ),
    "two names with one id": (
        sweep(
            methods=[
                "ar",
                "pld",
                {"name": "pld_ngram_3", "method": "pld", "args": {"ngram": 2}},
            ],
            method_args={"pld": {"ngram": [3, 5]}},
        ),
        "methods[2]",
        ["same id as 'pld[ngram=3]'"],
    ),
    "an unknown key of a variant": (
        sweep(methods=["ar", {"name": "w", "method": "eagle2", "arg": {}}], method_args={}),
        "methods[1].arg",
        ["unknown key", "name, method, args"],
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_sweeps_name_file_and_key(case: str) -> None:
    data, key, parts = BAD[case]
    with pytest.raises(GridError) as info:
        parse_grid(data, "g.yaml")
    message = str(info.value)
    assert message.startswith(f"g.yaml: {key}: "), message
    for part in parts:
        assert part in message, message
    assert "\n" not in message and len(message) < 600


def test_a_bad_sweep_exits_2_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_session_module, "ray_session", _no_ray)
    data = sweep(method_args={"viskip+pld": {"viskip_threshold": []}}, out=str(tmp_path / "runs"))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["submit", str(grid), "--local"])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{grid}: method_args.viskip+pld.viskip_threshold: ")
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def _no_ray(**kwargs: Any) -> None:
    raise AssertionError("Ray must not start")


# ----------------------------------------------------------------------------- manifest, dry run


def test_the_manifest_records_every_variant_and_its_family() -> None:
    grid = parse_grid(sweep(), "g.yaml")
    manifest = build_manifest("run", grid, {"synthetic": make_samples(6)})
    recorded = variants_of(manifest)
    assert list(recorded) == [v.name for v in grid.variants]
    low = recorded[THRESHOLDS[0]]
    assert (low.method, low.entry, low.swept) == ("viskip+pld", "viskip+pld", ("viskip_threshold",))
    assert low.args == {"viskip_threshold": 0.2, "ngram": 3}
    assert low.resolved["ngram"] == 3 and low.resolved["viskip_gate"] == "after_draft"
    # the taxonomy is keyed by what results call each method
    assert manifest["taxonomy"][THRESHOLDS[0]]["vision_aware"] is True
    assert manifest["taxonomy"]["eagle2-wide"]["drafting"] == "tree"
    json.dumps(manifest[METHOD_VARIANTS], allow_nan=False)


def test_dry_run_lists_the_variants_and_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_session_module, "ray_session", _no_ray)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["submit", str(EXAMPLE), "--dry-run"])
    assert result.exit_code == 0, result.output
    grid = load_grid(EXAMPLE)
    variants = [v for v in grid.variants if v.name != v.method]
    assert len(variants) == 8  # two tree variants, six thresholds
    assert "method variants" in result.stdout
    assert "viskip+recycling[viskip_threshold=0.05]" in result.stdout
    assert "depth=5, top_k=10, total_token=59" in result.stdout
    cells = len(expand(grid))
    assert f"{cells} cells, {3 * cells} shards ({3 * cells} to run)" in result.stdout
    assert result.stdout.rstrip().endswith("; 8 method variants")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- resume


def test_resume_keeps_variants_apart(tmp_path: Path) -> None:
    grid = parse_grid(sweep(), "g.yaml")
    samples = {"synthetic": make_samples(12)}
    run_dir = create_run_dir(tmp_path / "runs", grid.name)
    write_manifest(run_dir, build_manifest(run_dir.name, grid, samples))
    shards = make_shards(expand(grid), samples, run_dir.name, grid.shard_size)
    # a run stopped after the first threshold's shards
    first = [s for s in shards if s.cell.method == THRESHOLDS[0]]
    for shard in first:
        cell = shard.cell
        worker = Worker(FakeRunner, cell.model, cell.registered_method, cell.method_args, "cpu", 1)
        assert worker.pair() == pair_of(cell)
        table, _ = worker.run(shard)
        write_shard(run_dir, shard, table, None)
    done = completed_shards(run_dir)
    todo = [s for s in shards if s.shard_id not in done]
    assert len(todo) == len(shards) - len(first)
    assert {s.cell.method for s in todo} >= {THRESHOLDS[1], THRESHOLDS[2]}
    assert THRESHOLDS[0] not in {s.cell.method for s in todo}
    # every row names its variant, its registered method and its resolved arguments
    import pyarrow.ipc as ipc

    [path, *_] = result_files(run_dir)
    assert "method=viskip+pld_viskip_threshold_0.2" in str(path)
    rows = ipc.open_file(str(path)).read_all().to_pylist()
    assert {r["method"] for r in rows} == {THRESHOLDS[0]}
    assert {r["base_method"] for r in rows} == {"viskip+pld"}
    assert {json.loads(r["method_args"])["viskip_threshold"] for r in rows} == {0.2}


def test_resume_refuses_a_setting_that_changed_since_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_session_module, "ray_session", _no_ray)
    grid = parse_grid(sweep(out=str(tmp_path / "runs")), "g.yaml")
    run_dir = create_run_dir(tmp_path / "runs", grid.name)
    manifest = build_manifest(run_dir.name, grid, {"synthetic": make_samples(6)})
    # as if viskip's gate had another default when the run started
    for record in manifest[METHOD_VARIANTS]:
        if record["method"] == "viskip+pld":
            record["resolved_args"]["viskip_gate"] = "every_step"
    write_manifest(run_dir, manifest)
    result = CliRunner().invoke(
        main, ["submit", "--resume", str(run_dir)], obj=Hooks(runner_cls=FakeRunner)
    )
    assert result.exit_code == 2
    assert f"{THRESHOLDS[0]} would run with other arguments" in result.stderr
    assert "viskip_gate: every_step then, after_draft now" in result.stderr
    assert read_manifest(run_dir)[METHOD_VARIANTS] == manifest[METHOD_VARIANTS]
    assert (run_dir / MANIFEST).is_file() and not result_files(run_dir)


def test_a_sweep_too_large_is_refused_before_anything_is_built() -> None:
    long = sweep(method_args={"viskip+pld": {"viskip_threshold": [0.5] * 100_000}})
    with pytest.raises(GridError, match=r"viskip_threshold: a list of 100,000 values"):
        parse_grid(long, "g.yaml")
    wide = sweep(
        methods=["ar", "eagle2"],
        method_args={"eagle2": {"depth": list(range(1, 41)), "top_k": list(range(1, 41))}},
    )
    with pytest.raises(GridError, match=r"method_args\.eagle2: the lists sweep 1,600 combin"):
        parse_grid(wide, "g.yaml")
