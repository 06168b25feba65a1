"""Import MMSpec or Spec-Bench answer files as a run directory: the inverse of export.py.

`mmspec-orch import` turns the references' JSONL answer files (one file per method, one record
per sample, `choices[0]` holding per-turn lists) into a run laid out by `mmspec.results.layout`,
so `report`, `compare`, `history` and `export` read a reference run like one of ours. Each file
becomes one cell (batch size 1, repeat 0: both references decode one sample at a time) and one
shard; each (sample, turn) one row of RESULT_SCHEMA. Only `choices[0]` is read, as both
references' own readers do.

What each row holds, by source field:

- MMSpec (`evaluation/eval_*_mmspec.py`, read as `evaluation/summarize_metrics.py` reads it):
  `question_id` -> sample_id; `topic`, `category` (missing: "unknown", as summarize_metrics);
  `turns` -> output_text; `new_tokens`; `wall_time` -> total_s and batch_s; `draft_time` ->
  draft_s; `target_time` -> verify_s (it times every target forward, the prefill included);
  `acceptance_length[t]` a list -> accept_lengths (drafts accepted per verification round,
  bonus excluded), steps = its length, accepted_tokens = its sum; a number (MSD's per-turn
  mean) -> steps = `idxs[t]`, accepted_tokens = round(mean x steps), no per-step list; absent
  (the baseline) -> steps = new_tokens, accepted 0. These are summarize_metrics' rounds, so
  our MAT is its `draft_accept_mean` and new_tokens / steps its `MAT`.
- Spec-Bench (`evaluation/eval.py`, read as `evaluation/speed.py` reads it): `question_id`;
  `category` -> topic (the task speed.py filters on); `subcategory` (our export's) or else
  `category` -> category; `turns`, `new_tokens`, `wall_time` as above; `accept_lengths` is one
  flat list over all turns of tokens committed per step, bonus included: it is split into
  turns by `decoding_steps` (`idxs` in older files) when those add up to its length, given
  whole to a single-turn sample (Spec-Bench's PLD reports new_tokens - 1 as its steps), and
  otherwise cannot be placed: such a turn keeps the reported steps and new_tokens - steps
  accepted tokens, and the manifest counts it. A turn whose text is "ERROR" (eval.py's
  RuntimeError path, its numbers stale) is an error row.

Fields the files have no source for keep RESULT_SCHEMA's non-null defaults as sentinels: 0 for
prompt_tokens, drafted_tokens and (outside ViSkip) skipped_steps, 0.0 for prefill_s and
commit_s (and draft_s / verify_s where a file lacks them); seed 0 (both references seed
choice i with i). The manifest lists them per file (`imported.files[].not_recorded`) and the
report shows the metrics built on them as not recorded (`mask_unrecorded`), never as zeros.
Neither format records token ids: output_sha256 is the SHA-256 of the answer text (UTF-8), so
"lossless" of an imported run compares answer texts.

Nothing is written until every file has been read and checked; the run is then written under
a hidden temporary folder and renamed into place, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from mmspec.reports.acceptance import DRAFTING_STEPS, is_acceptance_column
from mmspec.reports.export import FORMATS
from mmspec.reports.metrics import ALL_TOPIC
from mmspec.reports.paired import BASELINE
from mmspec.reports.roofline import ROOFLINE_COLUMNS
from mmspec.results.environment import ENVIRONMENT, Environment, Gpu
from mmspec.results.ids import VISKIP_PREFIX, cell_id, safe_name, shard_id
from mmspec.results.layout import MANIFEST, RESULTS, part_name, partition, run_names
from mmspec.results.schema import SCHEMA_VERSION, ResultRow, rows_to_table
from mmspec.results.taxonomy import TAXONOMY, known_taxonomy

IMPORTED = "imported"  # the manifest key that marks an imported run
DEFAULT_BASELINE = "baseline"  # MMSpec's name for plain decoding; imported as `ar`
MANIFEST_VERSION = 1
ERROR_TEXT = "ERROR"  # what Spec-Bench's eval.py writes for a turn that raised
# `<name>-temperature-<t>.jsonl` (both references, and our export); Spec-Bench's baselines
# are often `...-temp-<t>.jsonl`.
FILE_RE = re.compile(r"^(?P<name>.+)-(?:temperature|temp)-(?P<temp>[^-]+)\.jsonl$")
# MMSpec names ViSkip over a method `<method>_vskip` (e.g. vispec_vskip); ours is viskip+<method>.
_VSKIP_SUFFIX = "_vskip"

# Row fields neither format has a source for; the per-format extras are added per file.
_NEVER_RECORDED = ("prompt_tokens", "drafted_tokens", "prefill_s", "commit_s")
# The metric columns (cell metrics and run details) computed from each unrecorded row field.
# MMSpec's prefill sits inside target_time (verify) and its bookkeeping in "other", so
# other_s_mean stays meaningful while draft and verify are recorded.
# Time to first token is the prefill, and time per output token what follows it.
_METRICS_OF_FIELD = {
    "prefill_s": ("prefill_s_mean", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s"),
    "commit_s": ("commit_s_mean",),
    "draft_s": ("draft_s_mean", "other_s_mean"),
    "verify_s": ("verify_s_mean", "other_s_mean"),
    # the roofline's tree size: with drafted tokens unknown it would read as "nothing drafted"
    "drafted_tokens": ("drafted_tokens", "accept_rate", *ROOFLINE_COLUMNS),
    # ViSkip's skipped steps leave the drafting steps that acceptance per position divides by
    # (and the acceptance columns, matched by acceptance.is_acceptance_column, with them).
    "skipped_steps": ("skipped_steps", DRAFTING_STEPS),
}
_ACCEPTANCE_OF_FIELD = {"skipped_steps"}


class AnswerFileError(ValueError):
    """An answer file that cannot be imported; the message names the file, line and key."""


@dataclass(frozen=True)
class ImportSettings:
    """What `mmspec-orch import` was told; None fields are derived from the files' folder."""

    fmt: str  # "mmspec" | "specbench"
    model: str | None = None  # default (MMSpec): results/<model>/mmspec_<split>/ -> <model>
    workload: str | None = None  # default: the split, `mmspec_test` -> `test` (see _workload)
    baseline: str = DEFAULT_BASELINE  # the file name (before -temperature-) imported as `ar`
    renames: Mapping[str, str] = field(default_factory=dict)  # file name -> method name
    temperature: float = 0.0  # for files whose name carries none
    name: str | None = None  # run folder prefix; default "<format>-<model>-<workload>"
    gpus: tuple[str, ...] = ()  # the hardware the files were measured on, if known
    cpu: str | None = None


