"""Every import points down the layers (README "Layout"); reports read results/ alone.

Imports are read with ast from every module of the package, those inside functions included,
so a lazy import cannot sneak an edge upwards.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# lowest first: a layer may import itself and the layers before it, nothing after it
LAYERS = ("results", "workloads", "models", "methods", "training", "orchestrator", "reports", "cli")
# layers that may import only some of those below them, not all
ONLY = {"reports": {"results", "reports"}}


def package_dirs() -> dict[str, Path]:
    """layer -> its folder, as pyproject.toml maps `mmspec.<layer>`."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name.removeprefix("mmspec."): ROOT / folder for name, folder in mapping.items()}


def imported_layers(source: str, module: str) -> Iterator[tuple[int, str]]:
    """(line, layer) of every `mmspec.<layer>` import in `source`; `module` is its dotted name
    (for relative imports)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                names = [".".join([*base, *(node.module or "").split(".")]).rstrip(".")]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mmspec" and len(parts) > 1:
                yield node.lineno, parts[1]


def violations(layer: str, source: str, module: str) -> list[str]:
    allowed = ONLY.get(layer, set(LAYERS[: LAYERS.index(layer) + 1]))
    return [
        f"{module}:{line} imports mmspec.{other}"
        for line, other in imported_layers(source, module)
        if other not in allowed
    ]


def test_every_layer_is_mapped() -> None:
    assert set(package_dirs()) == set(LAYERS)


def test_imports_point_down() -> None:
    bad: list[str] = []
    checked = 0
    for layer, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            module = ".".join(["mmspec", layer, *rel.parts]).removesuffix(".__init__")
            if path.name == "__init__.py":
                module += ".__init__"  # so `from .x import` resolves inside the package
            bad += violations(layer, path.read_text(encoding="utf-8"), module)
            checked += 1
    assert checked > 60  # every module of every layer was read
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("layer", "source", "expected"),
    [
        ("results", "from mmspec.workloads.sample import Sample", ["mmspec.workloads"]),
        ("models", "def f():\n    from mmspec.methods.engine import Engine", ["mmspec.methods"]),
        ("methods", "import mmspec.orchestrator.grid", ["mmspec.orchestrator"]),
        ("reports", "from mmspec.orchestrator.store import write_shard", ["mmspec.orchestrator"]),
        ("reports", "from mmspec.workloads import Sample", ["mmspec.workloads"]),
        ("reports", "from mmspec.results.layout import result_files", []),
        ("methods", "from mmspec.models.target import Target", []),
        ("cli", "from mmspec.reports import write_report\nimport mmspec.training", []),
    ],
)
def test_a_planted_import_is_caught(layer: str, source: str, expected: list[str]) -> None:
    found = violations(layer, source, f"mmspec.{layer}.planted")
    assert [v.split(" imports ")[1] for v in found] == expected


def test_relative_imports_resolve_to_their_layer() -> None:
    source = "from ..orchestrator import grid\nfrom .sample import Sample"
    found = list(imported_layers(source, "mmspec.workloads.registry"))
    assert found == [(1, "orchestrator"), (2, "workloads")]


@pytest.mark.parametrize(
    "module",
    [
        "mmspec.orchestrator.scheduler",
        "mmspec.orchestrator.grid",
        "mmspec.models.prompting",
        "mmspec.reports",
        "mmspec.results.layout",
    ],
)
def test_driver_side_modules_start_without_torch(module: str) -> None:
    """The scheduler builds the runner (torch, transformers) only inside a worker; reports and
    the results format never need it."""
    code = f"import sys, {module}; print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
