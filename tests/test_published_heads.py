"""Heads saved by the authors' own classes at the real 7B shapes read by our loaders (issue 20,
part 3), from the layout facts benchmarks/published_heads.py writes (key names, shapes,
dtypes, config.json, file names; no weights): every key maps onto our head at its shape, and
the authors' file layout (sharded safetensors with an index, a single pytorch_model.bin) is
read whole. The numeric check (same draft logits) runs with the reference venv:
`benchmarks/published_heads.py build` then `check`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mmspec.methods.draft_checkpoint import read_state
from mmspec.methods.eagle import EagleHead
from mmspec.methods.eagle3 import Eagle3Head
from mmspec.methods.medusa import MedusaHeads
from mmspec.methods.msd import MSDHead
from mmspec.methods.vispec import ViSpecHead

FACTS_DIR = Path(__file__).parent / "data" / "published_heads"
FACTS = {p.stem: json.loads(p.read_text()) for p in sorted(FACTS_DIR.glob("*.json"))}
HEAD_CLASSES = {
    "eagle": EagleHead,
    "medusa": MedusaHeads,
    "eagle3": Eagle3Head,
    "vispec": ViSpecHead,
    "msd": MSDHead,
}
# target -> (hidden, vocab) of the real 7B model
REAL = {"qwen2.5-vl-7b": (3584, 152064), "llava-1.5-7b": (4096, 32064)}
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "bool": torch.bool,
}


def stub_target(facts: dict[str, Any]) -> Any:
    """The target as our loaders read it: name, family, image token, text config."""
    llava = facts["target"].startswith("llava")
    folder = Path(__file__).parent / "data" / "processors" / facts["target"]
    text = json.loads((folder / "config.json").read_text())
    text = {**facts["config"], **text.get("text_config", text)}  # LLaVA's omits Llama defaults
    text["model_type"] = "llama" if llava else "qwen2_5_vl_text"
    config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(**text))
    return SimpleNamespace(
        name=facts["target"],
        family="llava" if llava else "qwen2_5_vl",
        image_token_id=32000 if llava else 151655,
        tokenizer=SimpleNamespace(pad_token_id=32001 if llava else 151643),
        model=SimpleNamespace(config=config),
    )


def meta_state(facts: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        k: torch.empty(t["shape"], dtype=DTYPES[t["dtype"]], device="meta")
        for k, t in facts["tensors"].items()
    }


def test_facts_cover_every_head_built() -> None:
    assert {f"{m}-{t}" for m in HEAD_CLASSES for t in REAL} <= set(FACTS)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_the_authors_keys_fit_our_head_at_the_real_shape(name: str) -> None:
    facts = FACTS[name]
    head_cls = HEAD_CLASSES[facts["method"]]
    config, state = head_cls.from_reference(
        facts["config"], meta_state(facts), stub_target(facts), name
    )
    assert (config.hidden_size, config.vocab_size) == REAL[facts["target"]]
    if facts["method"] != "medusa":  # q/k/v biases exactly where the authors' attention has them
        biased = any(k.endswith("q_proj.bias") for k in state)
        assert (config.block == "qwen2" or config.extra.get("qkv_bias", False)) == biased
    with torch.device("meta"):
        own = head_cls(config).state_dict()
    assert sorted(set(own) - set(state)) == []  # missing
    assert sorted(set(state) - set(own)) == []  # unexpected
    assert {k: tuple(v.shape) for k, v in own.items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }


@pytest.mark.parametrize("name", sorted(FACTS))
def test_the_authors_file_layout_is_read_whole(name: str, tmp_path: Path) -> None:
    """The same key names in the same files (tiny tensors), read back as one state."""
    from safetensors.torch import save_file

    facts = FACTS[name]
    keys = list(facts["tensors"])
    state = {k: torch.full((2,), float(i)) for i, k in enumerate(keys)}
    files = facts["files"]
    if files == ["pytorch_model.bin"]:
        torch.save(state, tmp_path / "pytorch_model.bin")
    elif files == ["model.safetensors"]:
        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        index: dict[str, Any] = {"weight_map": {}}
        shards = [f for f in files if f.endswith(".safetensors")]
        assert len(shards) > 1 and "model.safetensors.index.json" in files
        for i, k in enumerate(keys):  # spread the keys over the shards
            index["weight_map"][k] = shards[i % len(shards)]
        for shard in shards:
            part = {k: v for k, v in state.items() if index["weight_map"][k] == shard}
            save_file(part, str(tmp_path / shard))
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    read = read_state(tmp_path)
    assert sorted(read) == sorted(keys)
    assert all(torch.equal(read[k], state[k]) for k in keys)


def test_a_sharded_index_naming_a_missing_shard_is_one_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mmspec.methods.draft_checkpoint import CheckpointError

    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing shard model-00002-of-00002\.safetensors"):
        read_state(tmp_path)
