"""Acceptance per draft position (vLLM's definition) and the acceptance-length histogram.

vLLM's spec-decode metrics count, per position k of the draft, the drafting steps that accepted
at least k tokens (`num_accepted_tokens_per_pos`), and divide by the number of drafts: the
acceptance rate at position k, which falls with k and whose sum over k is the mean accepted
length. Every row of ours records the accepted drafts of each of its steps (`accept_lengths`,
bonus token excluded), so both follow from the rows:

- drafting steps: the steps a row recorded, less the steps a wrapper chose not to draft
  (`skipped_steps`, ViSkip's plain AR steps, recorded as 0 accepted). A step whose drafter found
  nothing to propose (PLD without a match) still counts, with 0 accepted: the rows do not say
  which steps those were.
- `accept_rate_pos_<k>` = steps that accepted >= k drafts / drafting steps, k = 1 .. the longest
  accepted draft in the run (every later position's rate is 0);
- `accept_hist_<j>` = steps that accepted exactly j drafts / drafting steps, j = 0 .. the same.

Rows of `ar` (which drafts nothing), error rows and rows without recorded lengths (MSD's
imported files keep one mean per turn) are left out; a group with none of its own has nulls.

A million-row run records tens of millions of step lengths: they are counted with one numpy
bincount over (group, length), never exploded into a frame.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pyarrow as pa

DRAFTING_STEPS = "drafting_steps"
_RATE, _HIST = "accept_rate_pos_", "accept_hist_"
_COLUMN = re.compile(rf"^(?:{_RATE}[1-9]\d*|{_HIST}\d+)$")


def rate_column(k: int) -> str:
    """The column of the acceptance rate at draft position k (1-based)."""
    return f"{_RATE}{k}"


def hist_column(j: int) -> str:
    """The column of the share of drafting steps that accepted exactly j drafts."""
    return f"{_HIST}{j}"


def is_acceptance_column(name: str) -> bool:
    """Whether `name` is one of the per-position or histogram columns (their number varies)."""
    return bool(_COLUMN.match(name))


def acceptance_columns(longest: int) -> list[str]:
    """The per-position and histogram columns for a run whose longest accepted draft is
    `longest`, in the order the metrics hold them."""
    if longest < 1:
        return []
    return [
        *(rate_column(k) for k in range(1, longest + 1)),
        *(hist_column(j) for j in range(longest + 1)),
    ]


def positions(columns: list[str]) -> int:
    """The longest position among `columns` (0 when they hold none)."""
    return sum(1 for c in columns if c.startswith(_RATE) and is_acceptance_column(c))


def _lengths(frame: pl.DataFrame, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat step lengths of the kept rows, as stored; where each kept row's start there)."""
    lists = frame["accept_lengths"].filter(pl.Series(keep)).to_arrow()
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    # flatten() starts at the first kept list; the offsets may not (a sliced array)
    return lists.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


# Step lengths counted per block of rows: the (group, length) codes of a block stay in the CPU
# cache, where codes for all of a million-row run's steps (tens of millions) would not.
_BLOCK = 1 << 18


def _joint_counts(
    values: np.ndarray, offsets: np.ndarray, code: np.ndarray, width: int
) -> np.ndarray:
    """counts[g, v]: how many steps of the rows of group g accepted v drafts."""
    groups = int(code.max()) + 1 if code.size else 0
    counts = np.zeros(groups * width, dtype=np.int64)
    rows = np.diff(offsets)
    start = 0
    while start < len(rows):
        # rows [start, stop) hold about _BLOCK steps (at least one row)
        stop = max(start + 1, int(np.searchsorted(offsets, offsets[start] + _BLOCK, "right")) - 1)
        stop = min(stop, len(rows))
        joint = np.repeat(code[start:stop] * width, rows[start:stop])
        joint += values[offsets[start] : offsets[stop]]
        counts += np.bincount(joint, minlength=groups * width)
        start = stop
    return counts.reshape(groups, width)


def acceptance_stats(
    frame: pl.DataFrame, levels: dict[str, pl.Series], baseline: str
) -> tuple[int, dict[str, pl.DataFrame]]:
    """(longest accepted draft, per level: its id column, drafting_steps and the columns of
    acceptance_columns(longest)).

    `frame` holds the rows (status, method, skipped_steps, accept_lengths); `levels` maps each
    level's id column name to the rows' ids at that level (every level must nest in the
    first: a topic lies in one cell).
    """
    keep = (
        (frame["status"] == "ok")
        & (frame["method"].cast(pl.String) != baseline)
        & frame["accept_lengths"].is_not_null()
    ).to_numpy()
    values, offsets = _lengths(frame, keep)
    longest = int(values.max()) if values.size else 0
    if longest < 1:  # nothing accepted anywhere: no position to report
        return 0, {}
    first, fine_ids = next(iter(levels.items()))
    # Dense codes of the finest level's groups among the kept rows.
    groups, code = np.unique(fine_ids.to_numpy()[keep], return_inverse=True)
    width = longest + 1
    hist = _joint_counts(values, offsets, code.astype(np.int64), width)
    skipped = np.bincount(
        code, weights=frame["skipped_steps"].to_numpy()[keep], minlength=len(groups)
    ).astype(np.int64)
    out: dict[str, pl.DataFrame] = {}
    for name, ids in levels.items():
        if name == first:
            level_ids, level_hist, level_skipped = groups, hist, skipped
        else:
            # Each fine group lies in one group of this level: sum the fine counts into it.
            parent = (
                pl.DataFrame({"fine": fine_ids.to_numpy()[keep], "up": ids.to_numpy()[keep]})
                .unique("fine")
                .sort("fine")["up"]
                .to_numpy()
            )
            level_ids, up = np.unique(parent, return_inverse=True)
            level_hist = np.zeros((len(level_ids), width), dtype=np.int64)
            np.add.at(level_hist, up, hist)
            level_skipped = np.bincount(up, weights=skipped, minlength=len(level_ids))
        out[name] = _columns(name, level_ids, level_hist, level_skipped.astype(np.int64))
    return longest, out


def _columns(name: str, ids: np.ndarray, hist: np.ndarray, skipped: np.ndarray) -> pl.DataFrame:
    # Skipped steps are recorded as 0 accepted: they leave the 0 bucket, and the denominator.
    hist = hist.copy()
    hist[:, 0] -= skipped
    drafting = hist.sum(axis=1)
    safe = np.where(drafting > 0, drafting, 1).astype(np.float64)[:, None]
    at_least = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # column k: steps accepting >= k
    longest = hist.shape[1] - 1
    data: dict[str, object] = {name: ids, DRAFTING_STEPS: drafting}
    empty = drafting == 0
    for k in range(1, longest + 1):
        data[rate_column(k)] = np.where(empty, np.nan, at_least[:, k] / safe[:, 0])
    for j in range(longest + 1):
        data[hist_column(j)] = np.where(empty, np.nan, hist[:, j] / safe[:, 0])
    return pl.DataFrame(data).fill_nan(None)
