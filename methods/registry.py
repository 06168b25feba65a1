"""Drafter registry: methods are looked up by name, never imported from paths in a grid."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TypeVar

from mmspec.methods.base import Drafter
from mmspec.methods.viskip import PREFIX as VISKIP
from mmspec.methods.viskip import viskip_of

_DRAFTERS: dict[str, type[Drafter]] = {}
D = TypeVar("D", bound=type[Drafter])


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def register(name: str) -> Callable[[D], D]:
    """Class decorator: make a Drafter subclass available under `name`."""

    def wrap(cls: D) -> D:
        if not issubclass(cls, Drafter):
            raise TypeError(f"{cls.__name__} is not a Drafter")
        if name in _DRAFTERS and _DRAFTERS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _DRAFTERS[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    # importing the modules runs their @register decorators
    from mmspec.methods import (  # noqa: F401
        ar,
        eagle,
        eagle2,
        eagle3,
        lookahead,
        medusa,
        msd,
        pld,
        recycling,
        sam,
        vispec,
    )

    for ep in entry_points(group="mmspec.methods"):
        if ep.name not in _DRAFTERS:
            register(ep.name)(ep.load())
    # ViSkip is plug-and-play: one wrapper per method that drafts (AR drafts nothing)
    for name, cls in list(_DRAFTERS.items()):
        if name != "ar" and not name.startswith(VISKIP) and VISKIP + name not in _DRAFTERS:
            register(VISKIP + name)(viskip_of(cls))


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_DRAFTERS)


def get_drafter(name: str) -> type[Drafter]:
    _load_builtin()
    try:
        return _DRAFTERS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(_DRAFTERS))}"
        ) from None
