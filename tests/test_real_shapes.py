"""Real checkpoints at real shapes, without their weights (issue 20, part 2).

The configs of Qwen2.5-VL-3B/7B, LLaVA-1.5-7B and LLaVA-1.6-vicuna-7b (tests/data/processors/)
built on the meta device at full size: parameter counts, the adapter's M-RoPE positions and
the image token counts the model's own image path produces, against our processor's. Then the
engine at real attention geometry (hidden size, heads, KV heads, head dim, M-RoPE sections,
vision widths and merge) with two decoder layers, a narrow MLP and the tiny tokenizer's
vocabulary: tree and KV shapes each step, and tokens equal to HF's greedy `generate`.
Last, bad checkpoints: an unsupported model type, a sharded index naming a missing shard.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmspec.methods.base import DraftContext, Drafter, StepOutcome
from mmspec.methods.engine import Engine
from mmspec.methods.tree import DraftTree
from mmspec.models.checkpoint_files import SUPPORTED_MODEL_TYPES
from mmspec.models.loader import MODEL_TYPES, load_target
from mmspec.models.model_limits import ModelLimits, model_limits
from mmspec.models.registry import UnknownModelError, check_model_id
from mmspec.models.target import LlavaTarget, QwenVLTarget, Target
from mmspec.models.tiny import tiny_model_path
from mmspec.orchestrator.grid import GridError, parse_grid
from mmspec.workloads import load_mmspec
from tests.conftest import mmspec_split
from tests.real_checkpoints import (
    FACTS,
    checkpoint_dir,
    image_token,
    real_config,
    weightless_target,
)

# name -> (parameters as the hub reports them, decoder layers, context, KV heads, head dim)
PUBLISHED = {
    "qwen2.5-vl-3b": (3_754_622_976, 36, 128000, 2, 128),
    "qwen2.5-vl-7b": (8_292_166_656, 28, 128000, 4, 128),
    "llava-1.5-7b": (7_063_427_072, 32, 4096, 32, 128),
    "llava-1.6-vicuna-7b": (7_063_431_168, 32, 4096, 32, 128),
}
# the MLP's inner width is the one width nothing outside the MLP sees: narrowed for CPU time
NARROW_MLP = 256
ADAPTERS = {"qwen2_5_vl": QwenVLTarget, "llava": LlavaTarget, "llava_next": LlavaTarget}


@pytest.fixture(scope="module")
def samples() -> list[Any]:
    return load_mmspec(mmspec_split("testmini"))


def _chat(turn: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turn}]}]


def _encode(target: Target, batch: list[Any]) -> Any:
    return target.encode([_chat(s.turns[0]) for s in batch], [s.load_image() for s in batch])


# ----------------------------------------------------------------------------- full size, meta


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_configs_build_at_their_published_sizes(name: str, tmp_path: Path) -> None:
    params, layers, context, kv_heads, head_dim = PUBLISHED[name]
    folder = checkpoint_dir(tmp_path, name)
    check_model_id(str(folder))  # grid validation accepts it
    assert model_limits(str(folder)) == ModelLimits(context, layers)
    target = weightless_target(folder, name, "mmspec")
    assert isinstance(target, ADAPTERS[real_config(name)["model_type"]])
    assert sum(p.numel() for p in target.model.parameters()) == params
    assert len(target.text_layers()) == layers and target.context_length == context
    text = target.model.config.get_text_config()
    assert (text.num_key_value_heads, text.hidden_size // text.num_attention_heads) == (
        kv_heads,
        head_dim,
    )


def test_every_supported_model_type_has_an_adapter() -> None:
    assert tuple(sorted(MODEL_TYPES)) == SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen2.5-vl-7b"])
def test_qwen_mrope_positions_at_mmspecs_pixel_bounds(
    name: str, samples: list[Any], tmp_path: Path
) -> None:
    """A left-padded batch of four testmini images: every real token's (t, h, w) position is
    the one M-RoPE defines, and the next text position is the model's own rope delta on."""
    target = weightless_target(checkpoint_dir(tmp_path, name), name, "mmspec")
    batch = samples[::15][:4]
    prompt = _encode(target, batch)
    positions, next_pos = target.prefill_positions(prompt)
    merge = target.model.config.vision_config.spatial_merge_size
    grids = prompt.inputs["image_grid_thw"].tolist()
    token = target.tokenizer.convert_tokens_to_ids(image_token(name))
    lens = prompt.prompt_lens
    for row, (ids, grid) in enumerate(zip(prompt.tokens(), grids)):
        expected = _mrope(ids, token, grid[1] // merge, grid[2] // merge)
        assert positions[:, row, -lens[row] :].tolist() == expected
        assert next_pos[row] == max(max(axis) for axis in expected) + 1
    # HF decodes text at cache position + rope delta: ours continues where it does
    _, deltas = target.model.model.get_rope_index(
        prompt.input_ids,
        prompt.inputs["mm_token_type_ids"],
        image_grid_thw=prompt.inputs["image_grid_thw"],
        attention_mask=prompt.attention_mask,
    )
    assert (next_pos - torch.tensor(lens)).tolist() == deltas.flatten().tolist()
    assert target.text_positions(next_pos[:, None]).shape == (3, len(batch), 1)


def _mrope(ids: list[int], image: int, rows: int, cols: int) -> list[list[int]]:
    """(t, h, w) per token of one unpadded prompt with one image, from the definition: text
    counts up on all three axes; the image block starts at the next position and spans a
    rows x cols grid; text after it resumes past the block's largest index."""
    start = ids.index(image)
    assert ids[start : start + rows * cols] == [image] * (rows * cols)
    axes: list[list[int]] = [list(range(start)) for _ in range(3)]
    axes[0] += [start] * (rows * cols)
    axes[1] += [start + r for r in range(rows) for _ in range(cols)]
    axes[2] += [start + c for _ in range(rows) for c in range(cols)]
    after = start + max(rows, cols)
    for axis in axes:
        axis += range(after, after + len(ids) - start - rows * cols)
    return axes


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.6-vicuna-7b"])
def test_llava_image_tokens_equal_the_models_image_features(
    name: str, samples: list[Any], tmp_path: Path
) -> None:
    """Our processor's <image> count per testmini image (any-resolution tiling for 1.6) is
    the number of features the model's own image path makes of its pixels, on the meta
    device. The CLIP tower is cut to two layers: depth changes no shape."""
    folder = checkpoint_dir(tmp_path, name)
    config = real_config(name)
    config["vision_config"]["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    target = weightless_target(folder, name, "mmspec")
    token = target.tokenizer.convert_tokens_to_ids(image_token(name))
    counts = []
    for sample in samples[::4]:
        prompt = _encode(target, [sample])
        sizes = {k: prompt.inputs[k] for k in ("image_sizes",) if k in prompt.inputs}
        with torch.inference_mode():
            out = target.model.model.get_image_features(
                pixel_values=prompt.inputs["pixel_values"].to("meta"), **sizes
            )
        (features,) = out.pooler_output
        counts.append(prompt.tokens()[0].count(token))
        assert features.shape == (counts[-1], config["text_config"].get("hidden_size", 4096))
    # LLaVA-1.5: a 24 x 24 patch grid, CLS dropped; 1.6: a base view plus up to 4 tiles
    if name == "llava-1.5-7b":
        assert set(counts) == {576}
    else:
        assert min(counts) > 576 and len(set(counts)) > 1


def test_qwen_image_tokens_equal_the_vision_towers_output(
    samples: list[Any], tmp_path: Path
) -> None:
    """Qwen2.5-VL's vision tower at its real widths (one block, a narrow MLP) on the testmini
    image with the fewest tokens at MMSpec's bounds: one output per merged 2 x 2 patch, as
    many as the processor put image tokens in the prompt."""
    facts = json.loads(FACTS.read_text())["profiles"]["qwen2.5-vl-7b/mmspec"]["encodings"]
    smallest = min(samples, key=lambda s: facts[s.id]["image_tokens"])
    config = real_config("qwen2.5-vl-7b")["vision_config"]
    config.update(depth=1, fullatt_block_indexes=[0], intermediate_size=NARROW_MLP)
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
        Qwen2_5_VLVisionConfig,
    )

    torch.manual_seed(0)
    tower = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**config)).eval()
    target = weightless_target(checkpoint_dir(tmp_path, "qwen2.5-vl-7b"), "qwen2.5-vl-7b", "mmspec")
    prompt = _encode(target, [smallest])
    with torch.inference_mode():
        out = tower(prompt.inputs["pixel_values"], grid_thw=prompt.inputs["image_grid_thw"])
    tokens = facts[smallest.id]["image_tokens"]
    assert out.pooler_output.shape == (tokens, config["out_hidden_size"])
    assert prompt.tokens()[0].count(target.processor.image_token_id) == tokens


