"""Export a run as answer files in Spec-Bench's or MMSpec's JSONL layout.

One JSON line per sample with its turns in order, one file per (model, method, batch size,
temperature, repeat) — and workload, when a run has several — so the references' own scripts
(Spec-Bench `evaluation/speed.py`, MMSpec's result readers) read our runs unchanged.

Spec-Bench (`evaluation/eval.py`): question_id, category, answer_id, model_id, tstamp and
choices[0] = {index, turns, decoding_steps, new_tokens, wall_time, accept_lengths}; the lists
are per turn (decoding_steps: our verification steps) except accept_lengths, the tokens each
verification step committed, bonus token included, over all turns. Its `category` is the
task speed.py filters on; ours is the topic (the sample's own category goes in `subcategory`).

MMSpec (`evaluation/utils.py:save_result` at 0e80de9): question_id, topic, category,
answer_id, model_id, tstamp and choices[0] = {index, turns, idxs, new_tokens, wall_time,
acceptance_length, draft_time, target_time}; acceptance_length is one list per turn of the
draft tokens accepted per step, bonus excluded (0 for a step with no accepted draft); idxs are
our verification steps; target_time is prefill plus verify seconds.

wall_time is the row's total_s. Samples with an errored or missing turn are left out (the
reference scripts would divide by their zero times) and counted in the result. answer_id and
tstamp are derived from the run, so exporting twice writes identical files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from mmspec.reports.metrics import load_rows, static_rows
from mmspec.results.ids import method_id, safe_name
from mmspec.results.layout import manifest_or_empty

FORMATS = ("specbench", "mmspec")
GROUP_COLUMNS = ["model", "method", "batch_size", "temperature", "repeat", "workload"]
_COLUMNS = [
    *GROUP_COLUMNS,
    "topic",
    "category",
    "sample_id",
    "turn",
    "status",
    "new_tokens",
    "steps",
    "accept_lengths",
    "prefill_s",
    "draft_s",
    "verify_s",
    "total_s",
    "output_text",
]


@dataclass(frozen=True, order=True)
class ExportGroup:
    """The rows that make one answer file."""

    model: str
    method: str
    batch_size: int
    temperature: float
    repeat: int
    workload: str

    def model_id(self, with_workload: bool) -> str:
        """e.g. 'tiny-qwen2.5-vl-pld-bs1-r0-temperature-0.0', as MMSpec names its runs.

        The temperature comes last, as str(float) does it, so file names match both
        references' `<name>-temperature-<t>.jsonl` pattern.
        """
        method = method_id(self.method)  # a swept variant's name is not a file name
        parts = [safe_name(self.model), method, f"bs{self.batch_size}", f"r{self.repeat}"]
        if with_workload:
            parts.append(safe_name(self.workload))
        return "-".join(parts) + f"-temperature-{float(self.temperature)}"


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)  # empty when written to a stream
    records: int = 0
    skipped_samples: int = 0  # with an errored or missing turn


def _epoch(started_at: Any) -> float | None:
    if not isinstance(started_at, str):
        return None
    try:
        stamp = datetime.fromisoformat(started_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def _answer_id(run_id: str, model_id: str, workload: str, sample_id: str) -> str:
    # Spec-Bench uses a random shortuuid (22 characters); a hash keeps exports reproducible.
    return hashlib.sha256(f"{run_id}\0{model_id}\0{workload}\0{sample_id}".encode()).hexdigest()[
        :22
    ]


def _specbench(turns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "index": 0,
        "turns": [t["output_text"] or "" for t in turns],
        "decoding_steps": [t["steps"] for t in turns],
        "new_tokens": [t["new_tokens"] for t in turns],
        "wall_time": [t["total_s"] for t in turns],
        # Spec-Bench counts the tokens a step commits: the accepted drafts plus the bonus.
        "accept_lengths": [a + 1 for t in turns for a in (t["accept_lengths"] or [])],
    }


def _mmspec(turns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "index": 0,
        "turns": [t["output_text"] or "" for t in turns],
        "idxs": [t["steps"] for t in turns],
        "new_tokens": [t["new_tokens"] for t in turns],
        "wall_time": [t["total_s"] for t in turns],
        "acceptance_length": [list(t["accept_lengths"] or []) for t in turns],
        "draft_time": [t["draft_s"] for t in turns],
        "target_time": [t["prefill_s"] + t["verify_s"] for t in turns],
    }


def _record(
    fmt: str, run: dict[str, Any], model_id: str, turns: list[dict[str, Any]]
) -> dict[str, Any]:
    first = turns[0]
    head = {
        "question_id": first["sample_id"],
        "answer_id": _answer_id(run["run_id"], model_id, first["workload"], first["sample_id"]),
        "model_id": model_id,
    }
    if fmt == "specbench":
        head |= {"category": first["topic"], "subcategory": first["category"]}
        body = _specbench(turns)
    else:
        head |= {"topic": first["topic"], "category": first["category"]}
        body = _mmspec(turns)
    return {**head, "choices": [body], "tstamp": run["tstamp"]}


def _complete(turns: list[dict[str, Any]]) -> bool:
    ok = all(t["status"] == "ok" for t in turns)
    return ok and [t["turn"] for t in turns] == list(range(len(turns)))


def iter_groups(
    run_dir: str | Path, fmt: str
) -> Iterator[tuple[ExportGroup, str, list[dict[str, Any]], int]]:
    """(group, model_id, records sorted by question id, samples skipped) per answer file."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    manifest = manifest_or_empty(run_dir)
    run = {
        "run_id": manifest.get("run_id") or run_dir.name,
        "tstamp": _epoch(manifest.get("started_at")),
    }
    frame = (
        static_rows(load_rows(run_dir))
        .select(_COLUMNS)
        .sort([*GROUP_COLUMNS, "sample_id", "turn"])
        .collect()
    )
    with_workload = frame["workload"].n_unique() > 1
    for values, part in frame.partition_by(GROUP_COLUMNS, as_dict=True).items():
        group = ExportGroup(*values)
        model_id = group.model_id(with_workload)
        records, skipped = [], 0
        rows = part.iter_rows(named=True)
        for _, turns_iter in itertools.groupby(rows, key=lambda r: r["sample_id"]):
            turns = list(turns_iter)
            if _complete(turns):
                records.append(_record(fmt, run, model_id, turns))
            else:
                skipped += 1
        yield group, model_id, records, skipped


