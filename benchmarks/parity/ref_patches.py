"""Run-time patches that let MMSpec's code (written for CUDA) run on a CPU, and nothing else.

Imported by ref_runner.py inside the reference venv, before any MMSpec module. The checkout
given with --reference is never written to: `install()` puts an import hook in front of it
that edits the source text of the listed modules as they load. Each edit must match exactly
as often as it says, so a different MMSpec revision fails loudly instead of running unpatched.
Every patch here is listed, with why, in README.md ("Run-time patches").
"""

from __future__ import annotations

import fnmatch
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass


@dataclass(frozen=True)
class SourcePatch:
    modules: str  # fnmatch pattern over module names
    old: str
    new: str
    count: int  # exact number of occurrences in each matching module
    why: str


SOURCE_PATCHES = (
    SourcePatch(
        "method.*.kv_cache",
        'assert i.type == "cuda"  # TODO',
        'assert i.type in ("cuda", "cpu")',
        1,
        "initialize_past_key_values asserts every layer sits on a GPU; its CPU tensors work",
    ),
    SourcePatch(
        "evaluation.utils",
        '"cuda:0"',
        '"cpu"',
        1,
        "build_prompt moves the processor's output to cuda:0; the model is on the CPU",
    ),
)


class _PatchingLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname: str, path: str, patches: list[SourcePatch]) -> None:
        super().__init__(fullname, path)
        self.patches = patches

    def get_data(self, path: str) -> bytes:
        data = super().get_data(path)
        if not path.endswith(".py"):
            return data  # a cached .pyc: never used, see source_to_code below
        text = data.decode("utf-8")
        for p in self.patches:
            found = text.count(p.old)
            if found != p.count:
                raise RuntimeError(
                    f"parity patch for {self.name}: expected {p.count} x {p.old!r}, found "
                    f"{found}; the reference checkout is not the revision these patches fit"
                )
            text = text.replace(p.old, p.new)
        return text.encode("utf-8")

    def path_stats(self, path: str):  # no bytecode cache: the patched text must be compiled
        raise OSError("parity: patched modules are always compiled from source")


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        patches = [p for p in SOURCE_PATCHES if fnmatch.fnmatchcase(fullname, p.modules)]
        if not patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _PatchingLoader(fullname, spec.origin, patches)
        return spec


def _stub_datasets() -> None:
    """evaluation/utils.py imports `datasets.Dataset` for a loader the harness never calls;
    the stub goes in after transformers is imported, so transformers still sees no
    `datasets` package (a half-present one breaks its availability checks)."""
    import transformers  # noqa: F401

    if "datasets" not in sys.modules:
        stub = types.ModuleType("datasets")

        class Dataset(list):
            @classmethod
            def from_list(cls, rows):
                return cls(rows)

        stub.Dataset = Dataset
        sys.modules["datasets"] = stub


def install() -> None:
    sys.dont_write_bytecode = True  # no __pycache__ in the user's checkout either
    if not any(isinstance(f, _PatchingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchingFinder())
    _stub_datasets()
