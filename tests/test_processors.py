"""Processor parity at the real checkpoints' settings (issue 20, part 1).

Our prompt encoding (`Target.encode` with the processor `load_target` builds) of every MMSpec
testmini sample's first turn against what the official processors made of it:
`Qwen2_5_VLProcessor`, `LlavaProcessor` and `LlavaNextProcessor` with the real checkpoints'
preprocessor configs, recorded in tests/data/processors/facts.json by
benchmarks/processor_parity.py (it needs torchvision, which CI does not have). The real
tokenizers are not on disk: both sides tokenize with the tiny zoo's tokenizer of the family.

Ours uses the image processors' PIL backend (models/loader.py says why): its pixels must be
the official PIL backend's bit for bit; the official torchvision backend's differ by up to
0.26 after normalisation (about 17/255), so against those only shapes, ids and pixel
statistics are compared.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmspec.models.prompting import MMSPEC_QWEN_PIXELS
from mmspec.workloads import load_mmspec
from tests.conftest import mmspec_split
from tests.real_checkpoints import DATA, FACTS, checkpoint_dir, image_token, weightless_target

FACTS_DATA: dict[str, Any] = json.loads(FACTS.read_text())
PROFILES = sorted(FACTS_DATA["profiles"])
# ours (PIL) against torchvision: the largest gaps on testmini are 1.2e-4 (mean), 8.6e-5 (std)
STAT_TOLERANCE = 5e-4
# every testmini sample for the two checkpoints of the first full grid; every third for the
# others, whose images are 2-5x larger (keeps the file near 15 s on 2 cores)
STRIDE = {"qwen2.5-vl-7b/chat_template": 3, "llava-1.6-vicuna-7b/mmspec": 3}
# what both backends decide alike and ours must equal exactly
EXACT = ("len", "image_tokens", "ids_sha256", "pixel_shape", "image_grid_thw", "image_sizes")


@pytest.fixture(scope="module")
def samples() -> list[Any]:
    return load_mmspec(mmspec_split("testmini"))


def _chat(turn: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turn}]}]


def _digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def _pixels(values: Any) -> dict[str, Any]:
    arr = np.ascontiguousarray(values.numpy(), dtype=np.float32)
    return {
        "sha256": hashlib.sha256(arr.tobytes()).hexdigest()[:16],
        "mean": float(arr.astype(np.float64).mean()),
        "std": float(arr.astype(np.float64).std()),
    }


def _mismatches(target: Any, sample: Any, expected: dict[str, Any], decoded: str) -> list[str]:
    """How our encoding of `sample` differs from the official processors' facts."""
    image = sample.load_image()
    prompt = target.encode([_chat(sample.turns[0])], [image])
    ids = prompt.tokens()[0]
    token_id = target.tokenizer.convert_tokens_to_ids(image_token(target.name))
    ours: dict[str, Any] = {
        "len": len(ids),
        "image_tokens": ids.count(token_id),
        "ids_sha256": _digest(ids),
        "pixel_shape": list(prompt.inputs["pixel_values"].shape),
    }
    for key in ("image_grid_thw", "image_sizes"):
        if key in prompt.inputs:
            ours[key] = prompt.inputs[key].tolist()
    bad = [
        f"{sample.id} {key}: ours {ours.get(key)}, official {expected.get(key)}"
        for key in EXACT
        if ours.get(key) != expected.get(key)
    ]
    pixels = _pixels(prompt.inputs["pixel_values"])
    # a Pillow that decodes the JPEG otherwise changes the pixels, not our processing
    same_image = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:16] == decoded
    if same_image and pixels["sha256"] != expected["pil"]["sha256"]:
        bad.append(f"{sample.id} pixel_values differ from the official PIL backend's")
    for stat in ("mean", "std"):
        for backend in ("pil", "torchvision"):
            gap = abs(pixels[stat] - expected[backend][stat])
            if gap > STAT_TOLERANCE:
                bad.append(f"{sample.id} pixel {stat} {gap:.1e} from the {backend} backend's")
    return bad


@pytest.mark.parametrize("profile", PROFILES)
def test_our_encoding_equals_the_official_processors(
    profile: str, samples: list[Any], tmp_path: Path
) -> None:
    facts = FACTS_DATA["profiles"][profile]
    name, style = facts["checkpoint"], facts["prompt_style"]
    target = weightless_target(checkpoint_dir(tmp_path, name), name, style)
    assert type(target.processor.image_processor).__name__.endswith("Pil")
    decoded = {s["id"]: s["image_sha256"] for s in FACTS_DATA["samples"]}
    assert sorted(decoded) == sorted(s.id for s in samples), "facts from another testmini"
    bad = []
    for sample in samples[:: STRIDE.get(profile, 1)]:
        bad += _mismatches(target, sample, facts["encodings"][sample.id], decoded[sample.id])
    assert not bad, f"{len(bad)} mismatches, first: " + "; ".join(bad[:5])


def test_the_facts_cover_mmspecs_qwen_pixel_bounds() -> None:
    """MMSpec's bounds (256..1280 merged patches) hold under its prompt style; the checkpoint's
    own (3136..12845056 pixels) let testmini's images outside them under the chat template."""
    low = MMSPEC_QWEN_PIXELS["min_pixels"] // (28 * 28)
    high = MMSPEC_QWEN_PIXELS["max_pixels"] // (28 * 28)
    counts = {
        p: [e["image_tokens"] for e in FACTS_DATA["profiles"][p]["encodings"].values()]
        for p in ("qwen2.5-vl-7b/mmspec", "qwen2.5-vl-7b/chat_template")
    }
    assert all(low <= n <= high for n in counts["qwen2.5-vl-7b/mmspec"])
    own = counts["qwen2.5-vl-7b/chat_template"]
    assert min(own) < low and max(own) > high
    # the 3B ships the 7B's image processor: these facts cover it too
    assert (DATA / "qwen2.5-vl-3b" / "preprocessor_config.json").read_text() == (
        DATA / "qwen2.5-vl-7b" / "preprocessor_config.json"
    ).read_text()


def test_a_left_padded_batch_encodes_each_row_as_alone(samples: list[Any], tmp_path: Path) -> None:
    """Four images of different sizes in one batch: each row's ids are its single encoding's."""
    for profile in ("qwen2.5-vl-7b/mmspec", "llava-1.6-vicuna-7b/mmspec"):
        facts = FACTS_DATA["profiles"][profile]
        name = facts["checkpoint"]
        target = weightless_target(checkpoint_dir(tmp_path / name, name), name, "mmspec")
        batch = samples[::15][:4]
        prompt = target.encode([_chat(s.turns[0]) for s in batch], [s.load_image() for s in batch])
        assert [_digest(ids) for ids in prompt.tokens()] == [
            facts["encodings"][s.id]["ids_sha256"] for s in batch
        ]
        assert prompt.attention_mask[:, 0].tolist().count(0) == 3  # left padded: one is longest
