"""Prompt setup: MMSpec's system message and Qwen pixel bounds (the default for real
checkpoints), the model's own chat template as an option, chosen per model in the grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from mmspec.models.loader import ModelLoadError, load_target
from mmspec.models.prompting import (
    MMSPEC_QWEN_PIXELS,
    MMSPEC_SYSTEM,
    default_prompt_style,
    qwen_image_processor_kwargs,
)
from mmspec.models.tiny import tiny_init_path, tiny_model_path
from mmspec.orchestrator.grid import GridError, parse_grid, to_dict

CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]


def test_defaults_per_model() -> None:
    assert default_prompt_style("qwen2.5-vl-7b") == "mmspec"
    assert default_prompt_style("Qwen/Qwen2.5-VL-7B-Instruct") == "mmspec"
    assert default_prompt_style("llava-1.5-7b") == "mmspec"
    assert default_prompt_style("./my-checkpoint") == "mmspec"
    # the tiny zoo was trained and measured on its own chat template
    assert default_prompt_style("tiny-qwen2.5-vl") == "chat_template"
    assert default_prompt_style("tiny-llava") == "chat_template"
    # also where they are loaded by path: the zoo and the untrained builds
    assert default_prompt_style(str(tiny_model_path("tiny-llava"))) == "chat_template"
    assert default_prompt_style(str(tiny_init_path("tiny-llava"))) == "chat_template"


def test_qwen_pixel_bounds_follow_mmspecs_path_test() -> None:
    bounds = qwen_image_processor_kwargs("mmspec", "qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert bounds == MMSPEC_QWEN_PIXELS
    assert MMSPEC_QWEN_PIXELS == {"min_pixels": 200704, "max_pixels": 1003520}
    assert qwen_image_processor_kwargs("chat_template", "Qwen/Qwen2.5-VL-7B-Instruct") == {}
    assert qwen_image_processor_kwargs("mmspec", "tiny-qwen2.5-vl", "/zoo/tiny-qwen2.5-vl") == {}


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_mmspec_style_sends_the_system_message(model: str) -> None:
    image = Image.new("RGB", (64, 64), "red")
    own = load_target(model, device="cpu")
    mmspec = load_target(model, device="cpu", prompt_style="mmspec")
    assert (own.prompt_style, mmspec.prompt_style) == ("chat_template", "mmspec")
    own_text = own.tokenizer.decode(own.encode([CHAT], [image]).input_ids[0])
    mmspec_text = mmspec.tokenizer.decode(mmspec.encode([CHAT], [image]).input_ids[0])
    assert MMSPEC_SYSTEM not in own_text
    assert MMSPEC_SYSTEM in mmspec_text
    if model == "tiny-qwen2.5-vl":
        assert "You are a helpful assistant." in own_text
        assert "You are a helpful assistant." not in mmspec_text


def test_a_qwen25_vl_checkpoint_gets_mmspecs_pixel_bounds(tmp_path: Path) -> None:
    # a real checkpoint folder is recognised as MMSpec does: "Qwen2.5-VL" in its path
    ckpt = tmp_path / "Qwen2.5-VL-tiny"
    shutil.copytree(tiny_model_path("tiny-qwen2.5-vl"), ckpt)
    image = Image.new("RGB", (640, 480), "blue")
    grids = {}
    for style in ("mmspec", "chat_template"):
        target = load_target(str(ckpt), device="cpu", prompt_style=style)
        grids[style] = target.encode([CHAT], [image]).inputs["image_grid_thw"].tolist()
    # the checkpoint's own bounds (56x56..112x112) shrink it; MMSpec's keep 640x480 whole
    assert grids == {"mmspec": [[1, 34, 46]], "chat_template": [[1, 6, 8]]}


def test_unknown_style_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="prompt_style must be one of mmspec, chat_template"):
        load_target("tiny-llava", device="cpu", prompt_style="vicuna")


def _grid(**model: object) -> dict:
    return {
        "name": "p",
        "workloads": [{"builtin": "synthetic", "limit": 6}],
        "models": [{"id": "tiny-llava", **model}, {"id": "Qwen/Qwen2.5-VL-7B-Instruct"}],
        "methods": ["ar"],
    }


def test_the_grid_resolves_and_records_the_style() -> None:
    grid = parse_grid(_grid(), "grid.yaml")
    assert [m.prompt_style for m in grid.models] == ["chat_template", "mmspec"]
    assert [m["prompt_style"] for m in to_dict(grid)["models"]] == ["chat_template", "mmspec"]
    chosen = parse_grid(_grid(prompt_style="mmspec"), "grid.yaml")
    assert chosen.models[0].prompt_style == "mmspec"
    assert parse_grid(to_dict(chosen), "manifest.json") == chosen


def test_the_grid_rejects_an_unknown_style() -> None:
    with pytest.raises(GridError, match=r"models\[0\]\.prompt_style.*unknown prompt style 'x'"):
        parse_grid(_grid(prompt_style="x"), "grid.yaml")
