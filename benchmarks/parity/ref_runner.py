"""Run MMSpec's own methods on the converted checkpoints; write one JSON per method.

Runs INSIDE the reference venv (setup_venv.py), never with `mmspec` importable:

    $MMSPEC_HOME/parity/venv/bin/python benchmarks/parity/ref_runner.py \
        --reference /tmp/mmspec-ref --model tiny-qwen2.5-vl --methods ar,pld,eagle2

Each adapter does what MMSpec's evaluation/eval_<method>_mmspec.py does for one turn (load
with from_pretrained, `build_prompt`, then `generate` / `specgenerate` with the script's
arguments), minus the answer file, the time-breakdown hooks and the sanity checks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from common import (
    DEFAULT_SPLIT,
    METHODS,
    Method,
    ckpt_dir,
    head_dir,
    parity_home,
    pixels_sha256,
    result_path,
    select_prompts,
    write_result,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; hub ids must not download


# ---- adapters: one per MMSpec eval script --------------------------------------------------
class Baseline:
    """evaluation/eval_baseline_mmspec.py: stock transformers `generate`, greedy."""

    def __init__(self, target: Path, head: Path | None, args: dict[str, Any]) -> None:
        import transformers

        # the script's load_baseline_model: the class config.json names, device_map "cpu"
        # for its "auto"
        arch = transformers.AutoConfig.from_pretrained(str(target)).architectures[0]
        model_cls = getattr(transformers, arch)
        self.model = model_cls.from_pretrained(
            str(target), torch_dtype="auto", low_cpu_mem_usage=True, device_map="cpu"
        ).eval()

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        from evaluation.eval_baseline_mmspec import baseline_forward

        out, _, _, _ = baseline_forward(
            model=self.model, temperature=0.0, max_steps=max_new_tokens, **inputs
        )
        return out[0, inputs["input_ids"].shape[1] :].tolist(), None


class Spec:
    """The SpecModel scripts (pld, eagle, eagle2): `specgenerate(..., return_acceptance_len)`."""

    module = ""  # where SpecModel lives
    load_keys: ClassVar[tuple[str, ...]] = ()  # ref_args for SpecModel.from_pretrained
    generate_keys: ClassVar[dict[str, str]] = {}  # ref_args for specgenerate, renamed

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
        ).eval()
        self.extra = {new: args[old] for old, new in self.generate_keys.items()}

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        import torch

        with torch.inference_mode():  # the eval scripts' evaluate() is inference_mode
            out, _, _, accept = self.model.specgenerate(
                **inputs,
                temperature=0.0,
                max_new_tokens=max_new_tokens,
                log=True,
                return_acceptance_len=True,
                **self.extra,
            )
        return out[0, inputs["input_ids"].shape[1] :].tolist(), [int(a) for a in accept]


class Pld(Spec):
    module = "method.pld.spec_model_pld"
    # passed as the script passes them; spec_model_pld.py ignores both (hard-coded 4 and 10)
    generate_keys: ClassVar[dict[str, str]] = {"ngram": "pld_ngram", "n_pred": "pld_n_pred"}


class PldMrope(Pld):
    """MMSpec's PLD with its prefill given `image_grid_thw`, which spec_model_pld.py leaves
    out (it passes only the merged embeddings), so Qwen2.5-VL computes 1D positions for the
    image and rope_deltas 0, and the output is no longer the target's greedy one."""

    def generate(self, inputs: Any, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        base = self.model.base_model
        forward = base.forward

        def prefill_with_grid(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("inputs_embeds") is not None:  # only the prefill passes embeddings
                kwargs.setdefault("image_grid_thw", inputs.get("image_grid_thw"))
            return forward(*args, **kwargs)

        base.forward = prefill_with_grid  # an instance attribute: `del` restores the class's
        try:
            return super().generate(inputs, max_new_tokens)
        finally:
            del base.forward


class Eagle(Spec):
    module = "method.eagle.spec_model"
    load_keys = ("total_token", "depth", "top_k")


class Eagle2(Spec):
    module = "method.eagle2.spec_model"
    load_keys = ("total_token", "depth", "top_k", "threshold")


ADAPTERS = {
    "baseline": Baseline,
    "pld": Pld,
    "pld-mrope": PldMrope,
    "eagle": Eagle,
    "eagle2": Eagle2,
}


# ---- running -------------------------------------------------------------------------------
def run_method(
    name: str, method: Method, args: argparse.Namespace, prompts: list, inputs: list
) -> dict[str, Any]:
    head = head_dir(args.ckpt, args.model, method.head) if method.head else None
    adapter = ADAPTERS[method.ref](ckpt_dir(args.ckpt, args.model), head, method.ref_args)
    adapter.generate(inputs[0], args.max_new_tokens)  # warm-up, as the scripts do
    records = []
    for prompt, inp in zip(prompts, inputs):
        walls, result = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = adapter.generate(inp, args.max_new_tokens)
            walls.append(time.perf_counter() - t0)
        output, accept = result
        records.append(
            {
                "id": prompt.id,
                "topic": prompt.topic,
                "prompt_ids": inp["input_ids"][0].tolist(),
                "pixels_sha256": pixels_sha256(inp.get("pixel_values")),
                "output_ids": output,
                "accept_lengths": accept,
                "wall_s": min(walls),
                "walls_s": walls,
            }
        )
        print(f"  ref {name} {prompt.id}: {len(output)} tokens, {min(walls):.3f}s", flush=True)
    return {
        "side": "reference",
        "method": name,
        "model": args.model,
        "ref": method.ref,
        "ref_args": method.ref_args,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "records": records,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="MMSpec checkout")
    ap.add_argument("--model", default="tiny-qwen2.5-vl")
    ap.add_argument("--methods", default="ar,pld,eagle2")
    ap.add_argument("--split", type=Path, default=DEFAULT_SPLIT)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per prompt (best kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt", type=Path, default=parity_home(), help="convert.py's --out")
    ap.add_argument("--out", type=Path, default=parity_home() / "out")
    args = ap.parse_args()

    sys.path.insert(0, str(args.reference.resolve()))
    import ref_patches

    ref_patches.install()
    import torch
    from evaluation.utils import build_prompt
    from PIL import Image

    torch.set_num_threads(args.threads)
    prompts = select_prompts(args.split, args.prompts)
    # build_prompt as the scripts call it: args.model is the target folder, first turn
    where = SimpleNamespace(model=str(ckpt_dir(args.ckpt, args.model)))
    inputs = [
        build_prompt({"turns": [p.question], "image": Image.open(p.image)}, where) for p in prompts
    ]
    for name in args.methods.split(","):
        data = run_method(name, METHODS[name], args, prompts, inputs)
        write_result(result_path(args.out, "reference", args.model, name), data)


if __name__ == "__main__":
    main()
