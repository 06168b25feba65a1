"""Grid files that must fail fast and say why: YAML aliases, keys given twice, bytes that are
not UTF-8, values too large to quote; and the optional `shard_timeout_s` key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmspec.orchestrator.grid import GridError, grid_sha256, load_grid, parse_grid, to_dict
from mmspec.orchestrator.grid_text import QUOTE_CHARS
from tests.test_grid import BASE, builtin_workloads, with_, write  # noqa: F401 - fixture

GRID_TEXT = """\
name: t
workloads: [{builtin: synthetic, limit: 6}]
models: [tiny-llava]
methods: [ar, pld]
"""


def grid_file(tmp_path: Path, extra: str, head: str = GRID_TEXT) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(head + extra, encoding="utf-8")
    return path


def alias_bomb(indent: int, levels: int = 9, width: int = 9) -> str:
    """`levels` anchored lists, each `width` aliases of the one before: width**levels leaves
    (9**9: what expanded took gigabytes and ~43 s before failing)."""
    pad = " " * indent
    lines = [f"{pad}- &l0 [" + ", ".join(["x"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"{pad}- &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


BOMBS = {  # where the issue found them: the grid's text with a bomb there
    "seed": GRID_TEXT + "seed:\n" + alias_bomb(2),
    "name": GRID_TEXT.replace("name: t\n", "") + "name:\n" + alias_bomb(2),
    "method_args.pld.ngram": GRID_TEXT + "method_args:\n  pld:\n    ngram:\n" + alias_bomb(6),
    "exclude[0].method": GRID_TEXT + "exclude:\n  - method:\n" + alias_bomb(6),
}


@pytest.mark.parametrize("key", list(BOMBS))
def test_alias_bombs_are_refused_at_once(tmp_path: Path, key: str) -> None:
    path = grid_file(tmp_path, BOMBS[key], head="")
    first_anchor = next(i for i, line in enumerate(BOMBS[key].splitlines(), 1) if "&l0" in line)
    with pytest.raises(GridError) as info:
        load_grid(path)
    assert str(info.value) == f"YAML aliases and anchors are not supported: {path}:{first_anchor}"


def test_a_single_alias_is_refused_too(tmp_path: Path) -> None:
    path = grid_file(tmp_path, "seed: &s 1\nrepeats: *s\n")
    with pytest.raises(GridError, match=rf"not supported: {path}:5$"):
        load_grid(path)


def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path: Path) -> None:
    path = grid_file(tmp_path, "seed: 1\nmethods: [ar]\n")
    with pytest.raises(GridError) as info:
        load_grid(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "key 'methods' given twice (lines 4 and 6)" in message


def test_a_nested_key_given_twice(tmp_path: Path) -> None:
    path = grid_file(tmp_path, "method_args:\n  pld: {ngram: 3, ngram: 5}\n")
    with pytest.raises(GridError, match=r"key 'ngram' given twice \(lines 6 and 6\)"):
        load_grid(path)


def test_bytes_that_are_not_utf8_name_the_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(GridError) as info:
        load_grid(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not UTF-8 text")
    assert "byte 0xe9 at byte offset 9" in message


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ('seed: "\\ud800"\n', "lone surrogate"),
        ("seed: 1" + "0" * 5000 + "\n", "not valid YAML"),
        ("seed: " + "[" * 5000 + "]" * 5000 + "\n", "not valid YAML"),
    ],
    ids=["lone surrogate", "huge integer", "deep nesting"],
)
def test_yaml_the_loader_cannot_hold_is_a_grid_error(
    tmp_path: Path, extra: str, problem: str
) -> None:
    path = grid_file(tmp_path, extra)
    with pytest.raises(GridError, match=problem):
        load_grid(path)


LONG = "/" + "x" * 5000  # "/": not a valid name either


# grid.py's own messages quote at most QUOTE_CHARS of a value
QUOTED_BY_THE_GRID = [
    {"name": LONG},
    {"seed": list(range(5000))},
    {"seed": {"deep": [[[[[LONG]]]]]}},
    {"method_args": {"pld": {"ngram": LONG}}},
    {"method_args": {"pld": {LONG: 1}}},
    {"method_args": {"pld": [LONG]}},
    {"methods": ["ar", LONG]},
    {"models": [{"id": "tiny-llava", "dtype": LONG}]},
    {"exclude": [{"method": [[LONG] * 100] * 100}]},
    {"workloads": [{"builtin": "synthetic", "topics": [LONG]}]},
    {"workloads": [{"path": LONG}]},
    {"temperatures": [{"t": LONG}]},
]


@pytest.mark.parametrize("changes", QUOTED_BY_THE_GRID)
def test_messages_quote_values_briefly(changes: dict) -> None:
    with pytest.raises(GridError) as info:
        parse_grid(with_(**changes), "g.yaml")
    message = str(info.value)
    assert "x" * (QUOTE_CHARS + 1) not in message, message
    assert len(message) < 500, message


@pytest.mark.parametrize(
    ("changes", "start"),
    [
        ({"method_args": {"pld": {"match": LONG}}}, "method_args.pld: bad arguments for pld:"),
        ({"models": [{"id": "./" + LONG}]}, "models[0].id: model path ./"),
    ],
)
def test_messages_from_elsewhere_are_bounded(changes: dict, start: str) -> None:
    # a drafter's or the model registry's message quotes the whole value: the grid repeats a
    # bounded part of it (and a path too long for the file system is an error, not a crash)
    with pytest.raises(GridError) as info:
        parse_grid(with_(**changes), "g.yaml")
    message = str(info.value)
    assert message.startswith(f"g.yaml: {start}"), message
    assert len(message) < 500, message


# ----------------------------------------------------------------------------- shard_timeout_s


def test_shard_timeout_defaults_to_derived_and_reaches_the_manifest() -> None:
    grid = parse_grid(with_())
    assert grid.shard_timeout_s is None
    assert to_dict(grid)["shard_timeout_s"] is None
    timed = parse_grid(with_(shard_timeout_s=900))
    assert timed.shard_timeout_s == 900.0 and isinstance(timed.shard_timeout_s, float)
    assert to_dict(timed)["shard_timeout_s"] == 900.0
    assert parse_grid(to_dict(timed), "manifest.json") == timed
    # how long a shard may take is not what was measured: the hash ignores it
    assert grid_sha256(timed) == grid_sha256(grid)


def test_old_manifests_without_the_key_still_parse(tmp_path: Path) -> None:
    old = to_dict(parse_grid(with_()))
    del old["shard_timeout_s"]
    grid = parse_grid(old, "manifest.json")
    assert grid.shard_timeout_s is None
    assert grid_sha256(grid) == grid_sha256(load_grid(write(tmp_path, BASE)))


@pytest.mark.parametrize("value", [0, -5, "600", True, float("inf"), [600]])
def test_bad_shard_timeout(value: object) -> None:
    with pytest.raises(GridError, match=r"g\.yaml: shard_timeout_s: .*positive numbers"):
        parse_grid(with_(shard_timeout_s=value), "g.yaml")


def test_shard_timeout_from_a_file(tmp_path: Path) -> None:
    grid = load_grid(grid_file(tmp_path, "shard_timeout_s: 1.5\n"))
    assert grid.shard_timeout_s == 1.5
    assert yaml.safe_load(yaml.safe_dump(to_dict(grid)))["shard_timeout_s"] == 1.5
