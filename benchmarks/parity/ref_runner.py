"""Run MMSpec's own methods on the converted checkpoints; write one JSON per method.

Runs INSIDE the reference venv (setup_venv.py), never with `mmspec` importable:

    $MMSPEC_HOME/parity/venv/bin/python benchmarks/parity/ref_runner.py \
        --reference /tmp/mmspec-ref --model tiny-qwen2.5-vl --methods ar,pld,eagle2

Each adapter does what MMSpec's evaluation/eval_<method>_mmspec.py does for one turn (load
with from_pretrained, `build_prompt`, then `generate` / `specgenerate` with the script's
arguments), minus the answer file, the time-breakdown hooks and the sanity checks. Every
turn of a sample runs as the scripts run it: each turn re-prefills the whole conversation,
the image with the first user message, the earlier answers as `process_output` made them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import ref_patches
from common import (
    METHODS,
    Method,
    Prompt,
    ckpt_dir,
    each_method,
    head_dir,
    named_target,
    parity_home,
    pixels_sha256,
    result_path,
    runner_arguments,
    select_prompts,
    write_result,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; hub ids must not download


# ---- adapters: one per MMSpec eval script --------------------------------------------------
class Baseline:
    """evaluation/eval_baseline_mmspec.py: stock transformers `generate`, greedy."""

    stateful = False  # whether a generation leaves state the next one sees

    def __init__(self, target: Path, head: Path | None, args: dict[str, Any]) -> None:
        import transformers

        # the script's load_baseline_model: the class config.json names, device_map "cpu"
        # for its "auto", answers decoded with a slow tokenizer
        arch = transformers.AutoConfig.from_pretrained(str(target)).architectures[0]
        model_cls = getattr(transformers, arch)
        self.model = model_cls.from_pretrained(
            str(target), torch_dtype="auto", low_cpu_mem_usage=True, device_map="cpu"
        ).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(target), use_fast=False)

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        from evaluation.eval_baseline_mmspec import baseline_forward

        out, _, _, _ = baseline_forward(
            model=self.model, temperature=0.0, max_steps=max_new_tokens, **inputs
        )
        return out[0, inputs["input_ids"].shape[1] :].tolist(), None


class Spec:
    """The SpecModel scripts: `specgenerate(..., return_acceptance_len=True)`."""

    module = ""  # where SpecModel lives
    stateful = False
    load_keys: ClassVar[tuple[str, ...]] = ()  # ref_args for SpecModel.from_pretrained
    load_extra: ClassVar[dict[str, Any]] = {}  # what the script adds to from_pretrained
    generate_keys: ClassVar[dict[str, str]] = {}  # ref_args for specgenerate, renamed
    generate_extra: ClassVar[dict[str, Any]] = {}  # what the script adds to specgenerate
    fixes: ClassVar[tuple[str, ...]] = ()  # ref_patches.FIXES switched on while it generates

    def __init__(self, target: Path, head: Path | None, args: dict[str, Any]) -> None:
        import importlib

        spec_model = importlib.import_module(self.module).SpecModel
        self.model = spec_model.from_pretrained(
            base_model_path=str(target),
            spec_model_path=str(head) if head else "",
            torch_dtype="auto",
            low_cpu_mem_usage=True,
            device_map="cpu",  # the scripts say "auto"
            **{k: args[k] for k in self.load_keys},
            **self.load_extra,
        ).eval()
        self.tokenizer = self.model.get_tokenizer()  # what the scripts decode answers with
        self.extra = {new: args[old] for old, new in self.generate_keys.items()}
        self.extra.update(self.generate_extra)

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        import torch

        # the eval scripts' evaluate() is inference_mode
        with torch.inference_mode(), ref_patches.fixes(self.fixes):
            out, _, _, accept = self.model.specgenerate(
                **inputs,
                temperature=0.0,
                max_new_tokens=max_new_tokens,
                log=True,
                return_acceptance_len=True,
                **self.extra,
            )
        return out[0, inputs["input_ids"].shape[1] :].tolist(), [int(a) for a in accept]


def with_prefill_grid(base: Any, inputs: Any, run: Any) -> Any:
    """`run()` with `image_grid_thw` added to the base model's calls that pass
    `inputs_embeds` (only the prefill does): an instance-level wrapper around `forward`."""
    forward = base.forward

    def prefill_with_grid(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("inputs_embeds") is not None:
            kwargs.setdefault("image_grid_thw", inputs.get("image_grid_thw"))
        return forward(*args, **kwargs)

    base.forward = prefill_with_grid  # an instance attribute: `del` restores the class's
    try:
        return run()
    finally:
        del base.forward


class Pld(Spec):
    module = "method.pld.spec_model_pld"
    # passed as the script passes them; spec_model_pld.py ignores both (hard-coded 4 and 10)
    generate_keys: ClassVar[dict[str, str]] = {"ngram": "pld_ngram", "n_pred": "pld_n_pred"}


class PldFixed(Pld):
    """MMSpec's PLD made lossless (README, "Reference fixes"): its prefill given
    `image_grid_thw`, which spec_model_pld.py leaves out (it passes only the merged
    embeddings, so Qwen2.5-VL computes 1D positions for the image and rope_deltas 0); on
    LLaVA the cache cut back after every verification (`llava_kv`); no early stop on a
    repeated tail (`no_repeat_stop`)."""

    fixes = ("llava_kv", "no_repeat_stop")

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        run = super().generate
        return with_prefill_grid(self.model.base_model, inputs, lambda: run(inputs, max_new_tokens))


class Eagle(Spec):
    module = "method.eagle.spec_model"
    load_keys = ("total_token", "depth", "top_k")


class Eagle2(Spec):
    module = "method.eagle2.spec_model"
    load_keys = ("total_token", "depth", "top_k", "threshold")


class Eagle3(Spec):
    """eval_eagle3_mmspec.py: method/eagle3/spec_model.py, total_token, depth and top_k to
    from_pretrained (threshold left at its 1.0; its topK_genrate reads none)."""

    module = "method.eagle3.spec_model"
    load_keys = ("total_token", "depth", "top_k")


class ViSpec(Spec):
    """eval_vispec_mmspec.py: method/vispec/spec_model_ours.py, num_q to from_pretrained
    (its --attn-implementation defaults to none: the model's own)."""

    module = "method.vispec.spec_model_ours"
    load_keys = ("total_token", "depth", "top_k", "num_q")


class ViSpecSkip(ViSpec):
    """eval_vispec_vskip_mmspec.py (its .sh: visual_attn_threshold 0.35, eager attention)."""

    module = "method.vispec_vskip.spec_model"
    load_extra: ClassVar[dict[str, Any]] = {"attn_implementation": "eager"}
    generate_keys: ClassVar[dict[str, str]] = {"visual_attn_threshold": "visual_attn_threshold"}
    generate_extra: ClassVar[dict[str, Any]] = {
        "skip_when_visual": True,
        "no_op_on_visual_hit": False,
    }


class ViSpecSkipFixed(ViSpecSkip):
    """vispec_vskip with its gate fed the tree's attentions (`vskip_attentions`) and the
    tree mask applied under eager attention on Qwen2.5-VL (`eager_tree_mask`): what the
    script means to run."""

    fixes = ("eager_tree_mask", "vskip_attentions")


class Medusa(Spec):
    """eval_medusa_mmspec.py: total_token, depth and top_k to from_pretrained (no threshold)."""

    module = "method.medusa.spec_model_medusa"
    load_keys = ("total_token", "depth", "top_k")


class ImageFeatures:
    """Mixin for the EAGLE adapters: on LLaVA-1.5 MMSpec passes the head no `inputs_embeds`,
    so the head embeds each of the prompt's image slots as the `<image>` token's text
    embedding; on Qwen2.5-VL and LLaVA-NeXT it passes the embeddings the target saw, the
    projected image features in those slots. This gives LLaVA-1.5 the same: the first
    `topK_genrate` of a generation (the one that reads the prompt) gets the merged
    embeddings; our side reads them too (`common.IMAGE_FEATURES`). Nothing changes on
    Qwen2.5-VL, where they are passed already."""

    model: Any

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        base, layer = self.model.base_model, self.model.spec_layer
        if base.config.model_type != "llava":
            return super().generate(inputs, max_new_tokens)  # type: ignore[misc]
        draft = layer.topK_genrate

        def with_features(hidden: Any, input_ids: Any, head: Any, *args: Any, **kw: Any) -> Any:
            if kw.get("inputs_embeds") is None and layer.stable_kv is None:
                kw["inputs_embeds"] = llava_prompt_embeds(base, inputs)
            return draft(hidden, input_ids, head, *args, **kw)

        layer.topK_genrate = with_features  # an instance attribute: `del` restores it
        try:
            return super().generate(inputs, max_new_tokens)  # type: ignore[misc]
        finally:
            del layer.topK_genrate


def llava_prompt_embeds(base: Any, inputs: Any) -> Any:
    """The prompt's input embeddings as 4.51.3's LlavaForConditionalGeneration.forward makes
    them: token embeddings, the projected image features scattered into the image slots."""
    ids = inputs["input_ids"]
    embeds = base.get_input_embeddings()(ids)
    features = base.get_image_features(
        pixel_values=inputs["pixel_values"],
        vision_feature_layer=base.config.vision_feature_layer,
        vision_feature_select_strategy=base.config.vision_feature_select_strategy,
    )
    mask = (ids == base.config.image_token_index).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))


