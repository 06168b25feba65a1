"""Do our loaders read draft heads saved by the authors' own classes at the real 7B shapes?

Two stages, exchanging only files (safetensors + json):

    # 1. reference venv: the authors' class (MMSpec's vendored copy) at the real config,
    #    random weights, saved in the authors' layout, plus a random input and its outputs
    ~/.cache/mmspec/parity/venv/bin/python benchmarks/published_heads.py build \
        --reference /tmp/mmspec-ref --out /tmp/published_heads
    # 2. our venv: load each folder with our loader, run the same input, compare
    .venv/bin/python benchmarks/published_heads.py check --out /tmp/published_heads

`build` also writes the layout facts (key names, shapes, dtypes, config.json, file names; no
weights) to tests/data/published_heads/<head>.json, which tests/test_published_heads.py reads.
Nothing of the authors' code is copied: `build` imports it from `--reference` at run time,
through the parity harness's run-time patches (benchmarks/parity/ref_patches.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
FACTS_DIR = ROOT / "tests" / "data" / "published_heads"
PROCESSORS = ROOT / "tests" / "data" / "processors"
SEED, SEQ = 0, 8
SHARD_BYTES = 2 * 1024**3  # shards of at most 2 GiB, as HF's save_pretrained would cut them

# head name -> (method, target config folder, file layout)
HEADS: dict[str, tuple[str, str, str]] = {
    "eagle-qwen2.5-vl-7b": ("eagle", "qwen2.5-vl-7b", "sharded-safetensors"),
    "eagle-llava-1.5-7b": ("eagle", "llava-1.5-7b", "pytorch_model.bin"),
    "medusa-qwen2.5-vl-7b": ("medusa", "qwen2.5-vl-7b", "model.safetensors"),
    "medusa-llava-1.5-7b": ("medusa", "llava-1.5-7b", "pytorch_model.bin"),
    "eagle3-qwen2.5-vl-7b": ("eagle3", "qwen2.5-vl-7b", "model.safetensors"),
    "eagle3-llava-1.5-7b": ("eagle3", "llava-1.5-7b", "pytorch_model.bin"),
    "vispec-qwen2.5-vl-7b": ("vispec", "qwen2.5-vl-7b", "model.safetensors"),
    "vispec-llava-1.5-7b": ("vispec", "llava-1.5-7b", "pytorch_model.bin"),
    "msd-qwen2.5-vl-7b": ("msd", "qwen2.5-vl-7b", "model.safetensors"),
    "msd-llava-1.5-7b": ("msd", "llava-1.5-7b", "pytorch_model.bin"),
}
IMAGE_ROWS = (3, 9)  # ViSpec's input: these rows (of SEQ) are an image span
DRAFT_VOCAB = 32000  # EAGLE-3's reduced draft vocabulary, as its published heads use


# LlamaConfig's defaults, which llava-hf's text_config leaves out (Vicuna-7B's real shape)
LLAMA_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}


def text_config(target: str) -> dict[str, Any]:
    cfg = json.loads((PROCESSORS / target / "config.json").read_text())
    if "text_config" in cfg:
        return {**LLAMA_DEFAULTS, **cfg["text_config"]}
    return cfg


def eagle_econfig(text: dict[str, Any]) -> dict[str, Any]:
    """The EConfig config.json the authors' EAGLE head is built from (one LLaMA layer)."""
    qwen = "qwen" in str(text.get("model_type", ""))
    heads = text["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": text["hidden_size"],
        "intermediate_size": text["intermediate_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": text.get("num_key_value_heads") or heads,
        "num_hidden_layers": 1,
        "vocab_size": text["vocab_size"],
        "rms_norm_eps": text.get("rms_norm_eps", 1e-6),
        "rope_theta": text.get("rope_theta", 10000.0),
        "max_position_embeddings": text.get("max_position_embeddings", 4096),
        "hidden_act": "silu",
        "qkv_bias": qwen,
        "bias": True,
        "pad_token_id": text.get("pad_token_id"),
        "torch_dtype": "float32",
    }


def lm_head(vocab: int, hidden: int) -> torch.Tensor:
    """A seeded stand-in for the target's LM head (both venvs draw the same one)."""
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(vocab, hidden, generator=g) * 0.02


def save_layout(state: dict[str, torch.Tensor], out: Path, layout: str) -> list[str]:
    """Save `state` as the authors publish heads; returns the weight file names."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if layout == "model.safetensors":
        save_file(state, str(out / layout), metadata={"format": "pt"})
        return [layout]
    if layout == "pytorch_model.bin":
        torch.save(state, out / "pytorch_model.bin")
        return ["pytorch_model.bin"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def authors_head(method: str, raw: dict[str, Any]) -> tuple[torch.nn.Module, str]:
    """The authors' head class (MMSpec's vendored copy) built at `raw`, random weights."""
    if method == "eagle":
        from method.eagle.cnets import Model
        from method.eagle.configs import EConfig

        return Model(EConfig(**raw), bias=raw["bias"]), "method.eagle.cnets.Model"
    if method == "msd":
        from method.msd.cnets import Model
        from method.msd.configs import EConfig, Qwen2VLConfig

        config = Qwen2VLConfig(**raw) if raw["model_type"] == "qwen2_vl" else EConfig(**raw)
        return Model(config, bias=raw["bias"]), "method.msd.cnets.Model"
    if method == "vispec":
        from method.vispec.cnets_ours import Model
        from method.vispec.configs import EConfig

        model = Model(EConfig(**raw), bias=raw["bias"], num_q=2)
        with torch.no_grad():  # img_fc starts as [I | 0]: random, so its second half counts
            for p in model.img_fc.parameters():
                p.normal_(0.0, 0.02)
        return model, "method.vispec.cnets_ours.Model"
    if method == "eagle3":
        from method.eagle3.cnets import Model
        from method.eagle3.configs import EConfig

        model = Model(EConfig(**raw))
        g = torch.Generator().manual_seed(SEED + 3)
        with torch.no_grad():
            for name, p in model.named_parameters():  # norms off 1, so a swapped norm shows
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            used = torch.randperm(raw["vocab_size"], generator=g)[:DRAFT_VOCAB].sort().values
            model.d2t.copy_(used - torch.arange(DRAFT_VOCAB))
            model.t2d.zero_()
            model.t2d[used] = True
        return model, "method.eagle3.cnets.Model"
    from method.medusa.cnets_medusa import Model
    from method.medusa.configs import EConfig

    model = Model(EConfig(**raw))
    # its ResBlocks start at zero weight: random weights, so a mixed-up key would show
    with torch.no_grad():
        for p in model.medusa_head.parameters():
            p.normal_(0.0, 0.02)
    return model, "method.medusa.cnets_medusa.Model"


def build_head(name: str, method: str, target: str, layout: str, out: Path) -> None:
    from safetensors.torch import save_file

    raw = eagle_econfig(text_config(target))
    if method == "eagle3":  # its attention reads 2H without q/k/v biases; reduced vocabulary
        raw = {**raw, "qkv_bias": False, "bias": False, "draft_vocab_size": DRAFT_VOCAB}
    if method == "msd":  # by the target: a Qwen2-VL layer (M-RoPE, biases) or EAGLE's LLaMA one
        qwen = "qwen" in target
        raw = {**raw, "model_type": "qwen2_vl" if qwen else "llava"}
        if qwen:
            raw["architectures"] = ["Qwen2VLForConditionalGeneration"]
            raw["rope_scaling"] = text_config(target)["rope_scaling"]
            del raw["qkv_bias"]  # its Qwen2-VL layer always has q/k/v biases
    torch.manual_seed(SEED)
    model, cls = authors_head(method, raw)
    model.eval()
    hidden = raw["hidden_size"]
    g = torch.Generator().manual_seed(SEED + 2)
    taps = 3 if method == "eagle3" else 1  # EAGLE-3 reads three target layers, concatenated
    feats = torch.randn(1, SEQ, taps * hidden, generator=g)
    ids = torch.randint(0, raw["vocab_size"], (1, SEQ), generator=g)
    with torch.no_grad():
        # EAGLE(-3): (1, SEQ, h) the next features; Medusa: (heads, SEQ, h) before the LM head
        extra = {}
        if method == "vispec":  # its image path; the mask is one row longer (the prompt's)
            image = torch.zeros(1, SEQ + 1, dtype=torch.bool)
            image[0, 1 + IMAGE_ROWS[0] : 1 + IMAGE_ROWS[1]] = True
            extra = {"image_mask": image}
        draft = model(feats, input_ids=ids, **extra)
        if method == "eagle3":  # its own LM head over the draft vocabulary
            logits = model.lm_head(model.norm(draft))
        else:
            logits = draft @ lm_head(raw["vocab_size"], hidden).T
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    folder = out / name
    files = save_layout(state, folder, layout)
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    io = {"features": feats, "input_ids": ids, "draft_hidden": draft, "draft_logits": logits}
    io.update({k: v.contiguous() for k, v in extra.items()})
    save_file({k: v.contiguous() for k, v in io.items()}, str(out / f"{name}.io.safetensors"))
    write_facts(name, method, target, cls, raw, state, files)


def write_facts(
    name: str,
    method: str,
    target: str,
    cls: str,
    raw: dict[str, Any],
    state: dict[str, torch.Tensor],
    files: list[str],
) -> None:
    facts = {
        "head": name,
        "method": method,
        "target": target,
        "authors_class": cls,
        "config": raw,
        "files": files,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in state.items()
        },
    }
    FACTS_DIR.mkdir(parents=True, exist_ok=True)
    (FACTS_DIR / f"{name}.json").write_text(json.dumps(facts, indent=2) + "\n")


def build(reference: Path, out: Path, names: list[str]) -> None:
    sys.path.insert(0, str(reference.resolve()))  # the authors' `method` package
    sys.path.insert(0, str(ROOT / "benchmarks" / "parity"))
    import ref_patches

    ref_patches.install()
    torch.set_num_threads(2)
    for name in names:
        method, target, layout = HEADS[name]
        build_head(name, method, target, layout, out)
        print(f"built {name} ({layout}) in {out / name}", flush=True)


def stub_target(name: str, target: str) -> Any:
    """What our loaders read of a target: its name, family, image token and text config."""
    from types import SimpleNamespace

    text = dict(text_config(target))
    llava = target.startswith("llava")
    text["model_type"] = "llama" if llava else "qwen2_5_vl_text"  # as get_text_config names it
    config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(**text))
    return SimpleNamespace(
        name=name,
        family="llava" if llava else "qwen2_5_vl",
        image_token_id=32000 if llava else 151655,
        tokenizer=SimpleNamespace(pad_token_id=32001 if llava else 151643),
        model=SimpleNamespace(config=config),
    )


def our_draft(method: str, folder: Path, target: Any, io: dict[str, torch.Tensor]) -> Any:
    """Our loader on `folder`, run on the saved input: (head, draft hidden, lm head)."""
    from mmspec.methods.draft_checkpoint import load_head, read_state
    from mmspec.methods.eagle import EagleHead
    from mmspec.methods.eagle3 import Eagle3Head
    from mmspec.methods.medusa import MedusaHeads
    from mmspec.methods.msd import MSDHead
    from mmspec.methods.vispec import ViSpecHead

    text = target.model.config.get_text_config()
    head_lm = torch.nn.Linear(text.hidden_size, text.vocab_size, bias=False)
    head_lm.weight.data = lm_head(text.vocab_size, text.hidden_size)
    if method == "medusa":
        head = load_head(method, MedusaHeads, target, str(folder)).eval()
        draft = torch.stack([h(io["features"][0]) for h in head.medusa_head])
        return head, draft, head(io["features"][0], lm_head=head_lm)
    head_cls = {"eagle3": Eagle3Head, "vispec": ViSpecHead, "msd": MSDHead}.get(method, EagleHead)
    head = load_head(method, head_cls, target, str(folder)).eval()  # raises on bad keys
    embed = read_state(folder)["embed_tokens.weight"]  # the target's table, as MMSpec copies it
    n = io["input_ids"].shape[1]
    if method == "vispec":
        image = io["image_mask"][0, 1:]
        x, rows, _ = head.prompt_inputs(embed[io["input_ids"][0]], io["features"][0], image)
        m = x.shape[0]
        mask = torch.full((m, m), torch.finfo(torch.float32).min).triu(1)[None, None]
        out = head.block(x[None], rows[None], mask, None)
        out = out[0] if isinstance(out, tuple) else out
        # MMSpec's output has a row per input row, zero where the image span was dropped
        draft = torch.zeros(1, n, out.shape[-1]).index_copy(1, rows, out)
        return head, draft, head_lm(draft)
    mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
    feats = head.fc(io["features"]) if method == "eagle3" else io["features"]
    x = head.combine(embed[io["input_ids"]], feats, None)
    draft = head.block(x, torch.arange(n)[None], mask, None)
    draft = draft[0] if isinstance(draft, tuple) else draft
    if method == "eagle3":
        return head, draft, head.lm_head(head.norm(draft))
    return head, draft, head_lm(draft)


def check(out: Path, names: list[str]) -> int:
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    failed = 0
    for name in names:
        method, target, _ = HEADS[name]
        io = load_file(str(out / f"{name}.io.safetensors"))
        with torch.no_grad():
            head, draft, logits = our_draft(method, out / name, stub_target(name, target), io)
        d_h = (draft - io["draft_hidden"]).abs().max().item()
        d_l = (logits - io["draft_logits"]).abs().max().item()
        ok = torch.allclose(draft, io["draft_hidden"], rtol=1e-4, atol=1e-4) and torch.allclose(
            logits, io["draft_logits"], rtol=1e-4, atol=1e-4
        )
        same_top = bool((logits.argmax(-1) == io["draft_logits"].argmax(-1)).all())
        print(
            f"{name}: loaded {type(head).__name__} ({head.config.block} block), max |diff| "
            f"hidden {d_h:.2e} logits {d_l:.2e}, same argmax {same_top}: "
            f"{'OK' if ok else 'MISMATCH'}",
            flush=True,
        )
        failed += not ok
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["build", "check"])
    ap.add_argument("--reference", type=Path, help="MMSpec checkout (build)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/published_heads"))
    ap.add_argument("--heads", default=",".join(HEADS), help="comma-separated")
    args = ap.parse_args()
    names = args.heads.split(",")
    if args.stage == "build":
        if args.reference is None:
            ap.error("build needs --reference")
        build(args.reference, args.out, names)
    else:
        sys.exit(1 if check(args.out, names) else 0)


if __name__ == "__main__":
    main()
