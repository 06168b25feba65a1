"""Convert our tiny models and trained heads to the formats MMSpec's code loads (4.51.3).

    .venv/bin/python benchmarks/parity/convert.py [--models tiny-qwen2.5-vl] [--out DIR]

Runs in our venv. Writes DIR/ckpt/<model>/target (the target as transformers 4.51.3 reads
it) and DIR/ckpt/<model>/<head> (each head in its reference layout); DIR defaults to
$MMSPEC_HOME/parity. Weights are never changed, only renamed or copied: a conversion that
needed to change a number would defeat the point of a parity check.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from common import METHODS, MODELS, ckpt_dir, head_dir, named_target, parity_home
from safetensors.torch import load_file, save_file

from mmspec.methods.draft_checkpoint import checkpoint_dir
from mmspec.models.tiny import tiny_model_path


# ---- Qwen2.5-VL target -----------------------------------------------------------------------
def qwen_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's nested config.json -> 4.51.3's flat one (text fields at the top)."""
    text = dict(cfg["text_config"])
    for key in ("layer_types", "model_type", "dtype"):  # 4.51.3 derives or lacks them
        text.pop(key, None)
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope["rope_theta"]
    # 4.51.3 spells M-RoPE as a rope_scaling of type "mrope" (it maps that to "default")
    text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = {k: v for k, v in cfg["vision_config"].items() if k != "rope_parameters"}
    vision["model_type"] = "qwen2_5_vl"  # 4.51.3's vision config names its parent's type
    vision["torch_dtype"] = vision.pop("dtype", "float32")
    top = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config", "dtype")}
    top["torch_dtype"] = cfg.get("dtype", "float32")
    return {**text, **top, "vision_config": vision}


def slow_tokenizer_files(src: Path, dst: Path, keep_bos_unk: bool = False) -> None:
    """vocab.json + merges.txt (what MMSpec's `use_fast=False` Qwen2Tokenizer reads) from our
    tokenizer.json, and a tokenizer_config.json naming Qwen2Tokenizer and the special tokens
    (`keep_bos_unk`: ours, else none, Qwen's own)."""
    tok = json.loads((src / "tokenizer.json").read_text())
    bpe = tok["model"]
    (dst / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    ours = json.loads((src / "tokenizer_config.json").read_text())
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "special")}
        | {"single_word": t["single_word"]}
        for t in tok["added_tokens"]
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "eos_token": ours["eos_token"],
        "pad_token": ours["pad_token"],
        "bos_token": ours.get("bos_token") if keep_bos_unk else None,
        "unk_token": ours.get("unk_token") if keep_bos_unk else None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 32768,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def convert_qwen_target(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(qwen_config(cfg), indent=2) + "\n")
    pre = json.loads((src / "preprocessor_config.json").read_text())
    # 4.51.3's Qwen2VLImageProcessor reads min/max_pixels, not the `size` dict alone
    pre["min_pixels"], pre["max_pixels"] = pre["size"]["shortest_edge"], pre["size"]["longest_edge"]
    (dst / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    slow_tokenizer_files(src, dst)
    # the weights use the names both versions load (model.*, visual.*, lm_head)
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):
        shutil.copy2(src / name, dst / name)
    gen = json.loads((src / "generation_config.json").read_text())
    gen.pop("transformers_version", None)
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ---- LLaVA target ----------------------------------------------------------------------------
def llava_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's LLaVA config.json -> 4.51.3's: the same nesting; `rope_parameters` ->
    `rope_theta`, `dtype` -> `torch_dtype` at every level, `vocab_size` also at the top."""
    text = dict(cfg["text_config"])
    rope = text.pop("rope_parameters")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"tiny LLaVA with rope {rope}: only plain RoPE converts")
    text["rope_theta"] = rope["rope_theta"]
    text["torch_dtype"] = text.pop("dtype", "float32")
    vision = dict(cfg["vision_config"])
    vision["torch_dtype"] = vision.pop("dtype", "float32")
    top = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config", "dtype")}
    top["torch_dtype"] = cfg.get("dtype", "float32")
    top.pop("transformers_version", None)
    # llava-hf's config.json (what MMSpec ran) repeats the text vocab_size at the top, and
    # MMSpec's Token Recycling reads it there (base_model.config.vocab_size)
    top["vocab_size"] = text["vocab_size"]
    return {**top, "text_config": text, "vision_config": vision}


def llava_weights(src: Path) -> dict[str, Any]:
    """transformers 5 saves the CLIP tower's keys without `vision_model.`; 4.51.3's
    LlavaForConditionalGeneration holds a CLIPVisionModel, so its keys have it. The
    `language_model.model.*`, `language_model.lm_head.*` and `multi_modal_projector.*` keys
    are already 4.51.3's."""
    state = load_file(str(src / "model.safetensors"))
    out = {}
    for key, value in state.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key.removeprefix("vision_tower.")
        out[key] = value
    return out


