"""MMSpec's taxonomy of the methods: declared by the drafters, recorded in the manifest by the
orchestrator (the reports cannot ask the registry), and known by name for runs whose manifest
has none (imported runs); the known table must agree with the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmspec.methods.registry import get_drafter, method_names
from mmspec.orchestrator.grid import parse_grid
from mmspec.orchestrator.manifest import build_manifest
from mmspec.reports.answer_import import ImportSettings, import_answers
from mmspec.results.layout import read_manifest
from mmspec.results.taxonomy import (
    KNOWN,
    TAXONOMY,
    Family,
    family_of,
    known_taxonomy,
    taxonomy_of,
)
from tests.test_import import mmspec_dir  # noqa: F401 (a fixture)

DRAFTERS = [m for m in method_names() if m != "ar"]


@pytest.mark.parametrize("method", DRAFTERS)
def test_known_families_agree_with_the_registry(method: str) -> None:
    assert family_of(method) == get_drafter(method).family({}), method


def test_every_built_in_method_is_known() -> None:
    plain = {m for m in DRAFTERS if not m.startswith("viskip+")}
    assert plain <= set(KNOWN), plain - set(KNOWN)
    assert family_of("ar") is None and family_of("no-such-method") is None


def test_paper_axes() -> None:
    """The methods MMSpec names: vision-aware ones, trained ones, tree drafters."""
    aware = {m for m, f in KNOWN.items() if f.vision_aware}
    trained = {m for m, f in KNOWN.items() if not f.training_free}
    trees = {m for m, f in KNOWN.items() if f.drafting == "tree"}
    assert aware == {"vispec", "msd"}
    assert trained == {"medusa", "eagle", "eagle2", "eagle3", "vispec", "msd"}
    assert trees == trained  # the trained heads draft trees; the training-free ones chains
    # ViSkip reads the image to decide whether to draft: vision-aware over any method
    assert family_of("viskip+pld") == Family("linear", vision_aware=True, training_free=True)
    assert get_drafter("viskip+eagle").vision_aware


@pytest.mark.parametrize(
    ("method", "args", "drafting"),
    [
        ("recycling", {"tree": "2.2.2"}, "tree"),
        ("recycling", {"tree": "chain"}, "linear"),
        ("lookahead", {"rule": "mmspec_tree"}, "tree"),
        ("lookahead", {"rule": "best_first"}, "tree"),
        ("eagle", {"tree": "static"}, "tree"),
        ("viskip+recycling", {"tree": "2.2.2", "viskip_threshold": 0.3}, "tree"),
    ],
)
def test_options_decide_the_drafting(method: str, args: dict, drafting: str) -> None:
    assert get_drafter(method).family(args).drafting == drafting


def test_manifest_records_the_families_with_the_grids_options() -> None:
    grid = parse_grid(
        {
            "name": "t",
            "workloads": [{"builtin": "synthetic"}],
            "models": [{"id": "tiny-qwen2.5-vl"}],
            "methods": ["ar", "recycling", "vispec", "viskip+pld"],
            "method_args": {"recycling": {"tree": "2.2.2"}},
        },
        "t.yaml",
    )
    manifest = build_manifest("run", grid, {"synthetic": []})
    assert set(manifest[TAXONOMY]) == {"recycling", "vispec", "viskip+pld"}
    found = taxonomy_of(manifest, ["ar", "recycling", "vispec", "viskip+pld"])
    assert found["ar"] is None
    assert found["recycling"] == Family("tree", vision_aware=False, training_free=True)
    assert found["vispec"] == KNOWN["vispec"]
    assert found["viskip+pld"] == Family("linear", vision_aware=True, training_free=True)


def test_a_hand_edited_record_reads_as_unknown() -> None:
    bad = {TAXONOMY: {"pld": {"drafting": "zigzag"}, "sam": "tree"}}
    # fall back to what the names say rather than stop the report
    assert taxonomy_of(bad, ["pld", "sam"]) == {"pld": KNOWN["pld"], "sam": KNOWN["sam"]}
    assert known_taxonomy(["eagle", "custom"]) == {"eagle": KNOWN["eagle"].to_dict()}


def test_an_imported_run_records_the_names_it_knows(
    mmspec_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    run = import_answers([mmspec_dir], tmp_path, ImportSettings("mmspec")).run_dir
    recorded = read_manifest(run)[TAXONOMY]
    assert set(recorded) == {"eagle", "msd", "viskip+vispec"}
    assert Family.from_dict(recorded["viskip+vispec"]) == Family("tree", True, False)