@dataclass(frozen=True)
class SourceFile:
    """One imported file, as the manifest records it (`imported.files`)."""

    path: str
    sha256: str
    name: str  # as the file name gives it
    method: str  # as the run names it
    temperature: float
    records: int
    rows: int
    error_rows: int
    not_recorded: list[str]  # row fields with no source in this file (sentinel values)
    unplaced_turns: int = 0  # Spec-Bench turns whose per-step lengths could not be placed
    # MSD's per-turn means x rounds, less the whole accepted tokens the rows hold, summed per
    # topic: what draft_accept_mean needs to be MMSpec's exactly (see exact_accept_means)
    accept_residue: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportResult:
    run_dir: Path
    files: list[SourceFile]
    rows: int
    has_baseline: bool  # a file was imported as `ar`: speedups and lossless can be computed


@dataclass(frozen=True)
class _Cell:
    """Where a file's rows go."""

    model: str
    method: str
    temperature: float
    workload: str
    run_id: str

    @property
    def cell_id(self) -> str:
        return cell_id(self.model, self.method, 1, self.temperature, 0, self.workload)

    @property
    def shard_id(self) -> str:
        return shard_id(self.cell_id, 0)


@dataclass
class _Parsed:
    """One file, read and checked, before anything is written."""

    cell: _Cell
    source: SourceFile
    rows: list[ResultRow]
    first_tstamp: float | None


