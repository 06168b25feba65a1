"""grid.yaml parsing, validation messages, expansion, sharding and hashing."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

import mmspec.workloads
from mmspec.methods.registry import method_names
from mmspec.orchestrator.grid import (
    Grid,
    GridError,
    chunk_size,
    expand,
    grid_sha256,
    load_grid,
    make_shards,
    parse_grid,
    to_dict,
)
from tests.fake_runner import make_samples

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grid.yaml"

BASE: dict[str, Any] = {
    "name": "t",
    "workloads": [{"builtin": "synthetic", "limit": 12}],
    "models": [{"id": "tiny-qwen2.5-vl"}, {"id": "tiny-llava", "dtype": "float32"}],
    "methods": ["ar", "pld"],
    "method_args": {"pld": {"ngram": 4, "num_pred": 10}},
    "batch_sizes": [1, 4],
    "temperatures": [0.0],
}


@pytest.fixture(autouse=True)
def builtin_workloads(monkeypatch: pytest.MonkeyPatch) -> None:
    # the workloads package is written in parallel; pin its catalogue for these tests
    monkeypatch.setattr(
        mmspec.workloads, "builtin_workloads", lambda: ["synthetic", "tiny"], raising=False
    )


def write(tmp_path: Path, data: Any, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def test_example_grid_is_valid() -> None:
    grid = load_grid(EXAMPLE)
    # the demo runs every method against the baseline (ViSkip over one of them)
    assert {m for m in method_names() if not m.startswith("viskip+")} <= set(grid.methods)
    assert grid.methods[0] == "ar"
    assert [m.id for m in grid.models] == ["tiny-qwen2.5-vl", "tiny-llava"]
    assert grid.workloads[0].builtin == "synthetic" and grid.workloads[0].limit == 24
    # models x methods x (two batch sizes + one continuous concurrency)
    assert len(expand(grid)) == 2 * len(grid.methods) * 3


# (grid data, key path the message must name, allowed values it must list)
BAD_GRIDS = {
    "unknown top-level key": (
        with_(modles=[{"id": "tiny-llava"}]),
        "modles",
        ["models", "methods", "batch_sizes"],
    ),
    "missing required key": (with_(models=None), "models", ["workloads", "methods"]),
    "unknown method": (with_(methods=["ar", "pld", "eagle9"]), "methods[2]", ["ar", "pld"]),
    "unknown viskip form": (with_(methods=["viskip+nope"]), "methods[0]", ["ar", "pld"]),
    "unknown model": (
        with_(models=[{"id": "tiny-qwen2.5-vl"}, {"id": "no-such-model"}]),
        "models[1].id",
        ["tiny-llava", "tiny-qwen2.5-vl", "hub id"],
    ),
    "missing model path": (
        with_(models=[{"id": "./no/such/checkpoint"}]),
        "models[0].id",
        ["does not exist"],
    ),
    "unknown model key": (
        with_(models=[{"id": "tiny-llava", "dtyp": "float32"}]),
        "models[0].dtyp",
        ["id", "dtype", "revision", "trust_remote_code"],
    ),
    "bad dtype": (
        with_(models=[{"id": "tiny-llava", "dtype": "fp8"}]),
        "models[0].dtype",
        ["float32", "float16", "bfloat16"],
    ),
    "zero batch size": (with_(batch_sizes=[1, 0]), "batch_sizes[1]", ["positive integers"]),
    "text batch size": (with_(batch_sizes=["four"]), "batch_sizes[0]", ["positive integers"]),
    "bool batch size": (with_(batch_sizes=[True]), "batch_sizes[0]", ["positive integers"]),
    "duplicate batch size": (with_(batch_sizes=[4, 4]), "batch_sizes[1]", ["each value once"]),
    "negative temperature": (
        with_(temperatures=[0.0, -0.5]),
        "temperatures[1]",
        ["numbers >= 0"],
    ),
    "missing workload path": (
        with_(workloads=[{"path": "/no/such/mmspec"}]),
        "workloads[0].path",
        ["mmspec.jsonl"],
    ),
    "unknown builtin workload": (
        with_(workloads=[{"builtin": "imagenet"}]),
        "workloads[0].builtin",
        ["synthetic", "tiny"],
    ),
    "builtin and path": (
        with_(workloads=[{"builtin": "synthetic", "path": "/tmp"}]),
        "workloads[0]",
        ["builtin, path"],
    ),
    "unknown topic": (
        with_(workloads=[{"builtin": "synthetic", "topics": ["poetry"]}]),
        "workloads[0].topics[0]",
        ["general vqa", "text vqa"],
    ),
    "method_args for an absent method": (
        with_(method_args={"eagle": {"depth": 3}}),
        "method_args.eagle",
        ["ar, pld"],
    ),
    "unknown method argument": (
        with_(method_args={"pld": {"ngrams": 4}}),
        "method_args.pld",
        ["ngram", "num_pred", "min_ngram"],
    ),
    "bad method argument value": (
        with_(method_args={"pld": {"ngram": 4, "num_pred": 0}}),
        "method_args.pld",
        ["num_pred"],
    ),
    "exclude with unknown key": (
        with_(exclude=[{"model": "tiny-llava", "gpu": "a100"}]),
        "exclude[0].gpu",
        ["model", "method", "batch_size", "temperature", "repeat", "workload"],
    ),
    "exclude naming a model not in the grid": (
        with_(exclude=[{"model": "tiny-lava"}]),
        "exclude[0].model",
        ["tiny-qwen2.5-vl", "tiny-llava"],
    ),
    "exclude of the baseline": (with_(exclude=[{"method": "ar"}]), "exclude[0].method", ["pld"]),
    "bad shard size": (with_(shard_size=0), "shard_size", ["positive integers"]),
    "bad name": (with_(name="../escape"), "name", ["letters, digits"]),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS), ids=list(BAD_GRIDS))
def test_validation_error_names_file_key_and_allowed_values(tmp_path: Path, case: str) -> None:
    data, key, allowed = BAD_GRIDS[case]
    path = write(tmp_path, data)
    with pytest.raises(GridError) as info:
        load_grid(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}:"), message
    for value in allowed:
        assert value in message, message


def test_exclude_that_removes_everything(tmp_path: Path) -> None:
    path = write(tmp_path, with_(exclude=[{"model": "tiny-llava"}, {"model": "tiny-qwen2.5-vl"}]))
    with pytest.raises(GridError, match=r"grid\.yaml: exclude: .*every cell"):
        load_grid(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: [unclosed", "not valid YAML (line 1"),
        ("- just\n- a list\n", "the grid must be a mapping"),
        ("", "the grid must be a mapping"),
    ],
)
def test_not_a_grid(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(GridError) as info:
        load_grid(path)
    assert str(info.value).startswith(f"{path}: {problem}")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GridError, match="cannot read the grid file"):
        load_grid(tmp_path / "nope.yaml")


def test_yaml_is_data_not_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(path)


def test_workload_path_is_relative_to_the_grid_file(tmp_path: Path) -> None:
    split = tmp_path / "data" / "split"
    split.mkdir(parents=True)
    (split / "mmspec.jsonl").write_text("")
    (tmp_path / "grids").mkdir()
    grid_file = write(tmp_path / "grids", with_(workloads=[{"path": "../data/split", "limit": 6}]))
    grid = load_grid(grid_file)
    assert grid.workloads[0].path == str(split.resolve())
    assert grid.workloads[0].name == "split" and grid.workloads[0].limit == 6
    assert expand(grid)[0].cell_id.endswith("__split")
    # stored absolute, so a manifest parsed anywhere finds the same data
    assert parse_grid(to_dict(grid), "manifest.json", base_dir="/") == grid


def test_ar_is_added_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mmspec"):
        grid = parse_grid(with_(methods=["pld"]), "g.yaml")
    assert grid.methods == ("ar", "pld")
    assert "added the 'ar' baseline" in caplog.text


def test_defaults_and_shorthands() -> None:
    grid = parse_grid(with_(models=["tiny-llava"], batch_sizes=None, temperatures=None))
    assert grid.models[0].id == "tiny-llava" and grid.models[0].dtype == "float32"
    assert not grid.models[0].trust_remote_code
    assert grid.batch_sizes == (1,) and grid.temperatures == (0.0,)
    assert grid.shard_size == 8 and grid.workers is None and grid.threads_per_worker == 1
    assert grid.out == "runs"


def test_expansion_with_excludes() -> None:
    data = with_(
        temperatures=[0, 0.7],
        repeats=2,
        exclude=[
            {"model": "tiny-llava", "method": "pld"},
            {"batch_size": 4, "temperature": 0.7},
        ],
    )
    cells = expand(parse_grid(data))
    # 2 models x 2 methods x 2 batch sizes x 2 temperatures x 2 repeats = 32;
    # rule 1 removes 8, rule 2 removes 8, 2 cells match both
    assert len(cells) == 32 - 8 - 8 + 2
    assert not any(c.model.id == "tiny-llava" and c.method == "pld" for c in cells)
    assert not any(c.batch_size == 4 and c.temperature == 0.7 for c in cells)
    assert len({c.cell_id for c in cells}) == len(cells)
    # every remaining method cell has its AR baseline on the same settings
    keys = {(c.model.id, c.batch_size, c.temperature, c.repeat) for c in cells if c.method == "ar"}
    assert all((c.model.id, c.batch_size, c.temperature, c.repeat) in keys for c in cells)


def test_cell_ids_are_stable_and_readable() -> None:
    data = with_(
        models=[{"id": "tiny-qwen2.5-vl"}, {"id": "Qwen/Qwen2.5-VL-7B-Instruct"}],
        temperatures=[0.0, 0.7],
        repeats=2,
    )
    cells = expand(parse_grid(data))
    ids = [c.cell_id for c in cells]
    assert ids[0] == "tiny-qwen2.5-vl__ar__bs1__t0__r0__synthetic"
    assert "tiny-qwen2.5-vl__pld__bs4__t0.7__r1__synthetic" in ids
    assert "Qwen--Qwen2.5-VL-7B-Instruct__pld__bs4__t0__r0__synthetic" in ids
    assert ids == [c.cell_id for c in expand(parse_grid(data))]
    assert {c.seed for c in cells} == {0}  # the runner mixes repeat into each row's seed
    pld = next(c for c in cells if c.method == "pld")
    assert pld.method_args == {"ngram": 4, "num_pred": 10}


@pytest.mark.parametrize(
    ("shard_size", "batch_size", "expected"), [(8, 1, 8), (8, 4, 8), (8, 3, 9), (8, 16, 16)]
)
def test_chunk_size_is_whole_batches(shard_size: int, batch_size: int, expected: int) -> None:
    assert chunk_size(shard_size, batch_size) == expected


def test_make_shards() -> None:
    grid = parse_grid(with_(batch_sizes=[1, 3]))
    cells = expand(grid)
    samples = make_samples(10)
    shards = make_shards(cells, {"synthetic": samples}, "run-1", shard_size=8)
    for cell in cells:
        mine = [s for s in shards if s.cell == cell]
        assert [s.shard_id for s in mine] == [f"{cell.cell_id}__s{i:03d}" for i in range(len(mine))]
        assert [x for s in mine for x in s.samples] == samples  # each sample once, in order
        size = chunk_size(8, cell.batch_size)
        assert all(len(s.samples) == size for s in mine[:-1])
        assert all(s.run_id == "run-1" for s in mine)
    bs3 = [s for s in shards if s.cell.batch_size == 3]
    assert [len(s.samples) for s in bs3][:2] == [9, 1]
    assert len({s.shard_id for s in shards}) == len(shards)


def test_hash_is_stable(tmp_path: Path) -> None:
    a = load_grid(write(tmp_path, BASE, "a.yaml"))
    reordered = dict(reversed(list(copy.deepcopy(BASE).items())))
    b = load_grid(write(tmp_path, reordered, "b.yaml"))
    assert grid_sha256(a) == grid_sha256(b)
    assert len(grid_sha256(a)) == 64
    # what the manifest stores reads back to the same grid and hash
    again = parse_grid(to_dict(a), "manifest.json")
    assert again == a and grid_sha256(again) == grid_sha256(a)
    # where results go is not what was run
    assert grid_sha256(Grid(**{**a.__dict__, "out": "elsewhere"})) == grid_sha256(a)
    assert grid_sha256(parse_grid(with_(batch_sizes=[1, 2]))) != grid_sha256(a)