class EagleImageFeatures(ImageFeatures, Eagle):
    pass


class Eagle2ImageFeatures(ImageFeatures, Eagle2):
    pass


class Sam(Spec):
    """eval_sam_mmspec.py: its SpecModel takes (and ignores) the EAGLE tree arguments; the
    script forces eager attention."""

    module = "method.sam.spec_model_sam"
    load_keys = ("total_token", "depth", "top_k", "threshold")
    load_extra: ClassVar[dict[str, Any]] = {"attn_implementation": "eager"}


class NoRepeatStop:
    """Mixin for the SAM adapters: no early stop on a thrice-repeated tail n-gram (which drops
    the last copy: not the target's greedy output), so the drafts and acceptance can be
    compared over whole outputs."""

    model: Any

    def __init__(self, target: Path, head: Path | None, args: dict[str, Any]) -> None:
        super().__init__(target, head, args)  # type: ignore[call-arg]
        self.model._find_consecutive_ngram_repeat = lambda *a, **k: 0  # instance attribute


class SamFixed(NoRepeatStop, Sam):
    pass


class SamSkip(Sam):
    """eval_sam_vskip_mmspec.py (its .sh: visual_attn_threshold 0.35, eager attention): SAM
    that zeroes a step's acceptance when the chunk's first position (the pending token)
    puts at least the threshold of its attention on image tokens."""

    module = "method.sam_vskip.spec_model"
    generate_keys: ClassVar[dict[str, str]] = {"visual_attn_threshold": "visual_attn_threshold"}
    generate_extra: ClassVar[dict[str, Any]] = {
        "skip_when_visual": True,
        "visual_probe_only": False,
    }