def convert_llava_target(src: Path, dst: Path) -> None:
    """Our tiny LLaVA (transformers 5.x save) -> 4.51.3's LlavaForConditionalGeneration folder.

    MMSpec loads it with `CustomLlavaForConditionalGeneration` (method/llava_adapter.py) and
    prompts it through `AutoProcessor` (LlavaProcessor: CLIPImageProcessor + the tokenizer,
    the chat template from chat_template.jinja); its SpecModels read the stop ids and decode
    answers with a `use_fast=False` AutoTokenizer. Our tokenizer is a byte-level BPE with
    Qwen2's pre-tokenizer regex (not LLaMA's sentencepiece), so the slow one is a
    Qwen2Tokenizer over vocab.json + merges.txt, with our bos/eos/unk/pad.
    """
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(llava_config(cfg), indent=2) + "\n")
    proc = json.loads((src / "processor_config.json").read_text())
    # 4.51.3 reads the image processor from preprocessor_config.json, the processor's own
    # kwargs (patch_size, image_token, ...) from processor_config.json
    image = {**proc.pop("image_processor"), "processor_class": proc["processor_class"]}
    (dst / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    (dst / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    slow_tokenizer_files(src, dst, keep_bos_unk=True)
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy2(src / name, dst / name)
    save_file(llava_weights(src), str(dst / "model.safetensors"), metadata={"format": "pt"})
    gen = json.loads((src / "generation_config.json").read_text())
    gen.pop("transformers_version", None)
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def target_text(target: Path) -> tuple[dict[str, Any], str]:
    """A converted target's text config (top level for Qwen2.5-VL, `text_config` for LLaVA)
    and the key of its token embedding table."""
    cfg = json.loads((target / "config.json").read_text())
    if cfg.get("model_type") == "llava":
        return cfg["text_config"], "language_model.model.embed_tokens.weight"
    return cfg, "model.embed_tokens.weight"


# ---- heads -----------------------------------------------------------------------------------
def econfig(ours: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    """The EConfig config.json MMSpec's heads read (a LLaMA config of one layer, our shape)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": ours["hidden_size"],
        "intermediate_size": ours["intermediate_size"],
        "num_attention_heads": ours["num_attention_heads"],
        "num_key_value_heads": ours["num_key_value_heads"],
        "num_hidden_layers": 1,
        "vocab_size": ours["vocab_size"],
        "rms_norm_eps": ours["rms_norm_eps"],
        "rope_theta": ours["rope_theta"],
        "max_position_embeddings": text["max_position_embeddings"],
        "hidden_act": "silu",
        "qkv_bias": ours["block"] == "qwen2",  # Qwen2 blocks have q/k/v biases
        "bias": True,  # the fc layer's bias (MMSpec reads `bias` from the raw json)
        "pad_token_id": text.get("pad_token_id"),
        "torch_dtype": text["torch_dtype"],
    }


# ---- EAGLE head ------------------------------------------------------------------------------
def convert_eagle_head(src: Path, target: Path, dst: Path, method: str = "eagle") -> None:
    """Our EAGLE head -> MMSpec's EAGLE layout: an EConfig config.json and model.safetensors
    with the same `fc.*` / `layers.0.*` keys plus `embed_tokens.weight` (MMSpec's head holds a
    copy of the target's embedding table; ours reads the target's own). A ViSpec head
    (`method="vispec"`) has EAGLE's keys plus its image adaptor `imadpt.*` and `img_fc.*`,
    named as MMSpec's cnets_ours.Model names them (our `from_reference` keeps the names)."""
    ours = json.loads((src / "config.json").read_text())
    if (
        ours["method"] != method
        or ours["hidden_size"] // ours["num_attention_heads"] != ours["head_dim"]
    ):
        raise ValueError(f"{src}: not a {method} head MMSpec's config can describe")
    text, embed_key = target_text(target)
    config = econfig(ours, text)
    state = load_file(str(src / "model.safetensors"))
    if "fc.bias" not in state:
        raise ValueError(f"{src}: MMSpec's EAGLE fc always has a bias")
    if method == "vispec" and ("imadpt.q" not in state or "img_fc.bias" not in state):
        raise ValueError(f"{src}: a ViSpec head needs imadpt.q and a biased img_fc")
    state["embed_tokens.weight"] = load_file(str(target / "model.safetensors"))[embed_key]
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---- Medusa head -----------------------------------------------------------------------------
MMSPEC_MEDUSA = {"num_heads": 3, "num_layers": 1, "projection": "target"}


def convert_medusa_head(src: Path, target: Path, dst: Path) -> None:
    """Our Medusa head -> MMSpec's (`method/medusa/cnets_medusa.py` `Model`): 3 heads of one
    ResBlock each, `medusa_head.{i}.0.linear.{weight,bias}`, read through the target's LM
    head (its `topK_genrate` is handed `base_model.lm_head`), an EConfig config.json (only
    `hidden_size`, `vocab_size`, `pad_token_id` are read) and `embed_tokens.weight` (the
    Model has the table, never uses it for drafting). MMSpec hard-codes that shape, so any
    other (our `own` projection, more heads or blocks) cannot be converted."""
    ours = json.loads((src / "config.json").read_text())
    shape = {k: ours.get("extra", {}).get(k) for k in MMSPEC_MEDUSA}
    if ours.get("method") != "medusa" or shape != MMSPEC_MEDUSA:
        raise ValueError(
            f"{src}: a Medusa head of {shape} (method {ours.get('method')!r}); MMSpec's "
            f"cnets_medusa.Model is hard-coded to {MMSPEC_MEDUSA} (3 heads of 1 ResBlock read "
            "through the target's LM head): retrain with the default Medusa head to compare"
        )
    state = load_file(str(src / "model.safetensors"))
    want = {
        f"medusa_head.{i}.0.linear.{p}"
        for i in range(MMSPEC_MEDUSA["num_heads"])
        for p in ("weight", "bias")
    }
    if set(state) != want:
        raise ValueError(f"{src}: expected exactly the keys {sorted(want)}, found {sorted(state)}")
    text, embed_key = target_text(target)
    state["embed_tokens.weight"] = load_file(str(target / "model.safetensors"))[embed_key]
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(econfig(ours, text), indent=2) + "\n")


# ---- EAGLE-3 head ----------------------------------------------------------------------------
MMSPEC_EAGLE3 = {"feature_layers": ["embeds", 0, 1], "zero_image_positions": True}
EAGLE3_KEYS = {
    "fc.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
    *(f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    *(f"midlayer.{n}.weight" for n in ("hidden_norm", "input_layernorm")),
    "midlayer.post_attention_layernorm.weight",
}


def slow_pad_id(target: Path) -> int:
    """What MMSpec's EAGLE-3 embeds at image slots: its slow tokenizer's `pad_token_id or 0`,
    read from the converted target's tokenizer files."""
    config = json.loads((target / "tokenizer_config.json").read_text())
    pad = config.get("pad_token")
    if not pad:
        return 0
    added = {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
    vocab = json.loads((target / "vocab.json").read_text())
    return added.get(pad, vocab.get(pad)) or 0


def write_weight_index(target: Path) -> None:
    """model.safetensors.index.json for the one-file target: MMSpec's EAGLE-3 head reads the
    target's embedding table only through an index (its 7B checkpoints are sharded), and
    4.51.3's from_pretrained still loads model.safetensors first."""
    from safetensors import safe_open

    with safe_open(str(target / "model.safetensors"), framework="pt") as f:
        weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    index = {"metadata": {}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert_eagle3_head(src: Path, target: Path, dst: Path) -> None:
    """Our EAGLE-3 head -> MMSpec's (`method/eagle3/cnets.py` `Model`): the same `fc`,
    `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d` tensors; an EConfig config.json with
    `draft_vocab_size` and no `target_hidden_size` (so it loads the embedding table from the
    target, through the index written beside it). MMSpec's code reads only its own rule
    (hidden_states[0..2], image rows zeroed, the pad token embedded at image slots) and has
    no q/k/v biases, so any other head is refused."""
    ours = json.loads((src / "config.json").read_text())
    extra = ours.get("extra", {})
    rule = {k: extra.get(k) for k in MMSPEC_EAGLE3}
    if ours.get("method") != "eagle3" or rule != MMSPEC_EAGLE3 or extra.get("qkv_bias"):
        raise ValueError(
            f"{src}: an EAGLE-3 head with {rule} (qkv_bias {extra.get('qkv_bias', False)}); "
            f"MMSpec's method/eagle3 runs only {MMSPEC_EAGLE3} without q/k/v biases: retrain "
            "it with the default taps (mmspec-orch train-drafter --method eagle3)"
        )
    if ours["hidden_size"] // ours["num_attention_heads"] != ours["head_dim"]:
        raise ValueError(f"{src}: head_dim {ours['head_dim']} is not hidden / heads")
    if extra["image_slot_token"] != slow_pad_id(target):
        raise ValueError(
            f"{src}: embeds image slots as token {extra['image_slot_token']}, MMSpec would "
            f"use {slow_pad_id(target)} (the target's pad token)"
        )
    state = load_file(str(src / "model.safetensors"))
    if set(state) != EAGLE3_KEYS:
        raise ValueError(f"{src}: expected the keys {sorted(EAGLE3_KEYS)}, found {sorted(state)}")
    text, _ = target_text(target)
    config = {
        **econfig(ours, text),
        "draft_vocab_size": extra["draft_vocab_size"],
        "qkv_bias": False,
        "bias": False,  # read by its SpecModel, unused by its Model (fc has no bias)
    }
    write_weight_index(target)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---- MSD head -------------------------------------------------------------------------------
def msd_config(ours: dict[str, Any], text: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The config.json MMSpec's MSD `Model` reads: Qwen2VLConfig for a Qwen target (its path
    names Qwen: a Qwen2-VL layer, M-RoPE sections from the target), else EConfig with
    `model_type: llava` (EAGLE's LLaMA layer); `bias` is the fc's."""
    if ours["block"] == "qwen2":
        config = {
            **econfig(ours, text),
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "rope_scaling": text["rope_scaling"],
        }
        del config["qkv_bias"]  # its Qwen2-VL layer always has q/k/v biases
    else:
        config = {**econfig(ours, text), "model_type": "llava"}
    config["bias"] = "fc.bias" in state
    return config


def convert_msd_head(src: Path, target: Path, dst: Path) -> None:
    """Our MSD head -> MMSpec's (`method/msd/cnets.py` `Model`): the same `fc.*` and
    `layers.0.*` tensors plus `embed_tokens.weight` from the target. MMSpec picks the layer
    by the target: on Qwen a Qwen2-VL layer (input norm, q/k/v biases), on LLaVA EAGLE's
    LLaMA layer (no input norm); it loads with strict=False, so a head of the other form
    would run with a norm dropped or left at its initial weights: refused. On a Qwen target
    a symlink `Qwen-target` beside it gives MMSpec the path that names Qwen (how it tells
    the families apart; ours is lower case, see `named_target`)."""
    ours = json.loads((src / "config.json").read_text())
    extra = ours.get("extra", {})
    if (
        ours.get("method") != "msd"
        or ours["hidden_size"] // ours["num_attention_heads"] != ours["head_dim"]
    ):
        raise ValueError(f"{src}: not an msd head MMSpec's config can describe")
    state = load_file(str(src / "model.safetensors"))
    qwen = ours["block"] == "qwen2"
    norm = "layers.0.input_layernorm.weight" in state
    biases = "layers.0.self_attn.q_proj.bias" in state
    if norm != qwen or biases != qwen or bool(extra.get("input_norm")) != norm:
        want = "with an input norm and q/k/v biases" if qwen else "without an input norm"
        raise ValueError(
            f"{src}: MMSpec's MSD runs a {ours['block']} head only {want} (input norm "
            f"{norm}, q/k/v biases {biases}): retrain it with the default options "
            "(mmspec-orch train-drafter --method msd)"
        )
    text, embed_key = target_text(target)
    state["embed_tokens.weight"] = load_file(str(target / "model.safetensors"))[embed_key]
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(msd_config(ours, text, state), indent=2) + "\n")
    if qwen:
        alias = named_target(target.parents[2], target.parent.name)  # <root>/ckpt/<model>/target
        if not alias.is_symlink():
            alias.symlink_to(target.name)


TARGET_CONVERTERS = {"qwen2.5-vl": convert_qwen_target, "llava": convert_llava_target}


def convert_vispec_head(src: Path, target: Path, dst: Path) -> None:
    convert_eagle_head(src, target, dst, method="vispec")


HEAD_CONVERTERS = {
    "eagle": convert_eagle_head,
    "vispec": convert_vispec_head,
    "medusa": convert_medusa_head,
    "eagle3": convert_eagle3_head,
    "msd": convert_msd_head,
}


def convert(model: str, root: Path, methods: list[str] | None = None) -> None:
    """The target, and the heads `methods` run (default: every head the harness knows)."""
    spec = MODELS[model]
    if spec.family not in TARGET_CONVERTERS:
        raise NotImplementedError(f"no converter for {spec.family} targets ({model}) yet")
    target = ckpt_dir(root, model)
    TARGET_CONVERTERS[spec.family](tiny_model_path(spec.ours), target)
    heads = {METHODS[m].head for m in (methods or METHODS) if METHODS[m].head}
    for head in sorted(heads):
        HEAD_CONVERTERS[head](checkpoint_dir(head, spec.ours), target, head_dir(root, model, head))
    print(f"converted {model} -> {target.parent}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny-qwen2.5-vl")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=parity_home())
    args = ap.parse_args()
    for model in args.models.split(","):
        convert(model, args.out.expanduser(), args.methods.split(","))


if __name__ == "__main__":
    main()
