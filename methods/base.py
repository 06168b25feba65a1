"""The drafter interface every method implements (one context in, one DraftTree per row out)."""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NewType, Union, get_args, get_origin

import torch

from mmspec.methods.tree import DraftTree
from mmspec.models.feature_taps import Feature
from mmspec.results.taxonomy import Family

if TYPE_CHECKING:
    from mmspec.models.target import Target

# A decoder layer of the target, negative from the end: annotate a constructor option with it
# (or a sequence of it) and grid validation checks it against each model's layer count.
LayerIndex = NewType("LayerIndex", int)


@dataclass
class DraftContext:
    """What a drafter may look at, for the rows of the batch still generating.

    `tokens[i]` is the whole sequence of active row i without padding: prompt ids (image
    placeholder tokens included), then every generated token, ending with the pending token
    that the next verification will feed (the root of the draft tree).
    """

    rows: list[int]  # (active,) index of each active row in the batch it started in
    tokens: list[list[int]]  # (active, len_i)
    prompt_lens: list[int]  # (active,)
    temperature: float = 0.0
    # what the engine measured for the drafter: "vision_score" (per row) when it asked for
    # it; in `begin` only, "features": the prompt's `Drafter.features`, each (active, P, width)
    # left padded like the prompt (row i's are the last prompt_lens[i] positions)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutcome:
    """What the last verification showed, handed to `Drafter.update`."""

    trees: list[DraftTree]  # (active,) the trees that were verified
    paths: list[list[int]]  # (active,) accepted node indices, root excluded
    emitted: list[list[int]]  # (active,) accepted draft tokens, then the bonus token
    # (active, q, vocab) target logits after the root (q-index 0) and after each node i (i + 1)
    logits: torch.Tensor
    # the drafter's `features` of the same q positions, each (active, q, width); None if none
    features: dict[Feature, torch.Tensor] | None = None


def kept_rows(before: list[int], now: list[int]) -> list[int] | None:
    """Where the rows of `now` were in `before` (the engine drops finished rows between
    calls); None when nothing changed. For drafters keeping per-row state."""
    return None if now == before else [before.index(r) for r in now]


