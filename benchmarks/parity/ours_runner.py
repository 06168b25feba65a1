"""Run our engine's methods on the same prompts; write the same JSON as ref_runner.py.

    .venv/bin/python benchmarks/parity/ours_runner.py --model tiny-qwen2.5-vl --methods ar,pld

The target is loaded with MMSpec's prompt setup (`prompt_style="mmspec"`), so prompt ids are
those of MMSpec's `build_prompt`. One generation at a time (batch 1, greedy), as MMSpec runs.
Every turn of a sample runs as our ShardRunner runs it: the conversation so far
(`orchestrator.runner.conversation`) with our decoded answers (`Target.decode`) fed back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    METHODS,
    MODELS,
    Method,
    Prompt,
    each_method,
    parity_home,
    pixels_sha256,
    result_path,
    runner_arguments,
    select_prompts,
    write_result,
)
from PIL import Image

from mmspec.methods.draft_checkpoint import checkpoint_dir
from mmspec.methods.engine import Engine
from mmspec.methods.registry import get_drafter
from mmspec.models.loader import load_target
from mmspec.orchestrator.runner import conversation
from mmspec.workloads import Sample


def head_copy(method: Method, model: str, folder: Path) -> dict[str, Any]:
    """The drafter arguments that run `method`'s zoo head with its `head_options`: a copy in
    `folder` whose config.extra has them, the weights unchanged. None needed: {}."""
    if not method.head_options:
        return {}
    assert method.head is not None
    src = checkpoint_dir(method.head, MODELS[model].ours)
    config = json.loads((src / "config.json").read_text())
    config["extra"].update(method.head_options)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(src / "model.safetensors", folder / "model.safetensors")
    return {"checkpoint": str(folder)}


def run_method(
    name: str, method: Method, model: str, prompts: list[Prompt], args: argparse.Namespace
) -> dict[str, Any]:
    # a fresh target per method, as the reference loads one per method: no hooks carried over
    target = load_target(MODELS[model].ours, device="cpu", prompt_style="mmspec")
    with tempfile.TemporaryDirectory() as folder:  # the engine loads the head right away
        drafter = get_drafter(method.ours)(
            **method.ours_args, **head_copy(method, model, Path(folder))
        )
        engine = Engine(target, drafter)

    def generate(conv: list, image: list, prompt: Any) -> Any:
        # timed like MMSpec's scripts: on a prompt already tokenised and preprocessed
        target.encode = lambda *_: prompt  # an instance attribute: `del` restores the method
        try:
            return engine.generate(conv, image, max_new_tokens=args.max_new_tokens)[0]
        finally:
            del target.encode

    def job(p: Prompt, answers: list[str]) -> tuple[list, list, Any]:
        # as ShardRunner._run_turn: the conversation so far, the image with its first turn
        sample = Sample(id=p.id, topic=p.topic, category="", turns=p.turns)
        conv = [conversation(sample, answers, has_image=True)]
        image = [Image.open(p.image).convert("RGB")]  # as Sample.load_image decodes it
        return conv, image, target.encode(conv, image)

    generate(*job(prompts[0], []))  # warm-up
    records = []
    for p in prompts:
        answers: list[str] = []
        for turn in range(len(p.turns)):
            conv, image, prompt = job(p, answers)
            walls, g = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                g = generate(conv, image, prompt)
                walls.append(time.perf_counter() - t0)
            answers.append(target.decode(g.tokens))  # what ShardRunner feeds back
            records.append(
                {
                    "id": p.id,
                    "turn": turn,
                    "topic": p.topic,
                    "prompt_ids": prompt.input_ids[0].tolist(),
                    "pixels_sha256": pixels_sha256(prompt.inputs.get("pixel_values")),
                    "output_ids": g.tokens,
                    "accept_lengths": g.accept_lengths,
                    "answer": answers[-1],
                    "wall_s": min(walls),
                    "walls_s": walls,
                }
            )
            print(
                f"  ours {name} {p.id}/{turn}: {len(g.tokens)} tokens, {min(walls):.3f}s",
                flush=True,
            )
    return {
        "side": "ours",
        "method": name,
        "model": model,
        "ours": method.ours,
        "ours_args": method.ours_args,
        "head_options": method.head_options,
        # the settings the drafter ended up with, defaults included
        "drafter": {k: v for k, v in vars(drafter).items() if isinstance(v, int | float | str)},
        "stop_ids": sorted(target.eos_token_ids),
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "records": records,
    }


def main() -> None:
    ap = runner_arguments(__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=parity_home() / "out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = select_prompts(args.split, args.prompts)
    for name in each_method(args):
        data = run_method(name, METHODS[name], args.model, prompts, args)
        write_result(result_path(args.out, "ours", args.model, name), data)


if __name__ == "__main__":
    main()