class SamSkipFixed(NoRepeatStop, SamSkip):
    pass


class Lookahead(Spec):
    """eval_lookahead_mmspec.py: decoding_length and branch_length go to specgenerate; the
    script's attn_implementation reaches from_pretrained, which ignores it. One
    LookaheadCache for the model's life: every generation (warm-ups included) leaves its
    n-grams for the next, so this adapter is stateful."""

    module = "method.lookahead.spec_model_lookahead"
    stateful = True
    load_extra: ClassVar[dict[str, Any]] = {"attn_implementation": "eager"}
    generate_keys: ClassVar[dict[str, str]] = {
        "decoding_length": "decoding_length",
        "branch_length": "branch_length",
    }


class LookaheadFresh(Lookahead):
    """MMSpec's Lookahead with a new LookaheadCache before every generation: what it drafts
    from one request's own prompt and output, as our lookahead does."""

    stateful = False

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        from method.lookahead.common.lookahead_cache import LookaheadCache

        self.model.lookahead_cache = LookaheadCache()
        return super().generate(inputs, max_new_tokens)


class Recycling(Spec):
    """eval_recycling_mmspec.py: matrix_top_k and draft_len go to specgenerate."""

    module = "method.recycling.spec_model_recycling"
    generate_keys: ClassVar[dict[str, str]] = {
        "matrix_top_k": "matrix_top_k",
        "draft_len": "draft_len",
    }


class RecyclingFixed(Recycling):
    """MMSpec's Token Recycling made lossless (README, "Reference fixes"): the prefill given
    `image_grid_thw` (the same omission as PLD's), chunk positions for its Qwen2.5-VL
    verification (`recycling_chunk_positions`), no cycle guards replacing the target's
    argmax (`recycling_no_guards`), no early stop on a repeated tail (`no_repeat_stop`), the
    cache cut back on LLaVA (`llava_kv`). Its drafting (the chain, its stops) is untouched."""

    fixes = ("llava_kv", "no_repeat_stop", "recycling_no_guards", "recycling_chunk_positions")

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        run = super().generate
        return with_prefill_grid(self.model.base_model, inputs, lambda: run(inputs, max_new_tokens))


