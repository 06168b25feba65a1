"""Regenerate tests/data/processors/facts.json: what the official processors make of MMSpec
testmini at the real checkpoints' image-processor settings (issue 20, part 1).

Our prompt encoding (`Target.encode`: MMSpec's system message, the chat template, then
`QwenPromptProcessor` for Qwen2.5-VL or the checkpoint's own `LlavaProcessor` /
`LlavaNextProcessor`) is checked in CI by tests/test_processors.py against the facts this
script writes: per profile (checkpoint x prompt style) and testmini sample, the official
processor's `input_ids` (length, image tokens, a hash), `pixel_values` (shape, a hash, mean
and standard deviation) and `image_grid_thw` / `image_sizes`, once with the image processor's
PIL backend and once with its torchvision backend.

`Qwen2_5_VLProcessor` cannot be built without torchvision (its video processor), and the
project venv must keep its CPU torch untouched, so this runs in a side venv that has
torchvision; CI only reads the small JSON it leaves. The real checkpoints' tokenizers are not
on disk: every profile tokenizes with the tiny zoo's tokenizer of the same family
(models/zoo/tiny-*/: the same special tokens and chat-template shape), beside the real
checkpoint's config.json, preprocessor_config.json and processor_config.json copied in
tests/data/processors/<checkpoint>/. Token ids are therefore the tiny vocabulary's; what is
compared is everything the processors decide: where and how many image tokens, pixels, grids.

Side venv (once; the same pins as the project's, plus torchvision):

    python3.11 -m venv ~/.cache/mmspec/processors-venv
    V=~/.cache/mmspec/processors-venv/bin
    $V/pip install torch==2.13.0 torchvision==0.28.0 transformers==5.25.0 tokenizers==0.23.3 \\
        huggingface_hub==2.4.0 numpy==2.4.6 pillow==13.0.0 safetensors==0.8.0 jinja2==3.1.6
    $V/pip install --no-deps -e .

Run (from the repository root; about 1.5 min on 2 cores):

    $V/python benchmarks/processor_parity.py            # write facts.json, print ours vs official
    $V/python benchmarks/processor_parity.py --check    # print only

PyPI's torchvision 0.28.0 wheel is built against CUDA torch; beside the CPU torch its
compiled operators do not load, and importing it fails while registering their meta kernels.
The processors use only its pure-torch transforms, so this script stubs that registration
module before anything imports torchvision (`_stub_torchvision_ops`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "processors"
FACTS = DATA / "facts.json"
SPLIT = REPO.parent / "shared" / "data" / "mmspec" / "testmini"
ZOO = REPO / "models" / "zoo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# profile -> the checkpoint whose processor files it uses, the tiny tokenizer, the prompt style
PROFILES: dict[str, dict[str, str]] = {
    "qwen2.5-vl-7b/mmspec": {
        "checkpoint": "qwen2.5-vl-7b",
        "folder": "Qwen2.5-VL-7B-Instruct",  # MMSpec's pixel bounds follow "Qwen2.5-VL" in it
        "tokenizer": "tiny-qwen2.5-vl",
        "prompt_style": "mmspec",
    },
    "qwen2.5-vl-7b/chat_template": {
        "checkpoint": "qwen2.5-vl-7b",
        "folder": "Qwen2.5-VL-7B-Instruct",
        "tokenizer": "tiny-qwen2.5-vl",
        "prompt_style": "chat_template",
    },
    "llava-1.5-7b/mmspec": {
        "checkpoint": "llava-1.5-7b",
        "folder": "llava-1.5-7b-hf",
        "tokenizer": "tiny-llava",
        "prompt_style": "mmspec",
    },
    "llava-1.6-vicuna-7b/mmspec": {
        "checkpoint": "llava-1.6-vicuna-7b",
        "folder": "llava-v1.6-vicuna-7b-hf",
        "tokenizer": "tiny-llava",
        "prompt_style": "mmspec",
    },
}
BACKENDS = ("pil", "torchvision")


def _stub_torchvision_ops() -> None:
    """Let the CUDA build of torchvision import beside the CPU torch (see the docstring)."""
    name = "torchvision._meta_registrations"
    sys.modules.setdefault(name, types.ModuleType(name))


def make_checkpoint(root: Path, profile: dict[str, str]) -> Path:
    """A weightless checkpoint folder: the real processor configs plus a tiny tokenizer."""
    folder = root / profile["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    for src in (DATA / profile["checkpoint"]).glob("*.json"):
        shutil.copy(src, folder / src.name)
    for name in TOKENIZER_FILES:
        shutil.copy(ZOO / profile["tokenizer"] / name, folder / name)
    return folder


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def pixel_facts(pixels: Any) -> dict[str, Any]:
    """A hash of `pixel_values`' float32 bytes, and their mean and std (in float64)."""
    import numpy as np

    arr = np.ascontiguousarray(pixels.numpy(), dtype=np.float32)
    wide = arr.astype(np.float64)
    return {
        "sha256": hashlib.sha256(arr.tobytes()).hexdigest()[:16],
        "mean": _round(wide.mean()),
        "std": _round(wide.std()),
    }


