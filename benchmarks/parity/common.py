"""What both sides of the parity harness share: paths, the prompts, the methods and models.

Standard library only: this module is imported by the reference runner (inside the reference
venv, transformers 4.51.3, no `mmspec`) as well as by our runner, the converter and the
compare step (our venv).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPLIT = REPO.parent / "shared/data/mmspec/testmini"


def parity_home() -> Path:
    """Where the venv, converted checkpoints and outputs go: $MMSPEC_HOME/parity/."""
    home = os.environ.get("MMSPEC_HOME") or str(Path.home() / ".cache/mmspec")
    return Path(home).expanduser() / "parity"


# ---- prompts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    id: str
    topic: str
    question: str  # the first turn
    image: str  # absolute path


def select_prompts(split: Path, n: int) -> list[Prompt]:
    """First turns, one per topic in order of first appearance, then round robin.

    5 of testmini's six topics by default; both sides read this list, so they run the same
    samples in the same order.
    """
    by_topic: dict[str, list[dict[str, Any]]] = {}
    with open(split / "mmspec.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_topic.setdefault(rec["topic"], []).append(rec)
    chosen: list[dict[str, Any]] = []
    for rank in range(max(len(v) for v in by_topic.values())):
        chosen += [recs[rank] for recs in by_topic.values() if rank < len(recs)]
    return [
        Prompt(r["id"], r["topic"], r["turns"][0], str(split / "images" / r["image"]))
        for r in chosen[:n]
    ]


# ---- methods ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One harness method: how MMSpec's eval script runs it, and which drafter of ours."""

    ref: str  # an adapter in ref_runner.ADAPTERS (one per MMSpec eval_*_mmspec.py)
    ours: str  # a name in mmspec.methods.registry
    ref_args: dict[str, Any] = field(default_factory=dict)  # as scripts/Qwen2.5-VL-7B/*.sh
    # empty = our defaults, which is what the harness is there to prove
    ours_args: dict[str, Any] = field(default_factory=dict)
    head: str | None = None  # the trained head it runs (converted for the reference)


METHODS: dict[str, Method] = {
    "ar": Method(ref="baseline", ours="ar"),
    # scripts/*/eval_pld_mmspec.sh: ngram 4, n_pred 10 (spec_model_pld.py hard-codes both)
    "pld": Method(ref="pld", ours="pld", ref_args={"ngram": 4, "n_pred": 10}),
    # the same with MMSpec's PLD prefill bug fixed at run time (README, "Reference fixes"):
    # its prefill drops image_grid_thw, so Qwen2.5-VL's image tokens get 1D positions
    "pld-mrope": Method(ref="pld-mrope", ours="pld", ref_args={"ngram": 4, "n_pred": 10}),
    # eval_eagle2_mmspec.sh: depth 3, top_k 8, total_token 30, threshold 0.3
    "eagle2": Method(
        ref="eagle2",
        ours="eagle2",
        ref_args={"depth": 3, "top_k": 8, "total_token": 30, "threshold": 0.3},
        head="eagle",
    ),
    # eval_eagle_mmspec.sh: MMSpec's "eagle" is its EAGLE-2 code with the threshold commented
    # out (method/eagle/cnets.py), a dynamic tree; so is our eagle's default (tree: dynamic)
    "eagle": Method(
        ref="eagle",
        ours="eagle",
        ref_args={"depth": 3, "top_k": 8, "total_token": 30},
        head="eagle",
    ),
    # the EAGLE-1 paper's static 25-node tree against MMSpec's "eagle": expected to differ
    "eagle-static": Method(
        ref="eagle",
        ours="eagle",
        ref_args={"depth": 3, "top_k": 8, "total_token": 30},
        ours_args={"tree": "static"},
        head="eagle",
    ),
}


# ---- models ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    ours: str  # registry name for mmspec.models.loader.load_target
    family: str  # "qwen2.5-vl" | "llava": which converter applies


MODELS: dict[str, Model] = {
    "tiny-qwen2.5-vl": Model(ours="tiny-qwen2.5-vl", family="qwen2.5-vl"),
    "tiny-llava": Model(ours="tiny-llava", family="llava"),  # no converter yet
}


def ckpt_dir(root: Path, model: str) -> Path:
    """The converted target (lower case: MMSpec's pixel bounds apply only to "Qwen2.5-VL")."""
    return root / "ckpt" / model / "target"


def head_dir(root: Path, model: str, head: str) -> Path:
    return root / "ckpt" / model / head


# ---- results ---------------------------------------------------------------------------------
def result_path(out: Path, side: str, model: str, method: str) -> Path:
    return out / side / model / f"{method}.json"


def pixels_sha256(pixel_values: Any) -> str | None:
    """A digest of the image tensor the target sees (float32 bytes), to compare the two
    processors' outputs without storing them."""
    if pixel_values is None:
        return None
    return hashlib.sha256(pixel_values.float().contiguous().numpy().tobytes()).hexdigest()


def write_result(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def read_result(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None
