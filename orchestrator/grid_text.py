"""A grid file's text as plain data: UTF-8 only, strict YAML, and messages that quote briefly.

The strict loader refuses what lets a small file stand for a huge value or hide one (aliases,
a key given twice, text that is not Unicode); every message names the file and line, and
repeats at most `QUOTE_CHARS` of a user's value, so no input can make a message (or its making)
large. orchestrator/grid.py validates the data; jobs.py rereads a grid's text through here.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from mmspec.workloads.sample import lone_surrogate

QUOTE_CHARS = 80  # the most of a user's value an error message repeats
PROBLEM_CHARS = 240  # the most of a message from elsewhere (a drafter, a registry) repeated


class GridError(ValueError):
    """A grid file that cannot be run; the message names file, key and allowed values."""


def read_text(path: str | Path) -> str:
    """A grid file's text, or GridError naming the file (and the first byte not UTF-8)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise GridError(f"{source}: cannot read the grid file: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GridError(
            f"{source}: not UTF-8 text: byte {raw[exc.start]:#04x} at byte offset {exc.start} "
            f"({exc.reason})"
        ) from None


def read_yaml(text: str, source: str = "<grid>") -> Any:
    """Parse a grid's YAML text as plain data, or raise GridError naming the file and line."""
    try:
        return yaml.load(text, Loader=_GridLoader)  # a SafeLoader: plain data only
    except _AliasError as exc:
        raise GridError(
            f"YAML aliases and anchors are not supported: {source}:{exc.line}"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise GridError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise GridError(f"{source}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise GridError(f"{source}: not valid YAML: {clip(str(exc), PROBLEM_CHARS)}") from None


class _AliasError(yaml.YAMLError):
    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__(f"alias or anchor at line {mark.line + 1}")
        self.line = mark.line + 1


class _GridLoader(yaml.SafeLoader):
    """The safe loader, minus what lets a small file stand for a huge value or hide a value:
    aliases and anchors (`&a`, `*a`: nested, they expand a few lines into gigabytes), a key
    given twice (YAML forbids it; PyYAML keeps the last), a string that is not Unicode text."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AliasError(event.start_mark)
        return super().compose_node(parent, index)

    def compose_scalar_node(self, anchor: Any) -> Any:
        node = super().compose_scalar_node(anchor)
        index = lone_surrogate(node.value)
        if index is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"a lone surrogate {node.value[index]!r} is not text", node.start_mark
            )
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # a merge (`<<`) may override; other key kinds fail in the base class
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {quote(key)} given twice (lines {first_line[key]} and {line})",
                    key_node.start_mark,
                )
            first_line[key] = line
        return super().construct_mapping(node, deep)


_REPR = reprlib.Repr()  # bounded: never walks (or builds) more of a value than it shows
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, QUOTE_CHARS, QUOTE_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def quote(value: Any) -> str:
    """A user's value as an error message repeats it: its repr, at most QUOTE_CHARS long."""
    return clip(_REPR.repr(value), QUOTE_CHARS)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