class StepLog:
    """Stands in for EaModel.acclen, which MSD adds each verification's accepted count to
    (`self.acclen += accept_length`): keeps the counts step by step."""

    def __init__(self) -> None:
        self.lengths: list[int] = []

    def __iadd__(self, accepted: Any) -> StepLog:
        self.lengths.append(int(accepted))
        return self


class Msd:
    """eval_msd_mmspec.py: method/msd's own EaModel (not a SpecModel), from_pretrained with
    total_token, depth, top_k and the script's eager attention, `temp_cache.use_msd` on
    (`--use-msd`); per turn `get_inputs_embeds` then `msdgenerate`. Its input ids are
    `build_prompt`'s unchanged (the script's `_to_msd_input_ids` keeps them on Qwen2.5-VL and
    HF LLaVA, the two targets here). The script computes the embeddings (the vision encoder)
    before starting its timer; here they are timed in, as ours are."""

    module = "method.msd.ea_model"
    stateful = False
    load_keys: ClassVar[tuple[str, ...]] = ("total_token", "depth", "top_k")
    generate_keys: ClassVar[dict[str, str]] = {}
    generate_extra: ClassVar[dict[str, Any]] = {}
    fixes: ClassVar[tuple[str, ...]] = ()
    mrope = False  # give the Qwen2.5-VL target its M-RoPE positions (`with_mrope`)

    def __init__(self, target: Path, head: Path | None, args: dict[str, Any]) -> None:
        import importlib

        if head is None:
            raise ValueError("MSD runs a converted head (Method.head)")
        ea_model = importlib.import_module(self.module).EaModel
        loaded = ea_model.from_pretrained(
            base_model_path=str(named_target(target.parents[2], target.parent.name)),
            ea_model_path=str(head),
            torch_dtype="auto",
            low_cpu_mem_usage=True,
            device_map="cpu",  # the scripts say "auto"
            attn_implementation="eager",  # both scripts' --attn-implementation
            **{k: args[k] for k in self.load_keys},
        )
        # as the script unpacks it: (tokenizer, model, processor, context) where its loader
        # made a processor (Qwen, LLaVA), else (model, None)
        self.model = (loaded[1] if len(loaded) == 4 else loaded[0]).eval()
        self.tokenizer = self.model.get_tokenizer()
        self.extra = {new: args[old] for old, new in self.generate_keys.items()}
        self.extra.update(self.generate_extra)
        config = self.model.base_model.config
        self.image_ids = (
            (config.vision_start_token_id, config.image_token_id)
            if self.model._is_qwen2vl
            else ref_patches.QWEN_IMAGE_IDS
        )
        # strict=False in MMSpec's loader: a key that did not fit would only be printed
        from safetensors.torch import load_file

        saved = set(load_file(str(head / "model.safetensors")))
        if saved != set(self.model.ea_layer.state_dict()):
            raise RuntimeError(f"{head}: keys do not match MMSpec's MSD Model")

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        import torch
        from method.msd.utils import temp_cache

        ids = inputs["input_ids"]
        steps = StepLog()
        self.model.acclen, self.model.accnum = steps, 0
        temp_cache.use_msd = True  # the script's --use-msd, set once before everything
        ref_patches.QWEN_IMAGE_IDS = self.image_ids

        def run() -> Any:
            embeds, _ = self.model.get_inputs_embeds(
                input_ids=ids,
                pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"),
                attention_mask=inputs.get("attention_mask"),
            )
            return self.model.msdgenerate(
                ids,
                inputs_embeds=embeds,
                temperature=0.0,
                max_new_tokens=max_new_tokens,
                log=True,
                **self.extra,
            )

        mrope = self.mrope and self.model._is_qwen2vl
        with torch.inference_mode(), ref_patches.fixes(self.fixes):
            out, _, _ = with_mrope(self.model.base_model, inputs, run) if mrope else run()
        return out[0, ids.shape[1] :].tolist(), steps.lengths


