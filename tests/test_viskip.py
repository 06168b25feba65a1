"""ViSkip: the probe's score equals eager attention, and skipping only changes speed."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from mmspec.methods.base import DraftContext
from mmspec.methods.engine import Engine, _Live
from mmspec.methods.registry import get_drafter
from mmspec.methods.tree import DraftTree
from mmspec.models.loader import load_target
from mmspec.models.vision_probe import VisionProbe
from mmspec.orchestrator.runner import ShardRunner
from mmspec.orchestrator.shards import Shard
from mmspec.results.cells import Cell, ModelConfig
from mmspec.workloads import synthetic_suite

MODELS = ["tiny-qwen2.5-vl", "tiny-llava"]


def _conv(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _eager_mass(model, inputs: dict, vision: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """(batch, q) head- and layer-mean attention on image keys, from eager attention weights."""
    out = model(**inputs, output_attentions=True)
    masses = []
    for layer in layers:
        att = out.attentions[layer]  # (b, heads, q, kv)
        masses.append((att * vision[:, None, None, : att.shape[-1]]).sum(-1).mean(1))
    return torch.stack(masses).mean(0)


@pytest.mark.parametrize("model_id", MODELS)
@pytest.mark.parametrize("layers", [(-1,), (0, -1)])
def test_probe_score_equals_eager_attention(model_id: str, layers: tuple[int, ...]) -> None:
    fast = load_target(model_id)
    eager = load_target(model_id, attn_implementation="eager")
    probe = VisionProbe(fast.text_layers(), layers)
    convs = [_conv("What colour is it?"), _conv("Describe every object you can see, please.")]
    images = [Image.new("RGB", (120, 90), (200, 20, 20)), Image.new("RGB", (64, 128), (0, 90, 9))]
    prompt = fast.encode(convs, images)
    vision = (prompt.input_ids == fast.image_token_id) & prompt.attention_mask.bool()
    assert vision.any(dim=1).all()

    # prefill: the last prompt position
    cache = DynamicCache(config=fast.model.config)
    probe.arm(vision, last_only=True)
    logits, next_pos = fast.prefill(prompt, cache)
    got = probe.take()[:, 0]
    positions, _ = fast.prefill_positions(prompt)
    ref_cache = DynamicCache(config=eager.model.config)
    inputs = {**prompt.inputs, "position_ids": positions, eager._cache_kw: ref_cache}
    want = _eager_mass(eager.model, inputs, vision, layers)
    assert torch.allclose(got, want[:, -1], atol=1e-5)

    # a tree verification: every node's query, through the engine's own tree inputs
    engine = Engine(fast, get_drafter("ar")())
    pending = logits.argmax(-1)
    live = _Live(
        cache=cache,
        valid=prompt.attention_mask.bool(),
        vision=vision,
        next_pos=next_pos,
        pending=pending,
        rows=[0, 1],
        tokens=[[*t, int(p)] for t, p in zip(prompt.tokens(), pending)],
        prompt_lens=prompt.prompt_lens,
    )
    trees = [DraftTree([5, 6, 7], [-1, -1, 0]), DraftTree([8], [-1])]
    ids, pos, mask = engine._tree_inputs(live, trees)
    keys = torch.cat([vision, torch.zeros_like(ids, dtype=torch.bool)], dim=1)
    probe.arm(keys, last_only=False)
    before = copy.deepcopy(cache)
    fast.verify(ids, pos, mask, cache)
    got = probe.take()
    # one query per row (the engine asks for the last accepted node's): the same numbers
    pick = torch.tensor([2, 1])
    probe.arm(keys, last_only=False)
    fast.verify(ids, pos, mask, before)
    assert torch.allclose(probe.take(pick), got[torch.arange(2), pick], atol=1e-6)
    verify_inputs = {
        "input_ids": ids,
        "position_ids": eager.text_positions(pos),
        "attention_mask": mask,
        eager._cache_kw: ref_cache,
    }
    want = _eager_mass(eager.model, verify_inputs, keys, layers)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.fixture(scope="module")
def runners() -> dict[str, ShardRunner]:
    model = ModelConfig("tiny-llava")
    return {
        "pld": ShardRunner(model, "pld", {}, threads=1),
        "never": ShardRunner(model, "viskip+pld", {"viskip_threshold": 1.0}, threads=1),
        "always": ShardRunner(model, "viskip+pld", {"viskip_threshold": 0.0}, threads=1),
        "ar": ShardRunner(model, "ar", {}, threads=1),
    }


def test_threshold_extremes(runners: dict[str, ShardRunner]) -> None:
    samples = tuple(synthetic_suite(per_topic=1, seed=0))
    rows = {}
    for name, runner in runners.items():
        cell = Cell("c", runner.model_config, runner.method, {}, 2, 0.0, 0, 0, 32, "syn")
        rows[name] = runner.run(Shard("run", name, cell, samples))
    outputs = {name: [r.output_tokens for r in rs] for name, rs in rows.items()}
    assert outputs["pld"] == outputs["never"] == outputs["always"] == outputs["ar"]
    # threshold 1.0 never skips: exactly pld's drafts and acceptances
    assert [r.accepted_tokens for r in rows["never"]] == [r.accepted_tokens for r in rows["pld"]]
    assert sum(r.skipped_steps for r in rows["never"]) == 0
    assert sum(r.accepted_tokens for r in rows["pld"]) > 0
    # threshold 0.0 skips every other step: the gate reads only verifications of drafts
    assert all(r.skipped_steps == r.steps // 2 > 0 for r in rows["always"])
    assert sum(r.drafted_tokens for r in rows["always"]) > 0


def test_the_gate_reads_only_verifications_of_drafts_by_default() -> None:
    """MMSpec's vispec_vskip rule: a row's first step and the step after a skipped one draft
    whatever the score; `every_step` gates them all."""
    ctx = DraftContext(rows=[0, 1], tokens=[[1, 2, 3], [1, 2, 4]], prompt_lens=[2, 2])
    high, low = 0.9, 0.1
    scores = [[high, low], [high, high], [high, high], [low, high], [high, high]]
    want = {
        "after_draft": [[0, 0], [1, 1], [0, 0], [0, 1], [1, 0]],
        "every_step": [[1, 0], [1, 1], [1, 1], [0, 1], [1, 1]],
    }
    for gate, skips in want.items():
        drafter = get_drafter("viskip+pld")(viskip_threshold=0.5, viskip_gate=gate)
        for _ in range(2):  # a new generation starts over
            drafter.begin(ctx)
            got = []
            for step in scores:
                ctx.extras["vision_score"] = step
                got.append([int(t.skipped) for t in drafter.propose(ctx)])
            assert got == skips, gate
    # at the threshold itself the step is skipped (>=, as MMSpec compares)
    drafter = get_drafter("viskip+pld")(viskip_threshold=0.5, viskip_gate="every_step")
    drafter.begin(ctx)
    ctx.extras["vision_score"] = [0.5, 0.4999]
    assert [t.skipped for t in drafter.propose(ctx)] == [True, False]
    with pytest.raises(ValueError, match="viskip_gate"):
        get_drafter("viskip+pld")(viskip_gate="sometimes")


def test_bad_threshold_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="viskip_threshold"):
        get_drafter("viskip+sam")(viskip_threshold=1.5)
    # the wrapped method keeps its own arguments, SAM's `threshold` included
    drafter = get_drafter("viskip+sam")(viskip_threshold=0.2, threshold=3)
    assert (drafter.threshold, drafter.inner.threshold) == (0.2, 3)
    assert "ngram" in get_drafter("viskip+pld").arg_names()


def test_several_viskip_engines_share_one_target() -> None:
    """Engines of several ViSkip variants on one loaded target (as benchmarks build them):
    each engine's probe is the one its forward reports to."""
    target = load_target("tiny-llava")
    engines = [
        Engine(target, get_drafter("viskip+pld")(viskip_threshold=t)) for t in (0.0, 1.0, 0.0)
    ]
    ar = Engine(target, get_drafter("ar")())
    args = ([_conv("What colour is it?")], [Image.new("RGB", (112, 112), (200, 20, 20))], 12)
    want = ar.generate(*args)[0].tokens
    results = [engine.generate(*args)[0] for engine in engines]
    assert [r.tokens for r in results] == [want] * 3
    # threshold 0 skips every other step, 1.0 none: each engine read its own probe
    assert results[0].skipped_steps == results[0].steps // 2 > 0 and results[1].skipped_steps == 0
