"""Limits a model cannot meet fail at validation (its config.json read without weights), and
a prompt that leaves no room for max_new_tokens fails its batch before prefill."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest

from mmspec.models.model_limits import ModelLimits, limits_of, model_limits
from mmspec.orchestrator.grid import GridError, parse_grid
from tests.test_grid import builtin_workloads, with_  # noqa: F401 - fixture

# a checkpoint's config as the VLMs write it: the language model's limits in text_config
SMALL = {
    "model_type": "llava",
    "text_config": {"max_position_embeddings": 512, "num_hidden_layers": 2},
}


def checkpoint(tmp_path: Path, config: Any = SMALL) -> str:
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    return str(folder)


def test_the_zoo_models_limits_are_read_without_torch() -> None:
    assert model_limits("tiny-llava") == ModelLimits(context_length=8192, num_layers=4)
    assert model_limits("tiny-qwen2.5-vl") == ModelLimits(context_length=8192, num_layers=4)
    # top-level keys (older Qwen2.5-VL configs) count when text_config is absent
    assert limits_of({"max_position_embeddings": 32768, "num_hidden_layers": 28}) == ModelLimits(
        32768, 28
    )
    assert limits_of({"text_config": {"num_hidden_layers": True}}) == ModelLimits(None, None)


@pytest.mark.parametrize("tokens", [8192, 10**9])
def test_max_new_tokens_beyond_the_context_fails_validation(tokens: int) -> None:
    with pytest.raises(GridError) as info:
        parse_grid(with_(max_new_tokens=tokens), "g.yaml")
    message = str(info.value)
    assert message.startswith(f"g.yaml: max_new_tokens: {tokens} new tokens do not fit"), message
    assert "model tiny-qwen2.5-vl's context of 8192 tokens" in message
    assert message.endswith("allowed: positive integers below 8192")


def test_max_new_tokens_within_the_context_passes() -> None:
    assert parse_grid(with_(max_new_tokens=8191)).max_new_tokens == 8191


def test_a_local_checkpoint_is_read(tmp_path: Path) -> None:
    model = checkpoint(tmp_path)
    with pytest.raises(GridError, match=re.escape(f"{model}'s context of 512 tokens")):
        parse_grid(with_(models=[model], max_new_tokens=512))
    assert parse_grid(with_(models=[model], max_new_tokens=511)).max_new_tokens == 511


@pytest.mark.parametrize("config", ["{not json", [1, 2], {"text_config": "?"}])
def test_an_unreadable_config_skips_the_check(tmp_path: Path, config: Any) -> None:
    model = checkpoint(tmp_path, config)
    assert parse_grid(with_(models=[model], max_new_tokens=10**6)).max_new_tokens == 10**6


def test_a_hub_id_is_read_only_from_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    # not cached: no download, no check
    assert model_limits("someorg/some-vlm") is None
    assert parse_grid(with_(models=["someorg/some-vlm"], max_new_tokens=10**6))
    # cached (the hub cache's layout): read like a local checkpoint
    repo = tmp_path / "models--someorg--some-vlm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(SMALL))
    assert model_limits("someorg/some-vlm") == ModelLimits(512, 2)
    with pytest.raises(GridError, match="someorg/some-vlm's context of 512"):
        parse_grid(with_(models=["someorg/some-vlm"], max_new_tokens=10**6))


def test_model_limits_does_not_load_torch() -> None:
    code = (
        "import sys; from mmspec.models.model_limits import model_limits; "
        "model_limits('tiny-llava'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- layer options


def viskip(layers: Any, models: list[Any] | None = None) -> dict[str, Any]:
    return with_(
        methods=["ar", "viskip+pld"],
        method_args={"viskip+pld": {"viskip_layers": layers}},
        models=models or ["tiny-llava"],
    )


@pytest.mark.parametrize("layers", [[99], [-1, 4], [-5]])
def test_a_layer_past_the_models_layers_fails_validation(layers: list[int]) -> None:
    with pytest.raises(GridError) as info:
        parse_grid(viskip(layers), "g.yaml")
    bad = next(i for i in layers if not -4 <= i < 4)
    assert str(info.value) == (
        f"g.yaml: method_args.viskip+pld.viskip_layers: layer {bad} is out of range for model "
        "tiny-llava (4 decoder layers); allowed: integers from -4 to 3"
    )


def test_layers_within_every_model_pass(tmp_path: Path) -> None:
    grid = parse_grid(viskip([-2, 0, 1], ["tiny-llava", checkpoint(tmp_path)]))
    assert grid.method_args["viskip+pld"]["viskip_layers"] == [-2, 0, 1]
    # the smaller model decides
    with pytest.raises(GridError, match=r"layer 2 is out of range for model .*ckpt"):
        parse_grid(viskip([2], ["tiny-llava", checkpoint(tmp_path)]))


# ----------------------------------------------------------------------------- per sample


@pytest.fixture(scope="module")
def target() -> Any:
    import torch

    from mmspec.models.loader import load_target

    torch.set_num_threads(1)
    return load_target("tiny-llava", device="cpu")


def chat(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def test_a_prompt_without_room_for_the_answer_fails_before_prefill(
    target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmspec.models.target import ContextLengthError

    assert target.context_length == 8192
    convs = [chat("short?"), chat("a much longer question " * 20)]
    lens = target.encode(convs, [None, None]).prompt_lens
    assert target.encode(convs, [None, None], max_new_tokens=8192 - max(lens)).prompt_lens == lens
    with pytest.raises(ContextLengthError) as info:
        target.encode(convs, [None, None], max_new_tokens=10**9)
    assert info.value.rows == [0, 1]
    # only the row that does not fit is named
    monkeypatch.setattr(target, "context_length", lens[0] + 64)
    with pytest.raises(ContextLengthError) as info:
        target.encode(convs, [None, None], max_new_tokens=64)
    assert info.value.rows == [1]
    assert str(info.value) == (
        f"prompt of {lens[1]} tokens (batch row 1) + max_new_tokens 64 exceeds model "
        f"tiny-llava's context of {lens[0] + 64} tokens"
    )


def test_the_engine_checks_before_generating(target: Any) -> None:
    from mmspec.methods.engine import Engine
    from mmspec.methods.registry import get_drafter
    from mmspec.models.target import ContextLengthError

    engine = Engine(target, get_drafter("ar")())
    # was: ran (practically) forever, the shard never written
    with pytest.raises(ContextLengthError, match="max_new_tokens 1000000000 exceeds"):
        engine.generate([chat("hello?")], [None], max_new_tokens=10**9)
    assert len(engine.generate([chat("hello?")], [None], max_new_tokens=3)[0].tokens) <= 3