def with_mrope(base: Any, inputs: Any, run: Any) -> Any:
    """`run()` with the Qwen2.5-VL target given its M-RoPE positions. MSD calls the language
    model (`base.model`) itself, never the model's forward that computes them: its prefill
    passes no positions (1D ones, no image grid, rope delta 0) and its tree verification 1D
    ones from the cache length. Here the prefill gets `get_rope_index` of the prompt and its
    image grid, and every 1D position the rope delta, on all three axes (a text token's);
    `rope_deltas` is kept on the model too, which MSD-vskip's target-only steps (the model's
    own forward) read. An instance-level wrapper, removed after."""
    lm, kept = base.model, base.rope_deltas
    forward = lm.forward

    def positioned(*args: Any, **kwargs: Any) -> Any:
        pos = kwargs.get("position_ids")
        if pos is None and kwargs.get("inputs_embeds") is not None:  # the prefill
            pos, base.rope_deltas = base.get_rope_index(
                inputs["input_ids"], inputs.get("image_grid_thw"), None, None, None
            )
        elif pos is not None and pos.dim() == 2:
            pos = (pos + base.rope_deltas)[None].expand(3, -1, -1)
        kwargs["position_ids"] = pos
        return forward(*args, **kwargs)

    lm.forward = positioned
    try:
        return run()
    finally:
        del lm.forward
        base.rope_deltas = kept


class MsdFixed(Msd):
    """MMSpec's MSD made lossless on Qwen2.5-VL: the tree mask applied under the eager
    attention its script loads (`eager_tree_mask`, in method/eagle's Qwen2.5-VL copy) and the
    target's M-RoPE positions (`with_mrope`). No change on LLaVA."""

    fixes = ("eager_tree_mask",)
    mrope = True


class MsdSkip(Msd):
    """eval_msd_vskip_mmspec.py (its .sh: total_token 30, depth 5, top_k 10,
    visual_attn_threshold 0.35, eager): MSD that, after a verification whose last accepted
    node put at least the threshold of its last-layer attention (mean over heads) on the
    prompt's image tokens, commits the bonus token with one target-only forward (a plain AR
    step, not counted in its acceptance: recorded here as a step of 0) and drafts from
    there. On HF LLaVA it is plain MSD (`msdgenerate` hands that path to the base class)."""

    module = "method.msd_vskip.ea_model"
    generate_keys: ClassVar[dict[str, str]] = {"visual_attn_threshold": "visual_attn_threshold"}
    generate_extra: ClassVar[dict[str, Any]] = {
        "skip_when_visual": True,
        "no_op_on_visual_hit": False,
        "visual_probe_interval": 1,
    }

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        if not self.model._is_qwen2vl:
            return super().generate(inputs, max_new_tokens)
        base = self.model.base_model
        forward = base.forward

        def target_step(*args: Any, **kwargs: Any) -> Any:
            # on this path only the gate's target-only step calls the model's own forward,
            # right after the verification it follows added its count
            self.model.acclen.lengths.append(0)
            return forward(*args, **kwargs)

        base.forward = target_step  # an instance attribute: `del` restores the class's
        try:
            return super().generate(inputs, max_new_tokens)
        finally:
            del base.forward


class MsdSkipFixed(MsdSkip):
    """MSD-vskip with MsdFixed's fixes and without its stop on a repeated tail
    (`no_repeat_stop`: after 20 tokens, any 1..64-gram repeated twice in a row ends it)."""

    fixes = ("eager_tree_mask", "no_repeat_stop")
    mrope = True


ADAPTERS = {
    "baseline": Baseline,
    "pld": Pld,
    "pld-fixed": PldFixed,
    "eagle": Eagle,
    "eagle2": Eagle2,
    "eagle-imgfeat": EagleImageFeatures,
    "eagle2-imgfeat": Eagle2ImageFeatures,
    "eagle3": Eagle3,
    "medusa": Medusa,
    "vispec": ViSpec,
    "vispec-vskip": ViSpecSkip,
    "vispec-vskip-fixed": ViSpecSkipFixed,
    "sam": Sam,
    "sam-fixed": SamFixed,
    "sam-vskip": SamSkip,
    "sam-vskip-fixed": SamSkipFixed,
    "lookahead": Lookahead,
    "lookahead-fresh": LookaheadFresh,
    "recycling": Recycling,
    "recycling-fixed": RecyclingFixed,
    "msd": Msd,
    "msd-fixed": MsdFixed,
    "msd-vskip": MsdSkip,
    "msd-vskip-fixed": MsdSkipFixed,
}