def encoding_facts(feats: Any, image_token_id: int) -> dict[str, Any]:
    """What a processor decided for one prompt: its ids, image tokens, pixels, grid."""
    ids = feats["input_ids"][0].tolist()
    facts: dict[str, Any] = {
        "len": len(ids),
        "image_tokens": sum(i == image_token_id for i in ids),
        "ids_sha256": ids_digest(ids),
        "pixel_shape": list(feats["pixel_values"].shape),
    }
    for key in ("image_grid_thw", "image_sizes"):
        if key in feats:
            facts[key] = feats[key].tolist()
    return facts


def _round(x: float) -> float:
    return float(f"{x:.9g}")


def official_processor(folder: Path, profile: dict[str, str], backend: str) -> Any:
    """The processor a user of transformers gets from the folder (AutoProcessor, with the
    image-processor backend named), Qwen bounded as MMSpec bounds it under its style."""
    from transformers import AutoImageProcessor, AutoProcessor

    from mmspec.models.prompting import qwen_image_processor_kwargs

    pixels = {}
    if profile["checkpoint"].startswith("qwen"):
        pixels = qwen_image_processor_kwargs(profile["prompt_style"], str(folder))
    image_processor = AutoImageProcessor.from_pretrained(folder, backend=backend, **pixels)
    processor = AutoProcessor.from_pretrained(folder, image_processor=image_processor, **pixels)
    processor.tokenizer.padding_side = "left"
    return processor


def prompt_text(tokenizer: Any, style: str, turn: str) -> str:
    """What `Target.encode` templates for a first turn with its image."""
    from mmspec.models.prompting import system_messages

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turn}]}]
    return tokenizer.apply_chat_template(
        [*system_messages(style), *chat], add_generation_prompt=True, tokenize=False
    )


def our_processor(folder: Path, profile: dict[str, str]) -> Any:
    """Ours, as `models.loader.load_target` builds it for this checkpoint."""
    from mmspec.models.loader import load_processor
    from mmspec.models.target import LlavaTarget, QwenVLTarget

    cls = QwenVLTarget if profile["checkpoint"].startswith("qwen") else LlavaTarget
    # the tiny tokenizer's image token: the real config's id is another vocabulary's
    token_id = _image_token_id(folder, profile)
    names = (profile["checkpoint"], str(folder))
    return load_processor(str(folder), cls, token_id, profile["prompt_style"], names)[0]


def our_features(processor: Any, text: str, image: Any) -> Any:
    """Ours as `Target._process` calls it (no model needed to compare encodings)."""
    from mmspec.models.target import QwenPromptProcessor

    if isinstance(processor, QwenPromptProcessor):
        return processor([text], [image])
    return processor(text=[text], images=[image], padding=True, return_tensors="pt")


def _image_token_id(folder: Path, profile: dict[str, str]) -> int:
    from transformers import AutoTokenizer

    token = "<|image_pad|>" if profile["checkpoint"].startswith("qwen") else "<image>"
    return AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(token)


def image_digest(image: Any) -> str:
    import numpy as np

    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:16]