# ----------------------------------------------------------------------------- engine, CPU


# keys holding token ids in each family's config.json, and the tokens they name
TOKEN_KEYS = {
    "qwen2_5_vl": {
        "bos_token_id": "<|endoftext|>",
        "eos_token_id": "<|im_end|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_start|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
    },
    "llava": {"image_token_index": "<image>", "pad_token_id": "<pad>"},
    "llava_next": {"image_token_index": "<image>", "pad_token_id": "<pad>"},
}


def real_geometry_target(tmp_path: Path, name: str, prompt_style: str) -> Target:
    """`name`'s adapter over a CPU model with the checkpoint's attention and vision geometry,
    two decoder layers (one vision block for Qwen, two CLIP layers for LLaVA), a narrow MLP
    and the tiny tokenizer's vocabulary and special-token ids (the real tokenizer is not on
    disk, and the prompt must be in the model's vocabulary). Weights: seeded N(0, 0.02),
    norms 1, so greedy tokens vary and ties are rare."""
    from transformers import AutoConfig, AutoTokenizer

    folder = checkpoint_dir(tmp_path, name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = real_config(name)
    for key, tok in TOKEN_KEYS[config["model_type"]].items():
        config[key] = tokenizer.convert_tokens_to_ids(tok)
    text = config if config["model_type"] == "qwen2_5_vl" else config["text_config"]
    text.update(num_hidden_layers=2, intermediate_size=NARROW_MLP, vocab_size=len(tokenizer))
    config["vocab_size"] = len(tokenizer)
    vision = config["vision_config"]
    vision["intermediate_size"] = NARROW_MLP
    if config["model_type"] == "qwen2_5_vl":
        vision.update(depth=1, fullatt_block_indexes=[0])
    else:
        vision["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    cfg = AutoConfig.from_pretrained(folder)
    model_cls, target_cls = MODEL_TYPES[cfg.model_type]
    from transformers.initialization import no_init_weights

    with no_init_weights():  # ours follows: the library's own would double the build time
        model = model_cls._from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    _seeded_init(model)
    model.generation_config.eos_token_id = cfg.get_text_config().eos_token_id
    from mmspec.models.loader import load_processor

    token_id = tokenizer.convert_tokens_to_ids(image_token(name))
    names = (name, str(folder))
    processor, tok = load_processor(str(folder), target_cls, token_id, prompt_style, names)
    return target_cls(model, processor, tok, name=name, prompt_style=prompt_style)


def _seeded_init(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1234)
    norms = {id(m.weight) for m in model.modules() if "Norm" in type(m).__name__}
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if id(p) in norms:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


class OracleTree(Drafter):
    """Knows each row's greedy continuation; proposes a tree whose accepted path is not a
    prefix of its nodes (a wrong first child, then the right one with a wrong and a right
    child), so each step accepts two nodes gathered out of the middle of the tree."""

    name = "oracle-tree"

    def __init__(self, answers: list[list[int]], prompt_lens: list[int], vocab: int) -> None:
        self.answers = answers  # per batch row: the reference tokens after the prompt
        self.prompt_lens = prompt_lens
        self.vocab = vocab
        self.logit_shapes: list[tuple[int, ...]] = []

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        trees = []
        for row, tokens in zip(ctx.rows, ctx.tokens):
            done = len(tokens) - self.prompt_lens[row]  # generated, the pending one included
            right = self.answers[row][done : done + 2]
            if len(right) < 2:
                trees.append(DraftTree.empty())
                continue
            wrong = [(t + 1) % self.vocab for t in right]
            trees.append(DraftTree([wrong[0], right[0], wrong[1], right[1]], [-1, -1, 1, 1]))
        return trees

    def update(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        self.logit_shapes.append(tuple(outcome.logits.shape))


def _greedy(target: Target, conversation: Any, image: Any, new: int) -> list[int]:
    """HF's own greedy `generate` for one conversation alone (its positions, its cache)."""
    prompt = target.encode([conversation], [image])
    out = target.model.generate(**prompt.inputs, max_new_tokens=new, do_sample=False)
    tokens = out[0, prompt.input_ids.shape[1] :].tolist()
    stops = [i for i, t in enumerate(tokens) if t in target.eos_token_ids]
    return tokens[: stops[0] + 1] if stops else tokens


def _picture(width: int, height: int) -> Image.Image:
    """A deterministic picture with structure along both axes."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x * y / 255) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


# Per checkpoint of the first full grid: prompt style and images. CPU time decides: Qwen under
# its checkpoint's own pixel bounds with two small pictures of other aspect ratios (35 and 45
# image tokens: real M-RoPE deltas, short prompts); LLaVA text only, since every LLaVA-1.5
# image is 576 tokens at 4096 wide and its positions are 1D (image placement at real size is
# test_llava_image_tokens_equal_the_models_image_features').
ENGINE_CASES = {
    "qwen2.5-vl-7b": ("chat_template", [(196, 140), (140, 252)]),
    "llava-1.5-7b": ("mmspec", [None, None]),
}


@pytest.mark.parametrize("name", sorted(ENGINE_CASES))
def test_the_engine_at_real_geometry_decodes_as_hf(
    name: str, samples: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two testmini questions in one ragged batch through the engine with a branching tree:
    every step's mask, positions, KV cache and logits have the checkpoint's shapes, and the
    tokens are HF greedy's, row by row."""
    style, sizes = ENGINE_CASES[name]
    target = real_geometry_target(tmp_path, name, style)
    images = [None if size is None else _picture(*size) for size in sizes]
    convs = [
        _chat(s.turns[0]) if im is not None else [_text(s.turns[0])]
        for s, im in zip(samples[:2], images)
    ]
    text = target.model.config.get_text_config()
    kv, head_dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    new = 6
    answers = [_greedy(target, c, im, new) for c, im in zip(convs, images)]
    lens = target.encode(convs, images).prompt_lens
    drafter = OracleTree(answers, lens, text.vocab_size)
    seen: list[tuple[int, int, int]] = []
    verify = target.verify

    def checked(ids: Any, positions: Any, mask: Any, cache: Any) -> Any:
        b, q = ids.shape
        assert positions.shape == (b, q) and mask.shape[:3] == (b, 1, q)
        width = mask.shape[3] - q  # the cache the tree attends to
        for layer in cache.layers:
            assert layer.keys.shape == layer.values.shape == (b, kv, width, head_dim)
        logits = verify(ids, positions, mask, cache)
        assert cache.layers[-1].keys.shape[2] == width + q
        assert logits.shape == (b, q, text.vocab_size)
        seen.append((b, q, width))
        return logits

    monkeypatch.setattr(target, "verify", checked)
    out = Engine(target, drafter).generate(convs, images, new)
    assert [g.tokens for g in out] == answers
    assert seen[0] == (2, 5, max(lens))  # root + 4 nodes over the padded prompt
    assert all(shape[1:] == (5, text.vocab_size) for shape in drafter.logit_shapes)
    assert sum(g.accepted for g in out) >= 2  # the oracle's nodes were accepted


def _text(turn: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": turn}]}


# ----------------------------------------------------------------------------- bad checkpoints


def _grid(model: str) -> dict[str, Any]:
    return {
        "name": "bad",
        "workloads": [{"builtin": "synthetic", "limit": 6}],
        "models": [model],
        "methods": ["ar"],
    }


def test_an_unsupported_model_type_fails_at_validation(tmp_path: Path) -> None:
    folder = checkpoint_dir(tmp_path, "llava-1.5-7b")
    config = {**real_config("llava-1.5-7b"), "model_type": "mllama"}
    (folder / "config.json").write_text(json.dumps(config))
    problem = (
        "config.json: model_type 'mllama' is not supported; "
        f"supported: llava, llava_next, qwen2_5_vl ({folder}/config.json)"
    )
    with pytest.raises(GridError) as info:
        parse_grid(_grid(str(folder)), "g.yaml")
    assert f"g.yaml: models[0].id: {problem}".startswith(str(info.value).removesuffix("..."))
    with pytest.raises(UnknownModelError) as info:
        load_target(str(folder), device="cpu")
    assert str(info.value) == problem


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA saved as a sharded checkpoint (model-0000x-of-0000y + index)."""
    from transformers import LlavaForConditionalGeneration

    source = tiny_model_path("tiny-llava")
    folder = tmp_path_factory.mktemp("sharded") / "tiny-llava-sharded"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    model = LlavaForConditionalGeneration.from_pretrained(source)
    model.save_pretrained(folder, max_shard_size="2MB")
    return folder


def test_a_sharded_checkpoint_loads_as_the_single_file(sharded: Path) -> None:
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(
        re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards
    )
    check_model_id(str(sharded))
    whole = load_target("tiny-llava", device="cpu")
    parts = load_target(str(sharded), device="cpu")
    for (name, a), (_, b) in zip(
        whole.model.state_dict().items(), parts.model.state_dict().items()
    ):
        assert torch.equal(a, b), name


def test_a_sharded_index_naming_a_missing_shard_fails_at_validation(
    sharded: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(sharded, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensor, shard = next(iter(index["weight_map"].items()))
    (folder / shard).unlink()
    problem = (
        f"model.safetensors.index.json: weight_map[{tensor!r}] names shard {shard!r}, "
        f"which is missing ({folder}/model.safetensors.index.json)"
    )
    with pytest.raises(GridError) as info:
        parse_grid(_grid(str(folder)), "g.yaml")
    # grid messages are clipped at 240 characters: the file and key come first
    assert f"g.yaml: models[0].id: {problem}".startswith(str(info.value).removesuffix("..."))
    assert f"weight_map[{tensor!r}]" in str(info.value)
    with pytest.raises(UnknownModelError) as info:
        load_target(str(folder), device="cpu")
    assert str(info.value) == problem
    # an index without a weight map names its key
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(UnknownModelError, match=r"index\.json: key 'weight_map' must map"):
        check_model_id(str(folder))
