"""MMSpec's method taxonomy: how a method drafts, whether it reads the image, whether it is trained.

MMSpec sorts the methods it benchmarks along three axes - drafting (a single linear chain of
guesses per step, or a tree of alternatives), vision (whether drafting looks at the image:
vision-aware, or works on text alone: vision-agnostic) and training (a trained draft model or
head, or none) - and reads its findings along them, e.g. speedup against batch size for
vision-aware against vision-agnostic methods.

The taxonomy is a property of the methods (`Drafter.family` in mmspec.methods.base), but the
reports may not import the methods. So the orchestrator records each method's family in the
manifest (`taxonomy`, method or variant name -> Family.to_dict()), with the method's options
applied (Token Recycling drafts a chain by default, a tree with `tree: 2.2.2`). For a run whose
manifest has none (an imported run, a run from before manifests had one) KNOWN gives the
built-in methods' families at their default options; tests/test_taxonomy.py checks it against
the registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mmspec.results.ids import VISKIP_PREFIX

TAXONOMY = "taxonomy"  # the manifest key
Drafting = Literal["linear", "tree"]
VISION_AWARE, VISION_AGNOSTIC = "vision-aware", "vision-agnostic"


@dataclass(frozen=True)
class Family:
    """Where a method sits in MMSpec's taxonomy."""

    drafting: Drafting  # "linear": one chain of draft tokens per step; "tree": alternatives
    vision_aware: bool  # drafting (or deciding whether to draft) looks at the image
    training_free: bool  # no trained draft model or head

    @property
    def vision(self) -> str:
        return VISION_AWARE if self.vision_aware else VISION_AGNOSTIC

    @property
    def training(self) -> str:
        return "training-free" if self.training_free else "training-based"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as the manifest stores it."""
        return {
            "drafting": self.drafting,
            "vision_aware": self.vision_aware,
            "training_free": self.training_free,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Family | None:
        """A manifest's record; None where it is not one (hand-edited, another version)."""
        if not isinstance(data, Mapping):
            return None
        drafting = data.get("drafting")
        aware, free = data.get("vision_aware"), data.get("training_free")
        if drafting not in ("linear", "tree") or not isinstance(aware, bool):
            return None
        if not isinstance(free, bool):
            return None
        return cls(drafting, aware, free)


# The built-in methods at their default options (README's methods table). `ar` drafts nothing
# and has no family. ViSkip over X is derived from X (see family_of).
KNOWN: dict[str, Family] = {
    "pld": Family("linear", vision_aware=False, training_free=True),
    "sam": Family("linear", vision_aware=False, training_free=True),
    "lookahead": Family("linear", vision_aware=False, training_free=True),  # MMSpec's rule
    "recycling": Family("linear", vision_aware=False, training_free=True),  # MMSpec's chain
    "medusa": Family("tree", vision_aware=False, training_free=False),
    "eagle": Family("tree", vision_aware=False, training_free=False),
    "eagle2": Family("tree", vision_aware=False, training_free=False),
    "eagle3": Family("tree", vision_aware=False, training_free=False),
    "vispec": Family("tree", vision_aware=True, training_free=False),
    "msd": Family("tree", vision_aware=True, training_free=False),
}


def viskip_family(inner: Family) -> Family:
    """ViSkip over a method: the method's drafting and training, and vision-aware, since
    ViSkip decides at each step from the target's attention on the image whether to draft."""
    return Family(inner.drafting, vision_aware=True, training_free=inner.training_free)


def family_of(
    method: str, recorded: Mapping[str, Any] | None = None, base: str | None = None
) -> Family | None:
    """`method`'s family: as `recorded` (a manifest's `taxonomy`, by method or variant name)
    has it, else from KNOWN; a variant (results/variants.py) not recorded is placed by its
    registered method `base`. None for `ar` and for a method none of them knows."""
    found = Family.from_dict((recorded or {}).get(method))
    if found is not None:
        return found
    if method in KNOWN:
        return KNOWN[method]
    if method.startswith(VISKIP_PREFIX):
        inner = family_of(method.removeprefix(VISKIP_PREFIX), recorded)
        if inner is not None:
            return viskip_family(inner)
    if base is not None and base != method:
        return family_of(base, recorded)
    return None


def taxonomy_of(
    manifest: Mapping[str, Any],
    methods: Iterable[str],
    bases: Mapping[str, str] | None = None,
) -> dict[str, Family | None]:
    """The family of each of `methods` in a run with this manifest (see family_of); `bases`
    gives a variant's registered method."""
    recorded = manifest.get(TAXONOMY)
    recorded = recorded if isinstance(recorded, Mapping) else None
    bases = bases or {}
    return {method: family_of(method, recorded, bases.get(method)) for method in methods}


def known_taxonomy(methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A manifest's `taxonomy` for `methods` from KNOWN alone (an importer's record: it knows
    method names, not classes); methods KNOWN cannot place are left out."""
    families = {method: family_of(method) for method in methods}
    return {m: f.to_dict() for m, f in families.items() if f is not None}
