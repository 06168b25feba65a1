"""How grid values become ids and path parts (cell ids, shard ids, result folders, method names).

One place, so a cell id, its shard ids and its result path always agree.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_UNDERSCORES = re.compile(r"_+")

VISKIP_PREFIX = "viskip+"  # `viskip+<method>`: ViSkip wrapped around a registered method


def safe_name(value: str) -> str:
    """A model id or path as a single path part: '/' -> '--', other odd characters -> '_'.

    Leading dots and dashes are dropped so a local path ("./ckpt", "/data/x") never yields a
    hidden or option-like name.
    """
    return _UNSAFE.sub("_", value.replace("/", "--")).lstrip(".-") or "_"


def method_id(method: str) -> str:
    """A method's or variant's name as cell ids and result folders spell it.

    Registered names pass unchanged; a swept variant's brackets, `=` and `,` become single `_`:
    `viskip+pld[viskip_threshold=0.2]` -> `viskip+pld_viskip_threshold_0.2` (never `__`, which
    separates the parts of a cell id). The grid checks that no two of its variants share one.
    """
    safe = safe_name(method)
    return safe if safe == method else _UNDERSCORES.sub("_", safe).strip("_") or "_"


def format_temperature(temperature: float) -> str:
    """Shortest exact text of a temperature for ids: 0.0 -> '0', 0.7 -> '0.7'.

    repr() round-trips, so two different temperatures never share an id.
    """
    text = repr(float(temperature))
    return text.removesuffix(".0")


def cell_id(
    model_id: str,
    method: str,
    batch_size: int,
    temperature: float,
    repeat: int,
    workload: str,
    scenario: str = "static",
    rate: float | None = None,
) -> str:
    """e.g. 'tiny-qwen2.5-vl__pld__bs4__t0__r0__synthetic' (`method` as `method_id` spells it).

    A serving cell's load part replaces `bs<b>`: `cc4` (continuous, concurrency 4) or
    `poisson0.5x8` (arrivals at 0.5/s, at most 8 rows together); static ids are as they always
    were, so older run folders resume.
    """
    return "__".join(
        (
            safe_name(model_id),
            method_id(method),
            load_id(scenario, batch_size, rate),
            f"t{format_temperature(temperature)}",
            f"r{repeat}",
            workload,
        )
    )


def load_id(scenario: str, batch_size: int, rate: float | None = None) -> str:
    """A cell id's load part: `bs4` (static), `cc4` (continuous), `poisson2x8` (poisson)."""
    if scenario == "static":
        return f"bs{batch_size}"
    if scenario == "continuous":
        return f"cc{batch_size}"
    if scenario == "poisson" and rate is not None:
        # format_temperature: the shortest exact text of a float, never `__`
        return f"poisson{format_temperature(rate)}x{batch_size}"
    raise ValueError(f"no id for scenario {scenario!r} with rate {rate!r}")


def shard_id(cell: str, index: int) -> str:
    """e.g. '<cell_id>__s003' (zero-padded so ids sort in shard order)."""
    return f"{cell}__s{index:03d}"
