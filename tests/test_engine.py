"""Engine correctness: tree verification, losslessness against AR and HF, acceptance rules."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from mmspec.methods.accept import accept_greedy, accept_sampling
from mmspec.methods.engine import Engine, Generation
from mmspec.methods.registry import get_drafter
from mmspec.methods.tree import DraftTree
from mmspec.models.feature_taps import EMBEDS, FINAL, FeatureTap
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


def test_verify_logits_equal_the_full_models(target) -> None:
    """verify runs the language model's parts itself: the same logits, cache and tapped
    features as the model's own forward."""
    prompt = target.encode([_conv("What is in the picture?")], [_image((200, 30, 30))])
    cache = DynamicCache(config=target.model.config)
    logits0, next_pos = target.prefill(prompt, cache)
    twin = copy.deepcopy(cache)
    ids = torch.stack([logits0.argmax(-1), torch.tensor([7]), torch.tensor([9])], dim=1)
    positions = next_pos[:, None] + torch.tensor([[0, 1, 1]])  # root -> {7, 9}
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    visible = torch.cat([torch.ones(3, cache.get_seq_length(), dtype=torch.bool), tree], dim=1)
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    tap = FeatureTap(target, (EMBEDS, FINAL, 1))
    tap.arm()
    got = target.verify(ids, positions, mask[None, None], cache)
    feats = tap.take()
    tap.remove()
    with torch.inference_mode():
        out = target.model(
            input_ids=ids,
            position_ids=target.text_positions(positions),
            attention_mask=mask[None, None],
            use_cache=True,
            output_hidden_states=True,
            **{target._cache_kw: twin},
        )
    assert torch.equal(got, out.logits)
    # the drafters' feature taps read the same tensors as through the model's forward
    assert torch.equal(feats[EMBEDS], out.hidden_states[0])
    assert torch.equal(feats[1], out.hidden_states[2])
    with torch.inference_mode():
        assert torch.equal(target.model.get_output_embeddings()(feats[FINAL]), out.logits)
    for mine, theirs in zip(cache.layers, twin.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_collate_equals_encoding_together(target) -> None:
    """A serving stream encodes requests one by one and prefills them together: the collated
    batch holds the very tensors one processor call makes (different lengths and image
    sizes, and a text-only prompt between two with images)."""
    convs = [
        _conv("What colour is the square?"),
        [{"role": "user", "content": [{"type": "text", "text": "No picture: say hi."}]}],
        _conv("Describe the picture in many words, please."),
    ]
    images = [_image((10, 200, 10)), None, _image((200, 200, 10), (100, 140))]
    together = target.encode(convs, images)
    apart = target.collate([target.encode([c], [im]) for c, im in zip(convs, images)])
    assert apart.inputs.keys() == together.inputs.keys()
    for key, value in together.inputs.items():
        assert torch.equal(apart.inputs[key], value), key
    assert torch.equal(apart.input_ids, together.input_ids)
    assert torch.equal(apart.attention_mask, together.attention_mask)


def test_encoding_twin_encodes_alike_with_its_own_tokenizer(target) -> None:
    """The serving frontend's encoder: the same prompt tensors, no tokenizer or processor
    shared with the target (fast tokenizers fail when two threads use one), the model shared."""
    twin = target.encoding_twin()
    assert twin.model is target.model
    assert twin.tokenizer is not target.tokenizer and twin.processor is not target.processor
    conv, image = [_conv("What colour is the square?")], [_image((10, 200, 10))]
    mine, theirs = target.encode(conv, image), twin.encode(conv, image)
    assert mine.inputs.keys() == theirs.inputs.keys()
    assert all(torch.equal(v, theirs.inputs[k]) for k, v in mine.inputs.items())


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


# ---- per-step bookkeeping without a model ----------------------------------------------------


def _bare_engine(dtype: torch.dtype = torch.float32) -> Engine:
    """An Engine whose target is only what `_tree_inputs` / `_commit` / `_finished` read."""
    engine = Engine.__new__(Engine)
    engine.target = type("T", (), {"device": torch.device("cpu"), "dtype": dtype})()
    engine.target.eos_token_ids = frozenset({0})
    engine.compact_slack = 10**9
    return engine


def _live(valid: list[list[bool]], heads: int = 1, dim: int = 2):
    from mmspec.methods.engine import _Live

    valid_t = torch.tensor(valid)
    b, n = valid_t.shape
    cache = DynamicCache()
    keys = torch.arange(b * heads * n * dim, dtype=torch.float32).view(b, heads, n, dim)
    cache.update(keys, -keys, 0)
    return _Live(
        cache=cache,
        valid=valid_t,
        vision=None,
        next_pos=torch.tensor([int(v.sum()) for v in valid_t]),
        pending=torch.tensor([7 + i for i in range(b)]),
        rows=list(range(b)),
        tokens=[[1, 7 + i] for i in range(b)],
        prompt_lens=[int(v.sum()) for v in valid_t],
    )


def _old_additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask the engine built before it kept the bias (zeros, then masked_fill)."""
    mask = torch.zeros(visible.shape, dtype=dtype)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_additive_mask_is_bitwise_the_old_mask(dtype: torch.dtype) -> None:
    from mmspec.methods.kv_slots import additive_mask

    visible = torch.rand(3, 4, 9) > 0.5
    got = additive_mask(visible, dtype)
    assert got.dtype == dtype and torch.equal(got, _old_additive(visible, dtype))
    assert not torch.signbit(got[got == 0]).any()  # +0, as zeros() gave


def _slow_tree_mask(valid: torch.Tensor, trees: list[DraftTree]) -> torch.Tensor:
    """The visibility rule spelled out: cache slots of the row, then root / ancestors / self."""
    q = 1 + max(len(t) for t in trees)
    b, kv = valid.shape
    vis = torch.zeros(b, q, kv + q, dtype=torch.bool)
    for i, t in enumerate(trees):
        vis[i, :, :kv] = valid[i]
        for node in range(-1, q - 1):
            vis[i, node + 1, kv + node + 1] = True
            if node >= len(t):
                continue  # padding sees only itself
            n = node
            while n >= 0:
                n = t.parents[n]
                vis[i, node + 1, kv + n + 1] = True
    return vis


@pytest.mark.parametrize(
    "trees",
    [
        [DraftTree.empty(), DraftTree.empty()],  # AR: the one-token branch
        [DraftTree.chain([3, 4, 5]), DraftTree.empty()],
        [DraftTree([11, 12, 13, 14, 15, 16], [-1, -1, 0, 0, 2, 1]), DraftTree([21], [-1])],
    ],
)
def test_tree_inputs_follow_the_visibility_rule(trees: list[DraftTree]) -> None:
    valid = [[False, True, True, True], [True, True, True, True]]
    engine, live = _bare_engine(), _live(valid)
    ids, pos, mask = engine._tree_inputs(live, trees)
    q = 1 + max(len(t) for t in trees)
    assert ids.shape == pos.shape == (2, q) and mask.shape == (2, 1, q, 4 + q)
    for i, t in enumerate(trees):
        assert ids[i].tolist() == [7 + i, *t.tokens] + [7 + i] * (q - 1 - len(t))
        depths = [0, *t.depths] + [0] * (q - 1 - len(t))
        assert pos[i].tolist() == [live.next_pos[i] + d for d in depths]
    want = _old_additive(_slow_tree_mask(torch.tensor(valid), trees), torch.float32)
    assert torch.equal(mask, want)


@pytest.mark.parametrize(
    ("trees", "paths"),
    [
        ([DraftTree.empty(), DraftTree.empty()], [[], []]),  # AR: the mask row is the bias
        ([DraftTree.chain([3, 4, 5]), DraftTree.chain([6, 7])], [[0, 1], [0, 1]]),  # equal
        ([DraftTree.chain([3, 4, 5]), DraftTree.chain([6, 7])], [[0, 1, 2], []]),  # ragged
        ([DraftTree([3, 4, 5, 6], [-1, -1, 1, 2]), DraftTree.chain([6])], [[1, 2], [0]]),
    ],
)
def test_commit_keeps_accepted_slots(trees: list[DraftTree], paths: list[list[int]]) -> None:
    from mmspec.methods.accept import Acceptance

    valid = [[False, True, True], [True, True, True]]
    engine, live = _bare_engine(), _live(valid)
    ids, _, mask = engine._tree_inputs(live, trees)
    q = ids.shape[1]
    layer = live.cache.layers[0]
    new = torch.randn(2, 1, q, 2)  # what the verification appended
    layer.keys = torch.cat([layer.keys, new], dim=2)
    layer.values = torch.cat([layer.values, -new], dim=2)
    old_keys, old_pos = layer.keys.clone(), list(live.next_pos)
    accs = [
        Acceptance(p, [t.tokens[n] for n in p] + [90 + i])
        for i, (t, p) in enumerate(zip(trees, paths))
    ]
    engine._commit(live, accs, mask)

    keep = max(len(p) for p in paths) + 1
    kept = torch.zeros(2, keep, dtype=torch.bool)
    for i, p in enumerate(paths):
        kept[i, : len(p) + 1] = True
        slots = [0] + [n + 1 for n in p]
        assert torch.equal(
            layer.keys[i, :, 3 : 3 + len(slots)], old_keys[i, :, [3 + s for s in slots]]
        )
        assert live.next_pos[i] == old_pos[i] + len(p) + 1
        assert live.pending[i] == 90 + i and live.tokens[i][-1] == 90 + i
    assert layer.keys.shape[2] == 3 + keep and torch.equal(layer.values, -layer.keys)
    want = _old_additive(torch.cat([torch.tensor(valid), kept], dim=1)[:, None], torch.float32)
    assert torch.equal(live.bias, want[:, 0, 0])
    assert live.real == [int(r) for r in torch.cat([torch.tensor(valid), kept], 1).sum(1)]


def test_finished_reads_only_new_tokens_and_truncates() -> None:
    engine = _bare_engine()
    r = Generation(tokens=[5, 6])
    assert not engine._finished(r, 8, 2)
    r.tokens += [7, 0, 9]  # EOS (0) among the new tokens
    assert engine._finished(r, 8, 3) and r.tokens == [5, 6, 7, 0] and r.stop == "eos"
    r = Generation(tokens=[5, 6, 7])
    r.tokens += [8, 0]  # EOS after max_new_tokens does not count
    assert engine._finished(r, 4, 2) and r.tokens == [5, 6, 7, 8] and r.stop == "length"
