"""What both sides of the parity harness share: paths, the prompts, the methods and models.

Standard library only: this module is imported by the reference runner (inside the reference
venv, transformers 4.51.3, no `mmspec`) as well as by our runner, the converter and the
compare step (our venv).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPLIT = REPO.parent / "shared/data/mmspec/testmini"
DEFAULT_PROMPTS = 30  # five samples of each of the six topics: 39 (sample, turn) generations


def parity_home() -> Path:
    """Where the venv, converted checkpoints and outputs go: $MMSPEC_HOME/parity/."""
    home = os.environ.get("MMSPEC_HOME") or str(Path.home() / ".cache/mmspec")
    return Path(home).expanduser() / "parity"


# ---- prompts ---------------------------------------------------------------------------------
MULTI_TURN = "multi-turn conversation"


@dataclass(frozen=True)
class Prompt:
    """One testmini sample: every turn runs, the image with the first."""

    id: str
    topic: str
    turns: tuple[str, ...]
    image: str  # absolute path

    @property
    def question(self) -> str:  # the first turn
        return self.turns[0]


def select_prompts(split: Path, n: int) -> list[Prompt]:
    """n samples spread over the topics: round robin, one sample per topic and round.

    The multi-turn topic comes first in every round (so it is in even for n < 6) and offers
    its samples with the most turns first (testmini: four of 3 turns, one of 2, five of 1),
    the other topics theirs in file order, the rest of the topics in order of first
    appearance. Both sides read this list, so they run the same samples in the same order.
    """
    by_topic: dict[str, list[dict[str, Any]]] = {}
    with open(split / "mmspec.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_topic.setdefault(rec["topic"], []).append(rec)
    if MULTI_TURN in by_topic:
        multi = sorted(by_topic.pop(MULTI_TURN), key=lambda r: -len(r["turns"]))  # stable
        by_topic = {MULTI_TURN: multi, **by_topic}
    chosen: list[dict[str, Any]] = []
    for rank in range(max(len(v) for v in by_topic.values())):
        chosen += [recs[rank] for recs in by_topic.values() if rank < len(recs)]
    return [
        Prompt(r["id"], r["topic"], tuple(r["turns"]), str(split / "images" / r["image"]))
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
    # our side runs a copy of that head whose config.extra has these options (same weights)
    head_options: dict[str, Any] = field(default_factory=dict)


SAM_ARGS = {"total_token": 30, "depth": 3, "top_k": 8, "threshold": 1.0}
LOOKAHEAD_ARGS = {"decoding_length": 64, "branch_length": 12}
RECYCLING_ARGS = {"matrix_top_k": 8, "draft_len": 10}

# the tree every MMSpec script for a trained head passes (scripts/*/eval_*_mmspec.sh)
MMSPEC_TREE = {"depth": 3, "top_k": 8, "total_token": 30}
VISPEC_ARGS = {**MMSPEC_TREE, "num_q": 2}
# eval_msd_mmspec.sh (Qwen2.5-VL-7B): depth 5, top_k 10, total_token 59, eager attention; its
# LLaVA script passes total_token -1 (a timing search over 40..60 that needs CUDA): 59 there too
MSD_TREE = {"depth": 5, "top_k": 10, "total_token": 59}
# eval_msd_vskip_mmspec.sh (both models): depth 5, top_k 10, total_token 30, threshold 0.35
MSD_VSKIP_ARGS = {**MSD_TREE, "total_token": 30, "visual_attn_threshold": 0.35}

# an EAGLE head's option for what it reads at image slots: null = the image features
# (methods/head_image_slots.py)
IMAGE_FEATURES = {"image_slot_token": None}

METHODS: dict[str, Method] = {
    "ar": Method(ref="baseline", ours="ar"),
    # scripts/*/eval_pld_mmspec.sh: ngram 4, n_pred 10 (spec_model_pld.py hard-codes both)
    "pld": Method(ref="pld", ours="pld", ref_args={"ngram": 4, "n_pred": 10}),
    # the same made lossless at run time (README, "Reference fixes"): its prefill drops
    # image_grid_thw (Qwen2.5-VL's image tokens get 1D positions), on LLaVA it keeps the keys
    # of rejected drafts, it stops early on a repeated tail
    "pld-fixed": Method(ref="pld-fixed", ours="pld", ref_args={"ngram": 4, "n_pred": 10}),
    # eval_eagle2_mmspec.sh: depth 3, top_k 8, total_token 30, threshold 0.3
    "eagle2": Method(
        ref="eagle2",
        ours="eagle2",
        ref_args={**MMSPEC_TREE, "threshold": 0.3},
        head="eagle",
    ),
    # eval_eagle_mmspec.sh: MMSpec's "eagle" is its EAGLE-2 code with the threshold commented
    # out (method/eagle/cnets.py), a dynamic tree; so is our eagle's default (tree: dynamic)
    "eagle": Method(
        ref="eagle",
        ours="eagle",
        ref_args=MMSPEC_TREE,
        head="eagle",
    ),
    # both sides with the head's prompt image slots read as the image features, the other
    # image-slot rule (MMSpec's on Qwen2.5-VL and LLaVA-NeXT; its LLaVA-1.5 path embeds the
    # <image> token, as the zoo's LLaVA head was trained): the same as above on Qwen
    "eagle2-imgfeat": Method(
        ref="eagle2-imgfeat",
        ours="eagle2",
        ref_args={**MMSPEC_TREE, "threshold": 0.3},
        head="eagle",
        head_options=IMAGE_FEATURES,
    ),
    "eagle-imgfeat": Method(
        ref="eagle-imgfeat",
        ours="eagle",
        ref_args=MMSPEC_TREE,
        head="eagle",
        head_options=IMAGE_FEATURES,
    ),
    # the EAGLE-1 paper's static 25-node tree against MMSpec's "eagle": expected to differ
    "eagle-static": Method(
        ref="eagle",
        ours="eagle",
        ref_args=MMSPEC_TREE,
        ours_args={"tree": "static"},
        head="eagle",
    ),
    # eval_eagle3_mmspec.sh: depth 3, top_k 8, total_token 30 (no threshold reaches it)
    "eagle3": Method(
        ref="eagle3",
        ours="eagle3",
        ref_args=MMSPEC_TREE,
        head="eagle3",
    ),
    # eval_vispec_mmspec.sh: depth 3, top_k 8, total_token 30, num_q 2
    "vispec": Method(
        ref="vispec",
        ours="vispec",
        ref_args=VISPEC_ARGS,
        head="vispec",
    ),
    # ViSkip: eval_vispec_vskip_mmspec.sh (visual_attn_threshold 0.35, eager attention)
    # against ours wrapped in viskip (threshold 0.35, its default)
    "vispec-vskip": Method(
        ref="vispec-vskip",
        ours="viskip+vispec",
        ref_args={**VISPEC_ARGS, "visual_attn_threshold": 0.35},
        ours_args={"viskip_threshold": 0.35},
        head="vispec",
    ),
    "vispec-vskip-fixed": Method(
        ref="vispec-vskip-fixed",
        ours="viskip+vispec",
        ref_args={**VISPEC_ARGS, "visual_attn_threshold": 0.35},
        ours_args={"viskip_threshold": 0.35},
        head="vispec",
    ),
    # eval_medusa_mmspec.sh: depth 3, top_k 8, total_token 30 (its topK_genrate reads no depth)
    "medusa": Method(
        ref="medusa",
        ours="medusa",
        ref_args=MMSPEC_TREE,
        head="medusa",
    ),
    # eval_sam_mmspec.sh: total_token 30, depth 3, top_k 8, threshold 1.0 (none reaches the
    # drafter; total_token only shortens the loop bound), eager attention
    "sam": Method(ref="sam", ours="sam", ref_args=SAM_ARGS),
    # the same without its stop on a thrice-repeated tail n-gram (which cuts the output)
    "sam-fixed": Method(ref="sam-fixed", ours="sam", ref_args=SAM_ARGS),
    # eval_sam_vskip_mmspec.sh: SAM's arguments, visual_attn_threshold 0.35, eager attention
    "sam-vskip": Method(
        ref="sam-vskip",
        ours="viskip+sam",
        ref_args={**SAM_ARGS, "visual_attn_threshold": 0.35},
        ours_args={"viskip_threshold": 0.35},
    ),
    "sam-vskip-fixed": Method(
        ref="sam-vskip-fixed",
        ours="viskip+sam",
        ref_args={**SAM_ARGS, "visual_attn_threshold": 0.35},
        ours_args={"viskip_threshold": 0.35},
    ),
    # MSD: MMSpec's own EaModel (method/msd); on Qwen2.5-VL it runs the target with 1D
    # positions and, under the eager attention its script loads, without the tree mask
    "msd": Method(ref="msd", ours="msd", ref_args=MSD_TREE, head="msd"),
    # the same with the target's M-RoPE positions and the tree mask (README, "Reference fixes")
    "msd-fixed": Method(ref="msd-fixed", ours="msd", ref_args=MSD_TREE, head="msd"),
    # ours with the tree right after the sequence on LLaVA too (EAGLE's positions): expected
    # to differ from MMSpec's LLaVA path, whose tree sits one position further
    "msd-sequence": Method(
        ref="msd-fixed",
        ours="msd",
        ref_args=MSD_TREE,
        ours_args={"tree_positions": "sequence"},
        head="msd",
    ),
    # method/msd_vskip (plain MSD on HF LLaVA) against ours wrapped in viskip, threshold 0.35
    "msd-vskip": Method(
        ref="msd-vskip",
        ours="viskip+msd",
        ref_args=MSD_VSKIP_ARGS,
        ours_args={"viskip_threshold": 0.35, "total_token": 30},
        head="msd",
    ),
    # the same with msd-fixed's fixes and without its stop on a repeated tail
    "msd-vskip-fixed": Method(
        ref="msd-vskip-fixed",
        ours="viskip+msd",
        ref_args=MSD_VSKIP_ARGS,
        ours_args={"viskip_threshold": 0.35, "total_token": 30},
        head="msd",
    ),
    # eval_lookahead_mmspec.sh: decoding_length 64, branch_length 12; one cache for the run
    "lookahead": Method(ref="lookahead", ours="lookahead", ref_args=LOOKAHEAD_ARGS),
    # the same with a fresh cache per generation, as ours drafts (per request)
    "lookahead-fresh": Method(ref="lookahead-fresh", ours="lookahead", ref_args=LOOKAHEAD_ARGS),
    # eval_recycling_mmspec.sh: matrix_top_k 8, draft_len 10
    "recycling": Method(ref="recycling", ours="recycling", ref_args=RECYCLING_ARGS),
    # the same made lossless at run time: its prefill M-RoPE omission (as PLD's), its
    # verification's chunk positions on Qwen2.5-VL, its cycle guards and repeated-tail stop,
    # its LLaVA cache length
    "recycling-fixed": Method(ref="recycling-fixed", ours="recycling", ref_args=RECYCLING_ARGS),
}


# ---- models ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    ours: str  # registry name for mmspec.models.loader.load_target
    family: str  # "qwen2.5-vl" | "llava": which converter applies


MODELS: dict[str, Model] = {
    "tiny-qwen2.5-vl": Model(ours="tiny-qwen2.5-vl", family="qwen2.5-vl"),
    "tiny-llava": Model(ours="tiny-llava", family="llava"),
}


def ckpt_dir(root: Path, model: str) -> Path:
    """The converted target (lower case: MMSpec's pixel bounds apply only to "Qwen2.5-VL")."""
    return root / "ckpt" / model / "target"


def named_target(root: Path, model: str) -> Path:
    """The converted target under a path MMSpec's MSD reads the family from: its EaModel takes
    the head's config as Qwen2-VL's only where the base model's path contains "Qwen" (as the
    hub ids do). Qwen targets get a `Qwen-target` symlink beside `target` (convert.py); the
    name holds no "Qwen2.5-VL", so the pixel bounds stay off there too."""
    target = ckpt_dir(root, model)
    return target.with_name("Qwen-target") if MODELS[model].family == "qwen2.5-vl" else target


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


def runner_arguments(description: str) -> argparse.ArgumentParser:
    """The options both runners take, so the two sides always run the same prompts alike."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="tiny-qwen2.5-vl")
    ap.add_argument("--methods", default="ar,pld,eagle2")
    ap.add_argument(
        "--serve",
        action="store_true",
        help="take method names from stdin, one per line, instead of --methods; print "
        f"'{DONE} <method>' after each (run.py alternates the two sides this way)",
    )
    ap.add_argument("--split", type=Path, default=DEFAULT_SPLIT)
    ap.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per turn (best kept)")
    ap.add_argument("--threads", type=int, default=1)
    return ap


# ---- alternating the two sides ------------------------------------------------------------
DONE = "PARITY-DONE"


def each_method(args: argparse.Namespace) -> Iterator[str]:
    """The methods a runner runs: --methods, or with --serve the names run.py sends on stdin,
    each acknowledged once the caller has run it (the loop asks for the next name)."""
    if not args.serve:
        yield from args.methods.split(",")
        return
    for line in sys.stdin:
        name = line.strip()
        if name:
            yield name
            print(f"{DONE} {name}", flush=True)