def collect(split: Path, root: Path) -> tuple[dict[str, Any], list[str]]:
    """Facts for every profile and sample, and a line per disagreement between ours (PIL)
    and the official processors."""
    import torch
    import torchvision
    import transformers
    from PIL import Image

    from mmspec.workloads import load_mmspec

    samples = load_mmspec(split)
    images = {s.id: s.load_image() for s in samples}
    facts: dict[str, Any] = {
        "generated_by": "benchmarks/processor_parity.py",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": Image.__version__,
        },
        "split": "testmini",
        "samples": [{"id": s.id, "image_sha256": image_digest(images[s.id])} for s in samples],
        "profiles": {},
    }
    problems: list[str] = []
    for name, profile in PROFILES.items():
        folder = make_checkpoint(root / name.replace("/", "-"), profile)
        token_id = _image_token_id(folder, profile)
        official = {b: official_processor(folder, profile, b) for b in BACKENDS}
        ours_processor = our_processor(folder, profile)
        kinds = {
            b: type(p).__name__ + "/" + type(p.image_processor).__name__
            for b, p in official.items()
        }
        per_sample: dict[str, Any] = {}
        start = time.perf_counter()
        for s in samples:
            text = prompt_text(official["pil"].tokenizer, profile["prompt_style"], s.turns[0])
            got = {
                b: p(text=[text], images=[images[s.id]], padding=True, return_tensors="pt")
                for b, p in official.items()
            }
            entry = encoding_facts(got["pil"], token_id)
            if encoding_facts(got["torchvision"], token_id) != entry:
                problems.append(f"{name} {s.id}: the two backends give other ids or grids")
            pil, tv = got["pil"]["pixel_values"], got["torchvision"]["pixel_values"]
            entry["pil"] = pixel_facts(pil)
            entry["torchvision"] = pixel_facts(tv)
            entry["torchvision"]["max_abs_diff"] = _round(float((pil - tv).abs().max()))
            mine = our_features(ours_processor, text, images[s.id])
            ours = {**encoding_facts(mine, token_id), "pil": pixel_facts(mine["pixel_values"])}
            problems += [f"{name} {s.id}: {d}" for d in _differences(ours, entry)]
            per_sample[s.id] = entry
        facts["profiles"][name] = {**profile, "processors": kinds, "encodings": per_sample}
        print(f"{name}: {len(samples)} samples in {time.perf_counter() - start:.1f}s ({kinds})")
    return facts, problems


def _differences(ours: dict[str, Any], official: dict[str, Any]) -> list[str]:
    keys = ("len", "image_tokens", "ids_sha256", "pixel_shape", "image_grid_thw", "image_sizes")
    out = [
        f"{key}: ours {ours.get(key)} official {official.get(key)}"
        for key in keys
        if ours.get(key) != official.get(key)
    ]
    if ours["pil"] != official["pil"]:
        out.append(f"pixel_values: ours {ours['pil']} official {official['pil']}")
    return out


def summary(facts: dict[str, Any]) -> list[str]:
    """Per profile: image tokens (min-max), and how far torchvision's pixels are from PIL's."""
    lines = []
    for name, profile in facts["profiles"].items():
        enc = list(profile["encodings"].values())
        tokens = [e["image_tokens"] for e in enc]
        same = sum(e["pil"]["sha256"] == e["torchvision"]["sha256"] for e in enc)
        gaps = {
            k: max(abs(e["pil"][k] - e["torchvision"][k]) for e in enc) for k in ("mean", "std")
        }
        lines.append(
            f"{name}: image tokens {min(tokens)}-{max(tokens)}; torchvision vs PIL pixels: "
            f"identical in {same}/{len(enc)}, max |diff| "
            f"{max(e['torchvision']['max_abs_diff'] for e in enc):.4f}, max |mean diff| "
            f"{gaps['mean']:.1e}, max |std diff| {gaps['std']:.1e}"
        )
    return lines


def dump(value: Any, indent: int = 0) -> str:
    """JSON with one line per small object (a sample's facts), so diffs stay readable."""
    flat = json.dumps(value, sort_keys=True)
    if len(flat) <= 320 or not isinstance(value, (dict, list)):
        return flat
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {dump(value[k], indent + 1)}" for k in sorted(value)]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + dump(v, indent + 1) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=Path, default=SPLIT)
    parser.add_argument("--out", type=Path, default=FACTS)
    parser.add_argument("--check", action="store_true", help="compare and print; write nothing")
    args = parser.parse_args(argv)
    _stub_torchvision_ops()
    with tempfile.TemporaryDirectory() as tmp:
        facts, problems = collect(args.split, Path(tmp))
    print("\n".join(summary(facts)))
    print("\n".join(problems) if problems else "ours (PIL) equals the official PIL processors")
    if not args.check:
        args.out.write_text(dump(facts) + "\n")
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
