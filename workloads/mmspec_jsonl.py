"""Loader for the MMSpec layout: `<split>/mmspec.jsonl` + `<split>/images/<image>`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import WorkloadError
from .sample import Sample, lone_surrogate
from .selection import check_limit, filter_topics, spread_limit

JSONL_NAME = "mmspec.jsonl"
IMAGES_DIR = "images"
_STRING_FIELDS = ("id", "image", "category", "topic")


@dataclass(frozen=True)
class _Record:
    """A validated jsonl line, before its image is read."""

    id: str
    image: str
    turns: tuple[str, ...]
    category: str
    topic: str


def resolve_jsonl(path: str | Path) -> Path:
    """The jsonl file for a split folder or the file itself, or a WorkloadError saying why not."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WorkloadError(f"workload path not found: {p}")
    if p.is_file():
        return p
    jsonl = p / JSONL_NAME
    if jsonl.is_file():
        return jsonl
    # Pointing at the dataset root (MMSpec/) instead of a split is the likely mistake.
    splits = sorted(d.name for d in p.iterdir() if (d / JSONL_NAME).is_file())
    hint = f"; splits found below it: {splits}" if splits else ""
    raise WorkloadError(f"no {JSONL_NAME} in {p}{hint}")


def load_mmspec(
    path: str | Path, limit: int | None = None, topics: Sequence[str] | None = None
) -> list[Sample]:
    """Load an MMSpec split (folder or its jsonl file) as Samples in file order.

    Every record is validated, even those `limit` or `topics` drop, so a broken file fails the
    same way whatever the filter. Only the chosen samples' images are read. A missing image
    does not raise: the sample carries `error` so the run records an error row and goes on.
    Image bytes are kept encoded; decoding happens where the sample runs (`Sample.load_image`).
    """
    jsonl = resolve_jsonl(path)
    check_limit(limit, str(jsonl))
    records = _read_records(jsonl)
    # Cheap placeholders let the shared filter/limit code pick before any image is read.
    stubs = [Sample(id=r.id, topic=r.topic, category=r.category, turns=r.turns) for r in records]
    chosen = spread_limit(filter_topics(stubs, topics, str(jsonl)), limit)
    by_id = {r.id: r for r in records}
    images_dir = jsonl.parent / IMAGES_DIR
    return [_with_image(by_id[s.id], images_dir) for s in chosen]


def _read_records(jsonl: Path) -> list[_Record]:
    records: list[_Record] = []
    first_line: dict[str, int] = {}
    try:
        with jsonl.open("rb") as f:
            lines = list(f)
    except OSError as exc:
        raise WorkloadError(f"cannot read {jsonl}: {exc.strerror or exc}") from exc
    for lineno, raw in enumerate(lines, start=1):
        where = f"{jsonl}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WorkloadError(f"{where}: not valid UTF-8 ({exc.reason})") from exc
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # editors on Windows add a BOM
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        record = _parse_record(data, where)
        if record.id in first_line:
            raise WorkloadError(
                f"{where}: duplicate id {record.id!r} (first on line {first_line[record.id]})"
            )
        first_line[record.id] = lineno
        records.append(record)
    if not records:
        raise WorkloadError(f"{jsonl}: no records")
    return records


def _parse_record(data: Any, where: str) -> _Record:
    if not isinstance(data, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for name in (*_STRING_FIELDS, "turns"):
        if name not in data:
            raise WorkloadError(f"{where}: missing field {name!r}")
    for name in _STRING_FIELDS:
        value = data[name]
        if not isinstance(value, str):
            raise WorkloadError(
                f"{where}: field {name!r} must be a string, got {type(value).__name__}"
            )
        # category may legitimately be empty; the others identify or locate the sample
        if name != "category" and not value.strip():
            raise WorkloadError(f"{where}: field {name!r} is empty")
    image = data["image"]
    pure = PurePosixPath(image)
    if pure.is_absolute() or ".." in pure.parts:
        # The jsonl is data: it may name a file under images/, not anywhere on the host.
        raise WorkloadError(f"{where}: field 'image' must be a path inside images/, got {image!r}")
    turns = data["turns"]
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise WorkloadError(
            f"{where}: field 'turns' must be a list of strings, got {_describe(turns)}"
        )
    if not turns:
        raise WorkloadError(f"{where}: field 'turns' is empty")
    for number, turn in enumerate(turns, start=1):
        if not turn.strip():
            raise WorkloadError(f"{where}: turn {number} is empty")
    _check_text([(repr(name), data[name]) for name in _STRING_FIELDS], where)
    _check_text([(f"'turns' (turn {n})", t) for n, t in enumerate(turns, start=1)], where)
    return _Record(
        id=data["id"],
        image=image,
        turns=tuple(turns),
        category=data["category"],
        topic=data["topic"],
    )


def _check_text(fields: list[tuple[str, str]], where: str) -> None:
    # refused here, with file:line, rather than later in the workload hash or a file name
    for label, text in fields:
        index = lone_surrogate(text)
        if index is not None:
            raise WorkloadError(
                f"{where}: field {label} holds a lone surrogate {text[index]!r} at character "
                f"{index}: not Unicode text (a JSON \\u escape of half a surrogate pair?)"
            )


def _describe(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {', '.join(kinds)}"
    return type(value).__name__


def _with_image(record: _Record, images_dir: Path) -> Sample:
    image_path = images_dir / record.image
    image_bytes: bytes | None = None
    error: str | None = None
    try:
        image_bytes = image_path.read_bytes()
    except FileNotFoundError:
        error = f"image not found: {image_path}"
    except OSError as exc:  # a directory, no permission: still one bad sample, not a bad run
        error = f"image unreadable: {image_path}: {exc.strerror or exc}"
    return Sample(
        id=record.id,
        topic=record.topic,
        category=record.category,
        turns=record.turns,
        image_bytes=image_bytes,
        image_name=str(image_path),
        error=error,
    )