class Drafter:
    """Base class: propose draft trees, optionally learn from what was accepted.

    Life cycle: construct from method args -> `load(target)` once per worker -> per batch
    `begin(ctx)`, then per step `propose(ctx)` and `update(ctx, accepted)`; under continuous
    batching `join(ctx)` between steps whenever rows join.
    """

    name: ClassVar[str] = ""
    training_free: ClassVar[bool] = True
    vision_aware: ClassVar[bool] = False
    # MMSpec's drafting axis: a tree of alternatives per step (True) or one chain (False);
    # a drafter whose shape depends on its options overrides drafts_tree instead
    tree_drafting: ClassVar[bool] = False
    # the engine then puts each row's attention mass on image tokens (of the position that
    # predicted the pending token) in ctx.extras["vision_score"], from `score_layers`
    needs_vision_score: ClassVar[bool] = False
    score_layers: tuple[int, ...] = (-1,)
    # target features the drafter reads (models/feature_taps.py), set by `load` at the latest:
    # the engine taps them at prefill (-> begin) and at every verification (-> update)
    features: tuple[Feature, ...] = ()

    @classmethod
    def arg_types(cls) -> dict[str, Any]:
        """The method_args a grid may give this drafter and their types: its constructor's
        keywords and annotations (Any where none), the one schema of every method's options."""
        return {
            p.name: Any if p.annotation is p.empty else p.annotation
            for p in inspect.signature(cls.__init__, eval_str=True).parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    @classmethod
    def arg_defaults(cls) -> dict[str, Any]:
        """The defaults of the options that have one, from the same constructor signature: what
        an option left out of a grid resolves to."""
        return {
            p.name: p.default
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.default is not p.empty
        }

    @classmethod
    def arg_names(cls) -> list[str]:
        """The method_args a grid may give this drafter (its constructor's keywords)."""
        return list(cls.arg_types())

    @classmethod
    def check_args(cls, args: Mapping[str, Any]) -> None:
        """Raise MethodArgError for the first option the constructor does not take or whose
        value does not have its annotated type; ranges stay the constructor's to check."""
        schema = cls.arg_types()
        for name, value in args.items():
            if name not in schema:
                raise MethodArgError(name, value, "", list(schema))
            if not accepts(schema[name], value):
                raise MethodArgError(name, value, describe(schema[name]), list(schema))

    @classmethod
    def layer_args(cls, args: Mapping[str, Any]) -> dict[str, list[int]]:
        """The layer indices (`LayerIndex` options) among `args`, by option name."""
        schema = cls.arg_types()
        found = {name: layer_indices(schema.get(name, Any), v) for name, v in args.items()}
        return {name: layers for name, layers in found.items() if layers}

    @classmethod
    def drafts_tree(cls, args: Mapping[str, Any]) -> bool:
        """Whether this drafter, given these method_args, drafts trees rather than chains."""
        return cls.tree_drafting

    @classmethod
    def family(cls, args: Mapping[str, Any]) -> Family:
        """Where this drafter, given these method_args, sits in MMSpec's taxonomy (the
        manifest records it for the reports: mmspec.results.taxonomy)."""
        drafting = "tree" if cls.drafts_tree(args) else "linear"
        return Family(drafting, vision_aware=cls.vision_aware, training_free=cls.training_free)

    def load(self, target: Target) -> None:
        """Load weights or read what the drafter needs from the target (no-op if model-free)."""

    def begin(self, ctx: DraftContext) -> None:
        """A new batch starts; reset per-row state."""

    def join(self, ctx: DraftContext) -> None:
        """Rows join the running batch (continuous batching, `Engine.serve`): set up their
        per-row state after the rows already running, in `ctx` order. `ctx` holds only the
        joining rows, their prompt features in `extras` as `begin`'s; row ids are unique
        within the stream, so `kept_rows` maps state when rows leave."""
        raise NotImplementedError(f"{type(self).__name__} cannot take rows joining a batch")

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        """One draft tree per active row (an empty tree means a plain AR step for that row)."""
        raise NotImplementedError

    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        """Learn from the last step (`ctx.tokens` does not yet include `outcome.emitted`)."""


class MethodArgError(ValueError):
    """A method option a drafter does not take (`expected` empty) or of the wrong type."""

    def __init__(self, name: str, value: Any, expected: str, known: list[str]) -> None:
        problem = f"expected {expected}" if expected else "unknown option"
        super().__init__(f"{name}: {problem}, got {type(value).__name__}")
        self.name = name  # the option
        self.value = value  # what was given (callers quote it as they bound messages)
        self.expected = expected  # describe() of the annotation; "" = no such option
        self.known = known  # every option the drafter takes


# ----------------------------------------------------------------------------- option types
# What YAML gives (bool, int, float, str, None, lists) checked against an annotation. Types
# this does not know (a class, Callable) are accepted: the constructor decides.

_UNIONS = (Union, types.UnionType)
_SEQUENCES = (list, tuple, Sequence)
_NAMES = {  # singular, plural
    bool: ("true or false", "true/false values"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    type(None): ("null", "nulls"),
    LayerIndex: ("a layer index", "layer indices"),
}


def accepts(annotation: Any, value: Any) -> bool:
    """Whether `value` has the annotated type. Bools are not numbers; ints are floats."""
    if annotation is Any:
        return True
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in _UNIONS:
        return any(accepts(a, value) for a in args)
    if origin is Literal:
        return any(type(value) is type(c) and value == c for c in args)
    if origin in _SEQUENCES:
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(map(accepts, args, value))
        return all(accepts(args[0] if args else Any, v) for v in value)
    if isinstance(annotation, NewType):
        return accepts(annotation.__supertype__, value)
    if annotation is None or annotation is type(None):
        return value is None
    if annotation in (int, float) and isinstance(value, bool):
        return False
    if annotation is float:
        return isinstance(value, int | float)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def describe(annotation: Any, plural: bool = False) -> str:
    """The annotation in words for a message: "an integer or null", "a list of integers"."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in _UNIONS:
        return " or ".join(describe(a, plural) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(str(c) for c in args)
    if origin in _SEQUENCES:
        element = args[0] if args and (origin is not tuple or args[-1] is Ellipsis) else Any
        return ("lists of " if plural else "a list of ") + describe(element, plural=True)
    key = type(None) if annotation is None else annotation
    if key in _NAMES:
        return _NAMES[key][plural]
    return "values" if plural else "any value"


def layer_indices(annotation: Any, value: Any) -> list[int]:
    """The `LayerIndex` values inside `value` (of that annotation), in order."""
    if annotation is LayerIndex:
        return [value] if accepts(int, value) else []
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in _UNIONS:
        member = next((a for a in args if accepts(a, value)), None)
        return layer_indices(member, value) if member is not None else []
    if origin in _SEQUENCES and isinstance(value, list | tuple) and args:
        element = args[0] if origin is not tuple or args[-1] is Ellipsis else Any
        return [i for v in value for i in layer_indices(element, v)]
    return []
