"""Method variants: one registered method run with one setting of its arguments.

A grid may run a method several times with different arguments: a named variant
(`{name: eagle2-wide, method: eagle2, args: {depth: 5}}`) or a list-valued argument that
expands to one variant per value (`viskip+pld: {viskip_threshold: [0.2, 0.5]}` gives
`viskip+pld[viskip_threshold=0.2]` and `viskip+pld[viskip_threshold=0.5]`). Results carry the
variant's name as `method` (what every table and cell id groups by, so two variants are never
pooled), the registered method as `base_method` and the arguments the drafter ran with, its
defaults filled in, as `method_args` (canonical JSON): what `compare` and `history` match by.
A method run once, without a variant, keeps its own name: `method == base_method`.

The orchestrator builds variants (it knows each drafter's defaults); the manifest records them
(`METHOD_VARIANTS`) and the reports read them back with `variants_of`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

METHOD_VARIANTS = "method_variants"  # the manifest key: a list of Variant.to_dict()


@dataclass(frozen=True)
class Variant:
    """One method with one setting of its arguments, as results name it."""

    # what results call it: "eagle2", "eagle2-wide", "viskip+pld[viskip_threshold=0.2]"
    name: str
    method: str  # the registered method it runs
    args: Mapping[str, Any]  # one value each, as the grid gives them: the drafter's arguments
    resolved: Mapping[str, Any]  # `args` with the method's defaults filled in
    entry: str = ""  # the `methods` entry it came from (a method's or a named variant's name)
    swept: tuple[str, ...] = ()  # the arguments a list in the grid varied, in the grid's order
    # the JSON of `resolved`, computed once: what results record and runs are matched by
    resolved_json: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolved_json", canonical_args(self.resolved))
        if not self.entry:
            object.__setattr__(self, "entry", self.name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as the manifest stores it."""
        return {
            "name": self.name,
            "method": self.method,
            "entry": self.entry,
            "args": dict(self.args),
            "resolved_args": dict(self.resolved),
            "swept": list(self.swept),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Variant | None:
        """A manifest's record; None where it is not one (hand-edited, another version)."""
        if not isinstance(data, Mapping):
            return None
        name, method = data.get("name"), data.get("method")
        args, resolved = data.get("args"), data.get("resolved_args")
        swept = data.get("swept") or []
        if not (isinstance(name, str) and isinstance(method, str)):
            return None
        if not (isinstance(args, Mapping) and isinstance(resolved, Mapping)):
            return None
        if not isinstance(swept, list) or not all(isinstance(s, str) for s in swept):
            return None
        entry = data.get("entry") if isinstance(data.get("entry"), str) else name
        return cls(name, method, dict(args), dict(resolved), entry, tuple(swept))


def canonical_args(args: Mapping[str, Any]) -> str:
    """Arguments as one canonical JSON text (keys sorted, no spaces): equal settings, equal text."""
    return json.dumps(dict(args), sort_keys=True, separators=(",", ":"), allow_nan=False)


def arg_text(value: Any) -> str:
    """An argument's value as a variant's name spells it: 0.2, 5, true, null, latest, [-1,-2]."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def variant_name(entry: str, swept: Sequence[tuple[str, Any]]) -> str:
    """`entry` with the swept (argument, value) pairs: `viskip+pld[viskip_threshold=0.2]`;
    `entry` itself when nothing is swept."""
    if not swept:
        return entry
    return f"{entry}[{','.join(f'{k}={arg_text(v)}' for k, v in swept)}]"


def variants_of(manifest: Mapping[str, Any]) -> dict[str, Variant]:
    """The run's variants by name, from its manifest ({} for a run from before variants, or
    one whose record is unreadable)."""
    records = manifest.get(METHOD_VARIANTS)
    if not isinstance(records, list):
        return {}
    found = [Variant.from_dict(r) for r in records]
    return {v.name: v for v in found if v is not None}


def varying_args(settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The arguments whose value is not the same in every one of `settings` (resolved argument
    mappings of one method's variants), in the order first seen: what tells the variants apart."""
    names = list(dict.fromkeys(k for s in settings for k in s))
    # compared as JSON text, as results record them: lists are then values like any other
    texts = [{k: json.dumps(v, sort_keys=True) for k, v in s.items()} for s in settings]
    return [k for k in names if len({t.get(k) for t in texts}) > 1]