# ----------------------------------------------------------------------------- reading


class _Where:
    """A place in an answer file, for error messages: `path:line: key: problem`."""

    def __init__(self, path: Path, line: int) -> None:
        self.path, self.line = path, line

    def fail(self, key: str, problem: str) -> NoReturn:
        raise AnswerFileError(f"{self.path}:{self.line}: {key}: {problem}")

    def obj(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"expected a JSON object, got {_kind(value)}")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_kind(value)}")
        return value

    def count(self, value: Any, key: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, f"expected an integer >= {minimum}, got {_shown(value)}")
        return value

    def number(self, value: Any, key: str, what: str = "a finite number >= 0") -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            self.fail(key, f"expected {what}, got {_shown(value)}")
        return float(value)

    def seconds(self, value: Any, key: str) -> float:
        return self.number(value, key, "seconds (a finite number >= 0)")

    def per_turn(self, choice: dict[str, Any], key: str, turns: int | None) -> list[Any]:
        """choice[key], a list with one entry per turn (`turns` of them, when known)."""
        if key not in choice:
            self.fail(f"choices[0].{key}", "missing")
        value = choice[key]
        if not isinstance(value, list):
            self.fail(f"choices[0].{key}", f"expected a list, got {_kind(value)}")
        if turns is not None and len(value) != turns:
            self.fail(
                f"choices[0].{key}",
                f"{len(value)} entries, but choices[0].turns has {turns} (one per turn)",
            )
        return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _records(path: Path, raw: bytes) -> list[tuple[_Where, dict[str, Any]]]:
    """Every JSON object of a JSONL file (`raw`, read from `path`) with its line; blank lines
    are skipped."""
    found = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        where = _Where(path, lineno)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AnswerFileError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason})") from None
        if lineno == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AnswerFileError(
                f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        found.append((where, where.obj(data, "record")))
    if not found:
        raise AnswerFileError(f"{path}: no records")
    return found


@dataclass(frozen=True)
class _Turn:
    """The numbers of one (sample, turn) that differ between the formats."""

    steps: int
    accepted: int
    accept_lengths: list[int] | None
    draft_s: float = 0.0
    verify_s: float = 0.0
    error: str | None = None
    residue: float = 0.0  # accepted drafts the whole `accepted` leaves out (MSD's means)


def _optional(where: _Where, choice: dict[str, Any], key: str, n: int) -> list[Any] | None:
    return where.per_turn(choice, key, n) if key in choice else None


def _seconds(where: _Where, choice: dict[str, Any], key: str, n: int) -> list[float]:
    """A per-turn list of seconds; zeros (the sentinel) when the file has none."""
    values = _optional(where, choice, key, n)
    if values is None:
        return [0.0] * n
    return [where.seconds(v, f"choices[0].{key}[{t}]") for t, v in enumerate(values)]


def _mmspec_turns(where: _Where, choice: dict[str, Any], new_tokens: list[int]) -> list[_Turn]:
    n = len(new_tokens)
    accept = _optional(where, choice, "acceptance_length", n)
    idxs = _optional(where, choice, "idxs", n)
    draft_s = _seconds(where, choice, "draft_time", n)
    verify_s = _seconds(where, choice, "target_time", n)
    turns = []
    for t in range(n):
        value = None if accept is None else accept[t]
        key = f"choices[0].acceptance_length[{t}]"
        residue = 0.0
        if isinstance(value, list):
            lengths = [where.count(v, f"{key}[{i}]") for i, v in enumerate(value)]
            steps, accepted = len(lengths), sum(lengths)
        elif value is None:  # plain decoding: one target forward per new token
            lengths, steps, accepted = None, new_tokens[t], 0
        else:  # MSD: one mean per turn; its rounds are idxs[t], as summarize_metrics counts
            mean = where.number(value, key, "a list of integers, a number >= 0 or null")
            if idxs is None:
                where.fail("choices[0].idxs", f"missing, needed with the mean in {key}")
            steps = where.count(idxs[t], f"choices[0].idxs[{t}]")
            lengths, accepted = None, round(mean * steps)
            # the rows hold whole tokens; the manifest keeps the rest (SourceFile)
            residue = mean * steps - accepted
        turns.append(_Turn(steps, accepted, lengths, draft_s[t], verify_s[t], residue=residue))
    return turns


def _specbench_turns(
    where: _Where, choice: dict[str, Any], new_tokens: list[int], texts: list[str]
) -> tuple[list[_Turn], int]:
    """The turns, and how many of them could not be given their per-step lengths."""
    n = len(new_tokens)
    key = "decoding_steps" if "decoding_steps" in choice or "idxs" not in choice else "idxs"
    reported = [
        where.count(v, f"choices[0].{key}[{t}]")
        for t, v in enumerate(where.per_turn(choice, key, n))
    ]
    flat = [
        where.count(v, f"choices[0].accept_lengths[{i}]", minimum=1)
        for i, v in enumerate(where.per_turn(choice, "accept_lengths", None))
    ]
    if sum(reported) == len(flat):
        bounds = [sum(reported[:t]) for t in range(n + 1)]
        chunks: list[list[int]] | None = [flat[bounds[t] : bounds[t + 1]] for t in range(n)]
    elif n == 1:
        chunks = [flat]
    else:
        chunks = None
    turns = []
    for t in range(n):
        error = (
            "the reference recorded ERROR for this turn (a RuntimeError in eval.py)"
            if texts[t] == ERROR_TEXT
            else None
        )
        if chunks is not None:
            # Spec-Bench counts the bonus token in each step; ours does not.
            lengths = [a - 1 for a in chunks[t]]
            turns.append(_Turn(len(lengths), sum(lengths), lengths, error=error))
        else:
            steps = reported[t]
            turns.append(_Turn(steps, max(new_tokens[t] - steps, 0), None, error=error))
    return turns, 0 if chunks is not None else n


def _parse_file(path: Path, cell: _Cell, fmt: str, name: str) -> _Parsed:
    rows: list[ResultRow] = []
    seen: dict[str, int] = {}
    tstamps: list[float] = []
    unplaced = 0
    residue: dict[str, float] = {}
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AnswerFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    records = _records(path, raw)
    for where, record in records:
        if "question_id" not in record:
            where.fail("question_id", "missing")
        qid = record["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, str | int):
            where.fail("question_id", f"expected a string or an integer, got {_kind(qid)}")
        sample_id = str(qid)
        if sample_id in seen:
            where.fail("question_id", f"{sample_id!r} again (first on line {seen[sample_id]})")
        seen[sample_id] = where.line
        if isinstance(record.get("tstamp"), int | float):
            tstamps.append(float(record["tstamp"]))
        topic, category = _labels(where, record, fmt)
        choices = record.get("choices")
        if not isinstance(choices, list) or not choices:
            where.fail("choices", f"expected a non-empty list, got {_shown(choices)}")
        choice = where.obj(choices[0], "choices[0]")
        texts = [
            where.text(v, f"choices[0].turns[{t}]")
            for t, v in enumerate(where.per_turn(choice, "turns", None))
        ]
        n = len(texts)
        if n == 0:
            where.fail("choices[0].turns", "empty: a record needs at least one turn")
        new_tokens = [
            where.count(v, f"choices[0].new_tokens[{t}]")
            for t, v in enumerate(where.per_turn(choice, "new_tokens", n))
        ]
        wall = [
            where.seconds(v, f"choices[0].wall_time[{t}]")
            for t, v in enumerate(where.per_turn(choice, "wall_time", n))
        ]
        if fmt == "mmspec":
            turns = _mmspec_turns(where, choice, new_tokens)
        else:
            turns, missed = _specbench_turns(where, choice, new_tokens, texts)
            unplaced += missed
        for t, turn in enumerate(turns):
            if turn.residue:
                residue[topic] = residue.get(topic, 0.0) + turn.residue
            rows.append(
                ResultRow(
                    run_id=cell.run_id,
                    cell_id=cell.cell_id,
                    shard_id=cell.shard_id,
                    model=cell.model,
                    method=cell.method,
                    batch_size=1,
                    temperature=cell.temperature,
                    seed=0,
                    repeat=0,
                    workload=cell.workload,
                    topic=topic,
                    category=category,
                    sample_id=sample_id,
                    turn=t,
                    status="ok" if turn.error is None else "error",
                    error=turn.error,
                    new_tokens=new_tokens[t],
                    steps=turn.steps,
                    accepted_tokens=turn.accepted,
                    accept_lengths=turn.accept_lengths,
                    draft_s=turn.draft_s,
                    verify_s=turn.verify_s,
                    total_s=wall[t],
                    # Both references decode one sample at a time and re-prefill every turn:
                    # each turn is a batch of its own.
                    batch_index=len(rows),
                    batch_s=wall[t],
                    output_tokens=None,  # neither format records token ids
                    output_sha256=hashlib.sha256(texts[t].encode()).hexdigest(),
                    output_text=texts[t],
                )
            )
    source = SourceFile(
        path=str(path.resolve()),
        sha256=hashlib.sha256(raw).hexdigest(),
        name=name,
        method=cell.method,
        temperature=cell.temperature,
        records=len(records),
        rows=len(rows),
        error_rows=sum(r.status != "ok" for r in rows),
        not_recorded=_not_recorded(fmt, cell.method, records),
        unplaced_turns=unplaced,
        accept_residue=residue,
    )
    return _Parsed(cell, source, rows, min(tstamps) if tstamps else None)


def _labels(where: _Where, record: dict[str, Any], fmt: str) -> tuple[str, str]:
    """(topic, category) of a record."""
    if fmt == "specbench":
        if "category" not in record:
            where.fail("category", "missing (Spec-Bench's task, read as the topic)")
        topic = where.text(record["category"], "category")
        sub = record.get("subcategory")
        return topic, where.text(sub, "subcategory") if sub is not None else topic
    topic, category = (
        where.text(record[k], k) if k in record else "unknown" for k in ("topic", "category")
    )
    return topic, category


def _not_recorded(fmt: str, method: str, records: list[tuple[_Where, dict[str, Any]]]) -> list[str]:
    missing = list(_NEVER_RECORDED)
    # Outside ViSkip no step is skipped: 0 is the value there, not a sentinel.
    if method.startswith(VISKIP_PREFIX):
        missing.append("skipped_steps")
    choices = [r["choices"][0] for _, r in records]
    for row_field, key in (("draft_s", "draft_time"), ("verify_s", "target_time")):
        if fmt == "specbench" or not all(key in c for c in choices):
            missing.append(row_field)
    return missing


# ----------------------------------------------------------------------------- naming


def source_name(path: Path, default_temperature: float) -> tuple[str, float]:
    """(name, temperature) of an answer file: `eagle-temperature-0.jsonl` -> ("eagle", 0.0)."""
    found = FILE_RE.match(path.name)
    if found is None:
        return path.stem, default_temperature
    try:
        temperature = float(found["temp"])
    except ValueError:
        raise AnswerFileError(
            f"{path}: the temperature in the file name, {found['temp']!r}, is not a number"
        ) from None
    if not math.isfinite(temperature) or temperature < 0:
        raise AnswerFileError(f"{path}: temperature {found['temp']!r} in the name is not >= 0")
    return found["name"], temperature


def method_name(name: str, settings: ImportSettings) -> str:
    """The run's method for a file name: renames first, the baseline as `ar`, MMSpec's
    `<m>_vskip` as `viskip+<m>`, anything else as it is (made path-safe)."""
    if name in settings.renames:
        return safe_name(settings.renames[name])
    if name == settings.baseline:
        return BASELINE
    if name.endswith(_VSKIP_SUFFIX) and len(name) > len(_VSKIP_SUFFIX):
        return VISKIP_PREFIX + safe_name(name.removesuffix(_VSKIP_SUFFIX))
    return safe_name(name)


def answer_files(paths: Sequence[str | Path]) -> list[Path]:
    """The .jsonl files named, a folder standing for the .jsonl files directly inside it."""
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            inside = sorted(p for p in given.glob("*.jsonl") if p.is_file())
            if not inside:
                raise AnswerFileError(f"{given}: no .jsonl answer files in this folder")
            files += inside
        elif given.is_file():
            files.append(given)
        else:
            raise AnswerFileError(f"{given}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        raise AnswerFileError("no answer files given")
    return unique


def _model(files: list[Path], settings: ImportSettings) -> str:
    if settings.model:
        return settings.model
    folder = files[0].parent
    if settings.fmt == "mmspec" and folder.name.startswith("mmspec_"):
        return folder.parent.name  # MMSpec writes results/<model>/mmspec_<split>/
    raise AnswerFileError(
        f"{folder}: cannot tell the model from this folder; give it with --model "
        "(a registry name such as llava-1.5-7b lines the run up with ours)"
    )


def _workload(files: list[Path], settings: ImportSettings) -> str:
    if settings.workload:
        return safe_name(settings.workload)
    folder = files[0].parent
    # MMSpec: results/<model>/mmspec_test/ is the split our grids name `test`; Spec-Bench:
    # data/<bench>/model_answer/ is the benchmark <bench>.
    if settings.fmt == "specbench" and folder.name.startswith("model_answer"):
        return safe_name(folder.parent.name)
    return safe_name(folder.name.removeprefix("mmspec_") or folder.name)


# ----------------------------------------------------------------------------- writing


def import_answers(
    paths: Sequence[str | Path], out: str | Path, settings: ImportSettings
) -> ImportResult:
    """Read, check and write `paths` (files, or folders of .jsonl) as a new run under `out`.

    Raises AnswerFileError (naming the file, line and key) before anything is written.
    """
    if settings.fmt not in FORMATS:
        raise AnswerFileError(f"unknown format {settings.fmt!r}; use one of {', '.join(FORMATS)}")
    files = answer_files(paths)
    model, workload = _model(files, settings), _workload(files, settings)
    now = datetime.now(UTC)
    out = Path(out)
    prefix = safe_name(settings.name or f"{settings.fmt}-{model}-{workload}")
    run_id = _free_name(out, prefix, now)

    parsed: list[_Parsed] = []
    cells: dict[tuple[str, float], Path] = {}
    for path in files:
        name, temperature = source_name(path, settings.temperature)
        method = method_name(name, settings)
        if (method, temperature) in cells:
            raise AnswerFileError(
                f"{path}: imports as method {method!r} at temperature {temperature:g}, as "
                f"{cells[(method, temperature)]} does; rename one with --method NAME=METHOD"
            )
        cells[(method, temperature)] = path
        cell = _Cell(model, method, temperature, workload, run_id)
        parsed.append(_parse_file(path, cell, settings.fmt, name))

    manifest = _manifest(run_id, prefix, now, model, workload, settings, parsed)
    run_dir = _write_run(out, run_id, manifest, parsed)
    return ImportResult(
        run_dir,
        [p.source for p in parsed],
        sum(len(p.rows) for p in parsed),
        any(p.source.method == BASELINE for p in parsed),
    )


def _free_name(out: Path, prefix: str, now: datetime) -> str:
    """The first run folder name the store would also pick that is not taken yet."""
    for name in run_names(prefix, now):
        if not (out / name).exists():
            return name
    raise AnswerFileError(f"{out}: cannot find a free run folder name for {prefix}")


def _manifest(
    run_id: str,
    name: str,
    now: datetime,
    model: str,
    workload: str,
    settings: ImportSettings,
    parsed: list[_Parsed],
) -> dict[str, Any]:
    # `ar` first, then the files in the order given: the report's method order.
    methods = sorted((p.source.method for p in parsed), key=lambda m: m != BASELINE)
    stamps = [p.first_tstamp for p in parsed if p.first_tstamp is not None]
    environment = Environment(
        source="stated", cpu=settings.cpu, gpus=tuple(Gpu(gpu) for gpu in settings.gpus)
    )
    return {
        "manifest_version": MANIFEST_VERSION,
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        # When the reference wrote its first answer: the closest the files come to a start.
        "started_at": datetime.fromtimestamp(min(stamps), UTC).isoformat() if stamps else None,
        "grid": {
            "name": name,
            "methods": methods,
            "models": [{"id": model}],
            "workloads": [{"name": workload}],
            "batch_sizes": [1],
            "temperatures": sorted({p.source.temperature for p in parsed}),
            "repeats": 1,
            "seed": 0,
        },
        "grid_sha256": None,
        "workload_sha256": None,
        "git_sha": None,
        "git_dirty": None,
        "host": None,
        ENVIRONMENT: environment.to_dict(),
        # MMSpec's taxonomy of the methods whose names it knows (renamed ones may be unknown)
        TAXONOMY: known_taxonomy(methods),
        IMPORTED: {
            "format": settings.fmt,
            "imported_at": now.isoformat(timespec="seconds"),
            "baseline": settings.baseline,
            "files": [asdict(p.source) for p in parsed],
        },
    }


def _write_run(out: Path, run_id: str, manifest: dict[str, Any], parsed: list[_Parsed]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{run_id}.importing-{os.getpid()}"
    final = out / run_id
    try:
        tmp.mkdir()
        (tmp / MANIFEST).write_text(
            json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n",
            encoding="utf-8",
        )
        for p in parsed:
            cell = p.cell
            folder = tmp / RESULTS / partition(cell.model, cell.method, 1, cell.temperature, 0)
            folder.mkdir(parents=True, exist_ok=True)
            table = rows_to_table(p.rows)
            path = folder / part_name(cell.shard_id)
            with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        # One rename publishes the whole run: a reader sees all of it or none of it.
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------- reading back


def import_info(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest's `imported` block; None for a run of ours."""
    info = manifest.get(IMPORTED)
    return info if isinstance(info, dict) else None


def _rows_of(source: Mapping[str, Any]) -> pl.Expr:
    """The rows (of cell metrics or details) that came from one imported file."""
    return (pl.col("method") == source["method"]) & (
        pl.col("temperature") == float(source["temperature"])
    )


def mask_unrecorded(frame: pl.DataFrame, manifest: Mapping[str, Any]) -> pl.DataFrame:
    """`frame` (cell metrics or run details' cells) with every metric built on a sentinel set
    to null, per (method, temperature) of the file it came from; unchanged for our own runs."""
    info = import_info(manifest)
    if info is None or frame.height == 0:
        return frame
    updates: dict[str, pl.Expr] = {}
    for source in info.get("files") or []:
        hit = _rows_of(source)
        for row_field in source.get("not_recorded") or []:
            columns = list(_METRICS_OF_FIELD.get(row_field, ()))
            if row_field in _ACCEPTANCE_OF_FIELD:
                columns += [c for c in frame.columns if is_acceptance_column(c)]
            for column in columns:
                if column in frame.columns:
                    previous = updates.get(column, pl.col(column))
                    updates[column] = pl.when(hit).then(None).otherwise(previous)
    return frame.with_columns(**updates) if updates else frame


def exact_accept_means(frame: pl.DataFrame, manifest: Mapping[str, Any]) -> pl.DataFrame:
    """Cell metrics with draft_accept_mean as MMSpec's summarize_metrics computes it for files
    that store one mean per turn (MSD): sum(mean x rounds) / sum(rounds). The rows hold the
    products as whole tokens; the manifest keeps what rounding left out, per topic
    (`accept_residue`), which is added back here. Unchanged for our own runs."""
    info = import_info(manifest)
    if info is None or frame.height == 0 or "draft_accept_mean" not in frame.columns:
        return frame
    value = pl.col("draft_accept_mean")
    for source in info.get("files") or []:
        residue = {str(k): float(v) for k, v in (source.get("accept_residue") or {}).items()}
        if not residue:
            continue
        per_topic = {**residue, ALL_TOPIC: sum(sorted(residue.values()))}
        extra = pl.col("topic").replace_strict(per_topic, default=0.0, return_dtype=pl.Float64)
        exact = (pl.col("accepted_tokens") + extra) / pl.col("steps")
        value = pl.when(_rows_of(source) & (pl.col("steps") > 0)).then(exact).otherwise(value)
    return frame.with_columns(draft_accept_mean=value)


def imported_metrics(frame: pl.DataFrame, manifest: Mapping[str, Any]) -> pl.DataFrame:
    """Cell metrics of a run as the report shows them: for an imported run, metrics built on
    values its files lack are null (mask_unrecorded) and MMSpec's draft_accept_mean is exact
    (exact_accept_means); our own runs' metrics pass unchanged."""
    return exact_accept_means(mask_unrecorded(frame, manifest), manifest)


_FORMAT_NAMES = {"mmspec": "MMSpec", "specbench": "Spec-Bench"}
# How each format's steps and accepted tokens were read (the module doc has the detail).
_FORMAT_NOTES = {
    "mmspec": (
        "Steps and accepted drafts are read as MMSpec's `evaluation/summarize_metrics.py` "
        "counts rounds: its `MAT`, `draft_accept_mean` and speedups are the MMSpec columns "
        "of each block (and `*_mmspec` in metrics.csv); our MAT is its draft_accept_mean "
        "up to MSD's rounding to whole tokens; verify is MMSpec's `target_time`, which "
        "includes the prefill."
    ),
    "specbench": (
        "Steps and accepted drafts come from Spec-Bench's flat `accept_lengths` (bonus "
        "included there, excluded here): MAT incl. bonus is speed.py's mean accepted tokens."
    ),
}


def source_format(manifest: Mapping[str, Any]) -> str | None:
    """The source's name (MMSpec, Spec-Bench) for an imported run; None for a run of ours."""
    info = import_info(manifest)
    if info is None:
        return None
    fmt = str(info.get("format"))
    return _FORMAT_NAMES.get(fmt, fmt)


def import_note(manifest: Mapping[str, Any]) -> str | None:
    """What a reader of an imported run's report must know, in one paragraph (Markdown
    inline: `code` and **bold**); None for a run of ours."""
    info = import_info(manifest)
    if info is None:
        return None
    fmt = str(info.get("format"))
    files = info.get("files") or []
    rows = sum(int(f.get("rows", 0)) for f in files)
    unplaced = sum(int(f.get("unplaced_turns", 0)) for f in files)
    baseline = (
        f"`{info.get('baseline')}` as `{BASELINE}`"
        if any(f.get("method") == BASELINE for f in files)
        else f"no baseline (no file named `{info.get('baseline')}`): no speedup, no lossless check"
    )
    parts = [
        f"**Imported** from {source_format(manifest)} answer files with `mmspec-orch "
        f"import` at {info.get('imported_at')}: {len(files)} file(s), {rows:,} rows, "
        f"{baseline}; each file is one cell at batch size 1.",
        _FORMAT_NOTES.get(fmt, ""),
        "Values the files do not hold are shown as – (prefill and commit seconds, drafted "
        "tokens and the accept rate; per file below), and lossless compares answer texts: "
        "the files hold no token ids.",
    ]
    if unplaced:
        parts.append(
            f"{unplaced} turn(s) of multi-turn samples could not be given their per-step "
            "lengths (the steps reported do not add up to them): their accepted drafts are "
            "new tokens - steps."
        )
    return " ".join(p for p in parts if p)