def _write_lines(records: list[dict[str, Any]], out: IO[str]) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")


def _write_file(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _write_lines(records, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def default_out(run_dir: str | Path, fmt: str) -> Path:
    """Where `export` writes when no --out is given: a folder of files inside the run."""
    return Path(run_dir) / "export" / fmt


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    stream: IO[str] | None = None,
) -> ExportResult:
    """Write the run's answers in `fmt` (see the module doc).

    `out` a folder (existing, or a path without a suffix): one `<model_id>.jsonl` per group.
    `out` a file path: every group in that one file (model_id tells the groups apart).
    `stream` instead of `out`: every group written to that text stream.
    """
    result = ExportResult()
    target = Path(out) if out is not None else default_out(run_dir, fmt)
    as_folder = stream is None and (target.is_dir() or not target.suffix)
    single: list[dict[str, Any]] = []
    for _group, model_id, records, skipped in iter_groups(run_dir, fmt):
        result.records += len(records)
        result.skipped_samples += skipped
        if stream is not None:
            _write_lines(records, stream)
        elif as_folder:
            path = target / f"{model_id}.jsonl"
            _write_file(path, records)
            result.files.append(path)
        else:
            single += records
    if stream is None and not as_folder:
        _write_file(target, single)
        result.files.append(target)
    return result
