"""Method options are checked by each drafter's own typed schema (its constructor's
annotations) when the grid is validated, not when a worker first builds the drafter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytest

from mmspec.methods.base import LayerIndex, accepts, describe, layer_indices
from mmspec.methods.registry import get_drafter, method_names
from mmspec.orchestrator.grid import GridError, parse_grid
from tests.test_grid import builtin_workloads, with_  # noqa: F401 - fixture


def pld(**args: Any) -> dict[str, Any]:
    return with_(method_args={"pld": args})


@pytest.mark.parametrize(
    ("args", "value"),
    [
        ({"ngram": 2.5}, "2.5"),  # was: TypeError error rows after three model loads
        ({"ngram": True}, "True"),  # was: silently taken as 1
        ({"ngram": "x"}, "'x'"),  # was: "'<=' not supported", never naming ngram
        ({"num_pred": None}, "None"),
        ({"min_ngram": {"n": 2}}, "{'n': 2}"),  # ([2] is a sweep of one value: test_sweep.py)
        ({"match": 1}, "1"),
    ],
)
def test_a_wrong_type_names_the_option_and_its_type(args: dict[str, Any], value: str) -> None:
    (name,) = args
    with pytest.raises(GridError) as info:
        parse_grid(pld(**args), "g.yaml")
    message = str(info.value)
    assert message.startswith(f"g.yaml: method_args.pld.{name}: got {value}; allowed: "), message
    expected = "an integer or null" if name == "min_ngram" else "an integer"
    assert message.endswith("a string" if name == "match" else expected), message


def test_ranges_stay_the_drafters_own() -> None:
    with pytest.raises(GridError, match=r"method_args\.pld: .*min_ngram <= ngram"):
        parse_grid(pld(ngram=2, min_ngram=3), "g.yaml")


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("eagle2", {"threshold": 1}),  # an int is a number
        ("viskip+pld", {"viskip_threshold": 0, "ngram": 3}),  # ViSkip's and the inner's
        ("lookahead", {"cut_token": None, "global_trie": False}),
        ("medusa", {"tree": [[0], [0, 1]]}),
        ("medusa", {"tree": "static"}),
    ],
)
def test_well_typed_options_pass(method: str, args: dict[str, Any]) -> None:
    grid = parse_grid(with_(methods=["ar", method], method_args={method: args}))
    assert grid.method_args[method] == args


@pytest.mark.parametrize(
    ("method", "args", "key", "allowed"),
    [
        ("recycling", {"stops": 1}, "stops", "true or false"),
        ("eagle2", {"threshold": False}, "threshold", "a number"),
        ("viskip+pld", {"ngram": 1.0}, "ngram", "an integer"),
        ("viskip+pld", {"viskip_layers": -1}, "viskip_layers", "a list of layer indices"),
        ("medusa", {"tree": [[0, "1"]]}, "tree", "a string or a list of lists of integers"),
    ],
)
def test_wrong_types_for_other_methods(
    method: str, args: dict[str, Any], key: str, allowed: str
) -> None:
    data = with_(methods=["ar", method], method_args={method: args})
    with pytest.raises(GridError) as info:
        parse_grid(data, "g.yaml")
    assert str(info.value).startswith(f"g.yaml: method_args.{method}.{key}: got ")
    assert str(info.value).endswith(f"allowed: {allowed}")


def test_an_unknown_option_lists_the_known_ones() -> None:
    data = with_(methods=["ar", "viskip+pld"], method_args={"viskip+pld": {"ngrams": 3}})
    with pytest.raises(GridError) as info:
        parse_grid(data, "g.yaml")
    message = str(info.value)
    assert message.startswith("g.yaml: method_args.viskip+pld: unknown option 'ngrams'")
    assert "viskip_threshold, viskip_layers" in message and "ngram, num_pred" in message


@pytest.mark.parametrize("method", method_names())
def test_every_drafters_schema_is_resolved(method: str) -> None:
    # annotations are evaluated (no strings left): a name the schema cannot see would make
    # every value of that option pass unchecked
    schema = get_drafter(method).arg_types()
    assert schema.keys() == set(get_drafter(method).arg_names())
    assert not [name for name, t in schema.items() if isinstance(t, str)]


@pytest.mark.parametrize(
    ("annotation", "value", "ok"),
    [
        (int, 3, True),
        (int, True, False),
        (float, 3, True),
        (float, True, False),
        (bool, 0, False),
        (int | None, None, True),
        (Literal["a", "b"], "a", True),
        (Literal["a", "b"], "c", False),
        (Literal[1, 2], True, False),
        (tuple[int, str], [1, "x"], True),
        (tuple[int, str], [1, 2], False),
        (tuple[int, ...], [1, 2, 3], True),
        (Sequence[int], "12", False),
        (Sequence[LayerIndex], [-1, 2], True),
        (Sequence[LayerIndex], [1.0], False),
        (Any, object(), True),
    ],
)
def test_accepts(annotation: Any, value: Any, ok: bool) -> None:
    assert accepts(annotation, value) is ok


def test_describe_and_layer_indices() -> None:
    assert describe(Literal["a", "b"] | None) == "one of a, b or null"
    assert describe(Sequence[Sequence[int]]) == "a list of lists of integers"
    assert layer_indices(Sequence[LayerIndex] | None, [3, -1]) == [3, -1]
    assert layer_indices(LayerIndex | str, "last") == []
    assert layer_indices(Sequence[int], [3]) == []
