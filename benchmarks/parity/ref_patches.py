"""Run-time patches that let MMSpec's code (written for CUDA) run on a CPU, and switches for
the opt-in reference fixes (off unless an adapter turns one on).

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class SourcePatch:
    modules: str  # fnmatch pattern over module names
    old: str
    new: str
    count: int  # exact number of occurrences in each matching module
    why: str
    exclude: tuple[str, ...] = ()  # modules the pattern matches that the patch skips


# Opt-in reference fixes (README, "Reference fixes"): each source edit below keeps MMSpec's
# behaviour unless an adapter switches its fix on for the generations it runs (`fixes`).
FIXES: dict[str, bool] = {
    "llava_kv": False,
    "no_repeat_stop": False,
    "recycling_no_guards": False,
    "recycling_chunk_positions": False,
    "eager_tree_mask": False,
    "vskip_attentions": False,
}


# Qwen2-VL's vision-start and image-pad ids, which MMSpec's MSD head code hard-codes (151652,
# 151655) to find the image block; an adapter sets the target's own (the tiny Qwen's are 3, 5)
QWEN_IMAGE_IDS: tuple[int, int] = (151652, 151655)


def _fix(name: str) -> str:
    return f'__import__("ref_patches").FIXES["{name}"]'


@contextmanager
def fixes(names: tuple[str, ...]) -> Iterator[None]:
    """Switch the named fixes on for the duration (and off again after)."""
    for name in names:
        if name not in FIXES:
            raise KeyError(f"unknown reference fix {name!r}; known: {', '.join(FIXES)}")
        FIXES[name] = True
    try:
        yield
    finally:
        for name in names:
            FIXES[name] = False


SOURCE_PATCHES = (
    SourcePatch(
        "method.*.kv_cache",
        'assert i.type == "cuda"  # TODO',
        'assert i.type in ("cuda", "cpu")',
        1,
        "initialize_past_key_values asserts every layer sits on a GPU; its CPU tensors work",
        exclude=("method.msd.kv_cache",),  # MSD's has no such assert
    ),
    SourcePatch(
        "evaluation.utils",
        '"cuda:0"',
        '"cpu"',
        1,
        "build_prompt moves the processor's output to cuda:0; the model is on the CPU",
    ),
    SourcePatch(
        "method.msd.cnets",
        "151652",
        '__import__("ref_patches").QWEN_IMAGE_IDS[0]',
        9,
        "MSD's head finds a Qwen image block by Qwen2-VL's vision-start id, hard-coded; the "
        "adapter sets the target's (unchanged on the 7B, whose id it is)",
    ),
    SourcePatch(
        "method.msd.cnets",
        "151655",
        '__import__("ref_patches").QWEN_IMAGE_IDS[1]',
        1,
        "the same for the image-pad id it counts the block's length by",
    ),
    # ---- switches for the opt-in fixes (no change while the switch is off) ----
    SourcePatch(
        "method.pld.spec_model_pld",
        "(not is_llava)",
        f"(not is_llava or {_fix('llava_kv')})",
        4,
        "fix llava_kv: on LLaVA, PLD never sets the cache length back after a verification, "
        "so the keys of rejected drafts stay in the cache the next step attends to",
    ),
    SourcePatch(
        "method.recycling.spec_model_recycling",
        "(not is_llava)",
        f"(not is_llava or {_fix('llava_kv')})",
        3,
        "fix llava_kv: the same in Token Recycling",
    ),
    SourcePatch(
        "method.pld.spec_model_pld",
        "if _has_repetitive_tail(",
        f"if not {_fix('no_repeat_stop')} and _has_repetitive_tail(",
        1,
        "fix no_repeat_stop: PLD ends a generation whose tail repeats an n-gram 5 times",
    ),
    SourcePatch(
        "method.recycling.spec_model_recycling",
        "if _has_repetitive_tail(",
        f"if not {_fix('no_repeat_stop')} and _has_repetitive_tail(",
        1,
        "fix no_repeat_stop: the same in Token Recycling",
    ),
    SourcePatch(
        "method.recycling.spec_model_recycling",
        "_fb_cyc = any(",
        f"_fb_cyc = not {_fix('recycling_no_guards')} and any(",
        1,
        "fix recycling_no_guards: a no-draft step replaces an argmax that continues a "
        "2..20-gram repeat with the next-best token",
    ),
    SourcePatch(
        "method.recycling.spec_model_recycling",
        "_pa_cyc = any(",
        f"_pa_cyc = not {_fix('recycling_no_guards')} and any(",
        1,
        "fix recycling_no_guards: the same for the accepted tokens of a verified draft",
    ),
    SourcePatch(
        "method.recycling.modeling_qwen2_5_vl_kv",
        """            cache_position = torch.tensor(
                [past_key_values[0][0].current_length], device=inputs_embeds.device
            )
""",
        f"""            cache_position = torch.tensor(
                [past_key_values[0][0].current_length], device=inputs_embeds.device
            )
            if {_fix("recycling_chunk_positions")}:
                cache_position = torch.arange(
                    past_key_values[0][0].current_length,
                    past_key_values[0][0].current_length + inputs_embeds.shape[1],
                    device=inputs_embeds.device,
                )
""",
        1,
        "fix recycling_chunk_positions: its Qwen2.5-VL copy gives a multi-token chunk a "
        "one-element cache_position, so the causal mask lets every chunk token see only "
        "the prefix and the chunk's first token (method/vispec's copy has the arange)",
    ),
    SourcePatch(
        "method.vispec.modeling_qwen2_5_vl_kv",
        'and self.config._attn_implementation != "eager"',
        f'and (self.config._attn_implementation != "eager" or {_fix("eager_tree_mask")})',
        1,
        "fix eager_tree_mask: its Qwen2.5-VL copy applies the tree mask only when attention "
        "is not eager, so under eager (what the vskip scripts load) a tree's nodes see every "
        "other branch",
    ),
    SourcePatch(
        "method.eagle.modeling_qwen2_5_vl_kv",
        'and self.config._attn_implementation != "eager"',
        f'and (self.config._attn_implementation != "eager" or {_fix("eager_tree_mask")})',
        1,
        "fix eager_tree_mask: the same in method/eagle's copy, which MSD verifies with (its "
        "scripts load eager attention)",
    ),
    SourcePatch(
        "method.msd_vskip.ea_model",
        "if _has_repetitive_tail(",
        f"if not {_fix('no_repeat_stop')} and _has_repetitive_tail(",
        1,
        "fix no_repeat_stop: MSD-vskip ends a generation (after 20 tokens) whose tail repeats "
        "any 1..64-gram twice in a row",
    ),
    SourcePatch(
        "method.vispec.spec_model_ours",
        "            return None, orig, hidden_states\n",
        f"            return (outputs if {_fix('vskip_attentions')} else None), orig, "
        "hidden_states\n",
        1,
        "fix vskip_attentions: SpecModel.forward returns None where the target's outputs "
        "go, so vispec_vskip's gate reads no attentions and its ratio is always 0 (it never "
        "skips)",
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
        patches = [
            p
            for p in SOURCE_PATCHES
            if fnmatch.fnmatchcase(fullname, p.modules) and fullname not in p.exclude
        ]
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