# ---- running -------------------------------------------------------------------------------
class Prompts:
    """`build_prompt` as the scripts call it (args.model = the target folder), memoised: the
    later turns of a sample depend on the answers fed back, the first turn on nothing."""

    def __init__(self, target: Path) -> None:
        self.where = SimpleNamespace(model=str(target))
        self.memo: dict[tuple, Any] = {}
        eos = json.loads((target / "generation_config.json").read_text()).get("eos_token_id")
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])

    def __call__(self, prompt: Prompt, turn: int, history: list[tuple[str, str]]) -> Any:
        from evaluation.utils import build_prompt
        from PIL import Image

        key = (prompt.id, turn, tuple(history))
        if key not in self.memo:
            # as load_mmspec_data: the image as Image.open gives it; every turn passes it,
            # the template places it in the first user message only
            data = {"turns": list(prompt.turns), "image": Image.open(prompt.image)}
            self.memo[key] = build_prompt(
                data, self.where, turn_idx=turn, conversation_history=history if turn else None
            )
        return self.memo[key]


def run_method(
    name: str, method: Method, args: argparse.Namespace, prompts: list[Prompt], build: Prompts
) -> dict[str, Any]:
    import torch
    from evaluation.utils import process_output

    head = head_dir(args.ckpt, args.model, method.head) if method.head else None
    adapter = ADAPTERS[method.ref](ckpt_dir(args.ckpt, args.model), head, method.ref_args)
    first = build(prompts[0], 0, [])
    # warm-up as the scripts do it where a generation leaves state (3 times on the first
    # sample), else once
    for _ in range(3 if adapter.stateful else 1):
        adapter.generate(first, args.max_new_tokens)
    # a stateful method runs each turn once, in the scripts' order: a repeat would see its
    # own answer in the state
    repeats = 1 if adapter.stateful else args.repeats
    records = []
    for prompt in prompts:
        history: list[tuple[str, str]] = []
        for turn, question in enumerate(prompt.turns):
            inp = build(prompt, turn, history)
            walls, result = [], None
            for _ in range(repeats):
                t0 = time.perf_counter()
                result = adapter.generate(inp, args.max_new_tokens)
                walls.append(time.perf_counter() - t0)
            output, accept = result
            prompt_ids = inp["input_ids"][0].tolist()
            # the scripts feed back process_output of everything generated (past a stop
            # token or the budget too), decoded with the method's tokenizer; --cut-answers
            # cuts it as compare.normalise cuts outputs
            fed = output
            if args.cut_answers:
                fed = output[: args.max_new_tokens]
                ends = [i for i, tok in enumerate(fed) if tok in build.stop_ids]
                fed = fed[: ends[0] + 1] if ends else fed
            answer = process_output(
                torch.tensor([prompt_ids + fed]), adapter.tokenizer, len(prompt_ids)
            )
            history.append((question, answer))
            records.append(
                {
                    "id": prompt.id,
                    "turn": turn,
                    "topic": prompt.topic,
                    "prompt_ids": prompt_ids,
                    "pixels_sha256": pixels_sha256(inp.get("pixel_values")),
                    "output_ids": output,
                    "accept_lengths": accept,
                    "answer": answer,
                    "wall_s": min(walls),
                    "walls_s": walls,
                }
            )
            print(
                f"  ref {name} {prompt.id}/{turn}: {len(output)} tokens, {min(walls):.3f}s",
                flush=True,
            )
    return {
        "side": "reference",
        "method": name,
        "model": args.model,
        "ref": method.ref,
        "ref_args": method.ref_args,
        "stateful": adapter.stateful,
        "cut_answers": args.cut_answers,
        "repeats": repeats,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "records": records,
    }


def main() -> None:
    ap = runner_arguments(__doc__.split("\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="MMSpec checkout")
    ap.add_argument(
        "--cut-answers",
        action="store_true",
        help="feed later turns each answer cut at max_new_tokens and after its first stop "
        "token (MMSpec feeds back everything a method generated, past either)",
    )
    ap.add_argument("--ckpt", type=Path, default=parity_home(), help="convert.py's --out")
    ap.add_argument("--out", type=Path, default=parity_home() / "out")
    args = ap.parse_args()

    sys.path.insert(0, str(args.reference.resolve()))
    ref_patches.install()
    import torch

    torch.set_num_threads(args.threads)
    prompts = select_prompts(args.split, args.prompts)
    build = Prompts(ckpt_dir(args.ckpt, args.model))
    for name in each_method(args):
        data = run_method(name, METHODS[name], args, prompts, build)
        write_result(result_path(args.out, "reference", args.model, name), data)


if __name__ == "__main__":
    main()
