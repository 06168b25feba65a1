"""Engine correctness: tree verification, losslessness against AR and HF, acceptance rules."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from mmspec.methods.accept import accept_greedy, accept_sampling
from mmspec.methods.engine import Engine
from mmspec.methods.registry import get_drafter
from mmspec.methods.tree import DraftTree
from mmspec.models.loader import load_target
from mmspec.orchestrator.runner import ShardRunner
from mmspec.orchestrator.shards import Shard
from mmspec.results.cells import Cell, ModelConfig
from mmspec.workloads.sample import Sample
from mmspec.workloads.synthetic import synthetic_suite

MODELS = ["tiny-qwen2.5-vl", "tiny-llava"]


@pytest.fixture(scope="module", params=MODELS)
def target(request: pytest.FixtureRequest):
    torch.manual_seed(0)
    return load_target(request.param)


def _image(color: tuple[int, int, int], size: tuple[int, int] = (160, 120)) -> Image.Image:
    im = Image.new("RGB", size, color)
    im.paste((255, 255, 255), (20, 20, 60, 60))
    return im


def _conv(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_tree_verification_equals_sequential_decoding(target) -> None:
    """Logits of every node of a branching tree equal decoding its path one token at a time."""
    convs = [_conv("What is in the picture?"), _conv("Describe the colours of this image.")]
    images = [_image((200, 30, 30)), _image((20, 30, 220), (90, 140))]
    prompt = target.encode(convs, images)
    cache = DynamicCache(config=target.model.config)
    logits0, _ = target.prefill(prompt, cache)
    engine = Engine(target, get_drafter("ar")())
    pending = logits0.argmax(-1)
    # branching: root -> {a, b}; a -> {c, d}; c -> {e}; b -> {f}
    trees = [
        DraftTree([11, 12, 13, 14, 15, 16], [-1, -1, 0, 0, 2, 1]),
        DraftTree([21, 22, 23], [-1, 0, 0]),
    ]
    from mmspec.methods.engine import _Live

    live = _Live(
        cache=cache,
        valid=prompt.attention_mask.bool(),
        vision=prompt.input_ids == target.image_token_id,
        next_pos=target.prefill_positions(prompt)[1],
        pending=pending,
        rows=[0, 1],
        tokens=[[*t, int(p)] for t, p in zip(prompt.tokens(), pending)],
        prompt_lens=prompt.prompt_lens,
    )
    ids, pos, mask = engine._tree_inputs(live, trees)
    tree_logits = target.verify(ids, pos, mask, cache)

    for row, tree in enumerate(trees):
        one = target.encode([convs[row]], [images[row]])
        for node in range(-1, len(tree)):
            path, n = [], node
            while n >= 0:
                path.insert(0, tree.tokens[n])
                n = tree.parents[n]
            seq = [int(pending[row]), *path]
            ref_cache = DynamicCache(config=target.model.config)
            target.prefill(one, ref_cache)
            nxt = target.prefill_positions(one)[1]
            full = torch.zeros(1, 1, len(seq), ref_cache.get_seq_length() + len(seq))
            full[..., ref_cache.get_seq_length() :] = torch.triu(
                torch.full((len(seq), len(seq)), torch.finfo(torch.float32).min), 1
            )
            ref = target.verify(
                torch.tensor([seq]), nxt[:, None] + torch.arange(len(seq)), full, ref_cache
            )
            got = tree_logits[row, node + 1]
            assert torch.allclose(got, ref[0, -1], atol=1e-4), (row, node)


def test_engine_ar_equals_hf_generate(target) -> None:
    convs = [_conv("What colour is the square?"), _conv("Tell me a long story about it.")]
    images = [_image((10, 200, 10)), _image((200, 200, 10), (100, 100))]
    got = Engine(target, get_drafter("ar")()).generate(convs, images, max_new_tokens=24)
    for conv, im, res in zip(convs, images, got):
        prompt = target.encode([conv], [im])
        out = target.model.generate(**prompt.inputs, max_new_tokens=24, do_sample=False)
        assert res.tokens == out[0, prompt.input_ids.shape[1] :].tolist()


def test_cache_compaction_keeps_outputs(target) -> None:
    convs = [_conv("Describe everything."), _conv("Again?"), _conv("Count them.")]
    images = [_image((200, 30, 30)), _image((30, 200, 30)), _image((30, 30, 200))]
    pld = get_drafter("pld")()
    loose = Engine(target, pld, compact_slack=10**9).generate(convs, images, 48)
    tight = Engine(target, pld, compact_slack=0).generate(convs, images, 48)
    assert [r.tokens for r in loose] == [r.tokens for r in tight]


# ---- runner behaviour ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=MODELS)
def runners(request: pytest.FixtureRequest) -> dict[str, ShardRunner]:
    model = ModelConfig(request.param)
    return {m: ShardRunner(model, m, {}, threads=1) for m in ("ar", "pld")}


def test_bad_images_become_error_rows(runners: dict[str, ShardRunner]) -> None:
    good = synthetic_suite(per_topic=1, seed=0)
    buf = io.BytesIO()
    _image((1, 2, 3)).save(buf, format="PNG")
    corrupt = Sample("bad1", "general vqa", "x", ("q?",), buf.getvalue()[:40], "bad1.png")
    missing = Sample("bad2", "general vqa", "x", ("q?", "and?"), None, "", "image not found: /x")
    samples = (good[0], corrupt, missing, *good[1:3])
    runner = runners["pld"]
    cell = Cell("c", runner.model_config, "pld", {}, 2, 0.0, 0, 0, 16, "synthetic")
    rows = runner.run(Shard("run", "s", cell, samples))
    by_key = {(r.sample_id, r.turn): r for r in rows}
    assert by_key["bad1", 0].status == "error" and "bad1" in by_key["bad1", 0].error
    assert {by_key["bad2", t].status for t in (0, 1)} == {"error"}
    assert "image not found" in by_key["bad2", 0].error
    ok = [r for r in rows if r.sample_id not in ("bad1", "bad2")]
    assert ok and all(r.status == "ok" and r.new_tokens > 0 for r in ok)


def test_sampling_is_reproducible_per_seed(runners: dict[str, ShardRunner]) -> None:
    samples = tuple(synthetic_suite(per_topic=1, seed=0)[:3])
    runner = runners["pld"]
    cell = Cell("c", runner.model_config, "pld", {}, 2, 0.8, 0, 7, 24, "synthetic")
    a = runner.run(Shard("run", "a", cell, samples))
    b = runner.run(Shard("run", "b", cell, samples))
    assert [r.output_tokens for r in a] == [r.output_tokens for r in b]


# ---- acceptance rules without a model --------------------------------------------------------


def test_accept_greedy_follows_longest_matching_branch() -> None:
    tree = DraftTree([5, 6, 7, 8], [-1, -1, 1, 2])  # root -> 5 | 6 -> 7 -> 8
    # argmax per q-index: root predicts 6, node0 (5) -, node1 (6) predicts 7, node2 (7) predicts 9
    acc = accept_greedy(tree, [6, 0, 7, 9, 0])
    assert acc.path == [1, 2] and acc.tokens == [6, 7, 9]
    assert accept_greedy(DraftTree.empty(), [3]).tokens == [3]


@pytest.mark.parametrize("tree", [DraftTree.chain([1, 2]), DraftTree([1, 2], [-1, -1])])
def test_accept_sampling_keeps_target_distribution(tree: DraftTree) -> None:
    """First emitted token ~ p whatever the draft; a wrong rule (always accept) is detected."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = torch.log(p).repeat(len(tree) + 1, 1)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[accept_sampling(tree, logits, 1.0, gen).tokens[0]] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001

    wrong = torch.zeros(4)
    wrong[tree.tokens[0]] = n  # a rule that always accepts the first draft
    assert float(((wrong - n * p) ** 2 / (n * p)).sum()) > 16.27
