"""Trained draft heads: feature tap, the head's ragged cache, tree growth, checkpoints, training.

The lossless contract of every registered method (the zoo's trained heads included) is in
test_lossless.py / test_sampling.py; here the building blocks are checked on their own, and
untrained heads of every EAGLE-family method run lossless on both tiny_targets.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from mmspec.methods.base import Drafter
from mmspec.methods.draft_checkpoint import CheckpointError
from mmspec.methods.engine import Engine
from mmspec.methods.head_cache import DraftKV, feed
from mmspec.methods.head_config import DraftConfig, decoder_layer, rotary, run_layer, save_head
from mmspec.methods.registry import get_drafter
from mmspec.methods.tree import DraftTree
from mmspec.methods.tree_search import TreeSearch
from mmspec.models.feature_taps import EMBEDS, FINAL, FeatureTap
from mmspec.models.target import cache_keyword
from tests.conftest import reference_head_config

MODELS = ["tiny-llava", "tiny-qwen2.5-vl"]
HEADS = {"eagle": "eagle", "eagle2": "eagle", "vispec": "vispec", "msd": "msd"}


def _random_head(method: str, target, out: Path, seed: int = 0) -> Path:
    """An untrained head as the trainer builds new ones (so with MMSpec's image-slot rule)."""
    torch.manual_seed(seed)
    head_cls = get_drafter(method).head_cls
    head = head_cls(head_cls.draft_config(HEADS[method], target))
    save_head(head, head.config, out)
    return out


# ---- the head's layer -------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_run_layer_equals_the_transformers_layer(tiny_targets, model) -> None:
    """Heads run their decoder layer through `run_layer` (no per-call dispatch): the same
    numbers as the layer's own forward, on a prompt (causal, no mask), a tree with a mask and
    one token, each extending the cache."""
    from transformers import DynamicCache

    config = DraftConfig.for_target("eagle", tiny_targets[model])
    torch.manual_seed(0)
    layer, rope = decoder_layer(config).eval(), rotary(config)
    mine, theirs = DynamicCache(), DynamicCache()
    width, seen = config.hidden_size, 0
    for q, masked in ((9, False), (4, True), (1, False)):
        x = torch.randn(2, q, width)
        positions = torch.arange(seen, seen + q).expand(2, -1)
        mask = None
        if masked:  # a branching tree after the cache, row 1 seeing one slot less
            visible = torch.ones(2, 1, q, seen + q, dtype=torch.bool)
            visible[:, :, :, seen:] = torch.tensor(
                [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]
            )
            visible[1, :, :, 0] = False
            mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
        with torch.no_grad():
            got = run_layer(layer, x, rope(x, positions), mask, mine)
            want = layer(
                x,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=rope(x, positions),
                use_cache=True,
                **{cache_keyword(layer): theirs},
            )
        assert torch.equal(got, want), (q, masked)
        seen += q
    assert torch.equal(mine.layers[0].keys, theirs.layers[0].keys)


# ---- feature tap ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_feature_tap_reads_what_the_model_computes(tiny_targets, head_samples, model) -> None:
    target = tiny_targets[model]
    convs, images = head_samples
    prompt = target.encode(convs[:2], images[:2])
    tap = FeatureTap(target, (EMBEDS, FINAL, 0, -2))
    positions, _ = target.prefill_positions(prompt)
    tap.arm()
    with torch.inference_mode():
        out = target.model(**prompt.inputs, position_ids=positions, output_hidden_states=True)
    feats = tap.take()
    tap.remove()
    hidden = out.hidden_states  # embeddings, then each layer's output (the last one normed)
    assert torch.equal(feats[EMBEDS], hidden[0])
    assert torch.equal(feats[0], hidden[1])
    assert torch.equal(feats[-2], hidden[-2])  # layer 2 of 4
    lm_in = target.model.get_output_embeddings()
    with torch.inference_mode():
        assert torch.allclose(lm_in(feats[FINAL]), out.logits, atol=1e-5)
    # image slots carry the projected image features, not the placeholder's embedding
    image = prompt.input_ids == target.image_token_id
    placeholder = target.model.get_input_embeddings().weight[target.image_token_id]
    assert not torch.allclose(feats[EMBEDS][image][0], placeholder)


# ---- the head's ragged cache ------------------------------------------------------------------


def test_ragged_feed_equals_rows_alone(tiny_targets) -> None:
    """Rows fed side by side (padded, with different lengths) see exactly their own slots."""
    target = tiny_targets["tiny-llava"]
    torch.manual_seed(0)
    head = get_drafter("eagle").head_cls(DraftConfig.for_target("eagle", target)).eval()
    h = head.config.hidden_size
    rows = [torch.randn(7, h), torch.randn(3, h)]
    then = [torch.randn(2, h), torch.randn(4, h)]

    def run(parts_list: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        kv = DraftKV(len(parts_list[0]), torch.device("cpu"))
        outs = []
        for parts in parts_list:
            counts = [p.shape[0] for p in parts]
            x = torch.zeros(len(parts), max(counts), h)
            for i, p in enumerate(parts):
                x[i, : p.shape[0]] = p
            pos = kv.next_pos[:, None] + torch.arange(max(counts))[None]
            out = feed(kv, lambda a, p, m: head.block(a, p, m, kv.cache), x, pos, counts)
            outs.append([out[i, :c] for i, c in enumerate(counts)])
        return outs

    with torch.no_grad():
        together = run([rows, then])
        alone = [run([[rows[i]], [then[i]]]) for i in range(2)]
    for i in range(2):
        for step in range(2):
            assert torch.allclose(together[step][i], alone[i][step][0], atol=1e-5)


# ---- growing trees ----------------------------------------------------------------------------


class _FakeHead:
    """Log-probs that depend on the fed token only, so the best tree can be worked out."""

    def __init__(self, vocab: int = 12) -> None:
        g = torch.Generator().manual_seed(1)
        self.table = torch.log_softmax(torch.randn(vocab, vocab, generator=g) * 3, dim=-1)

    def expand(self, tokens, parent_hidden, mask, positions):
        return self.table[tokens], parent_hidden


def _search(fake: _FakeHead, batch: int = 2) -> TreeSearch:
    kv = DraftKV(batch, torch.device("cpu"))
    kv.valid = torch.ones(batch, 5, dtype=torch.bool)

    # the fake head keeps no cache: only the valid mask grows, and is cropped at the end
    return TreeSearch(fake.expand, kv)


def _score(tree, table, root_logp, node):
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    path.reverse()
    score = float(root_logp[tree.tokens[path[0]]])
    for a, b in itertools.pairwise(path):
        score += float(table[tree.tokens[a], tree.tokens[b]])
    return score


def test_dynamic_tree_keeps_the_likeliest_nodes() -> None:
    fake = _FakeHead()
    search = _search(fake)
    root = torch.log_softmax(torch.randn(2, 12, generator=torch.Generator().manual_seed(2)), -1)
    trees = search.dynamic(root, torch.zeros(2, 4), depth=3, top_k=3, total_token=10)
    assert search.kv.valid.shape[1] == 5  # the tree levels were cropped off the cache
    for i, tree in enumerate(trees):
        assert len(tree) == 9 and max(tree.depths) <= 4
        scores = [_score(tree, fake.table, root[i], n) for n in range(len(tree))]
        top = root[i].topk(3)
        firsts = [n for n in range(len(tree)) if tree.parents[n] < 0]
        assert [tree.tokens[n] for n in firsts] == top.indices[: len(firsts)].tolist()
        # a depth-1 candidate left out scores below every node kept
        for token, score in zip(top.indices.tolist(), top.values.tolist()):
            if token not in [tree.tokens[n] for n in firsts]:
                assert score <= min(scores) + 1e-6
        for p in set(tree.parents):  # siblings come likeliest first
            kids = [scores[n] for n in range(len(tree)) if tree.parents[n] == p]
            assert kids == sorted(kids, reverse=True)
        assert any(d >= 3 for d in tree.depths)


def test_confidence_threshold_keeps_only_likely_nodes() -> None:
    fake = _FakeHead()
    root = torch.log_softmax(torch.randn(2, 12, generator=torch.Generator().manual_seed(2)), -1)
    full = _search(fake).dynamic(root, torch.zeros(2, 4), depth=3, top_k=3, total_token=10)
    cut = _search(fake).dynamic(root, torch.zeros(2, 4), 3, 3, 10, threshold=0.2)
    for i, tree in enumerate(cut):
        scores = sorted(_score(tree, fake.table, root[i], n) for n in range(len(tree)))
        above = [x for x in scores if x > torch.tensor(0.2).log()]
        # at least top_k nodes, beyond those only nodes likelier than the threshold
        assert len(tree) == max(3, len(above)) <= len(full[i])
        assert len(tree) < len(full[i]) or len(above) >= 9


def test_confidence_threshold_expands_once_then_tests_each_level() -> None:
    """MMSpec's EAGLE-2 (`method/eagle2/cnets.py` `topK_genrate`) feeds level 1 to the head
    whatever its scores, and stops after the first level whose best node is below the
    threshold; a threshold of 1.0 never stops before `depth`."""
    fake = _FakeHead()
    calls: list[int] = []

    def counted(tokens, parent_hidden, mask, positions):
        calls.append(tokens.shape[1])
        return fake.expand(tokens, parent_hidden, mask, positions)

    def expansions(root: torch.Tensor, threshold: float) -> int:
        calls.clear()
        kv = DraftKV(1, torch.device("cpu"))
        kv.valid = torch.ones(1, 5, dtype=torch.bool)
        TreeSearch(counted, kv).dynamic(root, torch.zeros(1, 4), 3, 3, 10, threshold)
        return len(calls)

    flat = torch.full((1, 12), -math.log(12))  # every child of the root at p = 1/12
    assert expansions(flat, 0.5) == 1  # below the threshold already, expanded once all the same
    assert expansions(flat, 1.0) == 3
    assert expansions(flat, 1e-9) == 3


def test_static_tree_follows_the_choices() -> None:
    fake = _FakeHead()
    search = _search(fake, batch=1)
    root = torch.log_softmax(torch.randn(1, 12, generator=torch.Generator().manual_seed(3)), -1)
    choices = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    (tree,) = search.static(root, torch.zeros(1, 4), choices)
    first = root[0].topk(2).indices.tolist()
    assert tree.tokens[:2] == first and tree.parents == [-1, -1, 0, 0, 1, 2]
    assert tree.tokens[2:4] == fake.table[first[0]].topk(2).indices.tolist()
    assert tree.tokens[4] == int(fake.table[first[1]].argmax())
    assert tree.tokens[5] == int(fake.table[tree.tokens[2]].argmax())
    with pytest.raises(ValueError, match="parents"):
        search.static(root, torch.zeros(1, 4), [(0, 0)])


# ---- untrained heads run lossless ---------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", sorted(HEADS))
def test_untrained_heads_are_lossless(tiny_targets, head_samples, tmp_path, model, method) -> None:
    target = tiny_targets[model]
    convs, images = head_samples
    path = _random_head(method, target, tmp_path / method)
    ref = Engine(target, get_drafter("ar")()).generate(convs, images, 24)
    engine = Engine(target, get_drafter(method)(checkpoint=str(path)))
    one = [r for i in range(4) for r in engine.generate(convs[i : i + 1], images[i : i + 1], 24)]
    four = engine.generate(convs, images, 24)
    assert [r.tokens for r in one] == [r.tokens for r in ref]
    assert [r.tokens for r in four] == [r.tokens for r in ref]
    # the head's batch is the sum of its rows: the same drafts, so the same acceptance
    assert [r.accept_lengths for r in four] == [r.accept_lengths for r in one]


class _SkipSome(Drafter):
    """Drafts with `inner` only every third step, as ViSkip does when every row skips; checks
    that the head has read every position up to the pending token whenever it drafts."""

    def __init__(self, inner: Drafter) -> None:
        self.inner, self.step, self.checked = inner, 0, 0

    def load(self, target) -> None:
        self.inner.load(target)
        self.features = self.inner.features

    def begin(self, ctx) -> None:
        self.inner.begin(ctx)

    def propose(self, ctx):
        self.step += 1
        if self.step % 3:
            return [DraftTree.empty(skipped=True) for _ in ctx.rows]
        trees = self.inner.propose(ctx)
        assert self.inner.kv.next_pos.tolist() == [len(t) - 1 for t in ctx.tokens]
        self.checked += 1
        return trees

    def update(self, ctx, outcome) -> None:
        self.inner.update(ctx, outcome)


def test_steps_without_drafting_leave_no_gap_in_the_head(
    tiny_targets, head_samples, tmp_path
) -> None:
    target = tiny_targets["tiny-qwen2.5-vl"]
    convs, images = head_samples
    path = _random_head("eagle2", target, tmp_path / "h")
    drafter = _SkipSome(get_drafter("eagle2")(checkpoint=str(path)))
    ref = Engine(target, get_drafter("ar")()).generate(convs, images, 24)
    got = Engine(target, drafter).generate(convs, images, 24)
    assert [r.tokens for r in got] == [r.tokens for r in ref]
    assert drafter.checked >= 3


# ---- checkpoints --------------------------------------------------------------------------------


def test_eagle_drafts_mmspecs_dynamic_tree_by_default() -> None:
    """MMSpec's EAGLE (`method/eagle/cnets.py` `topK_genrate`, `scripts/*/eval_eagle_mmspec.sh`)
    is the dynamic tree at depth 3, top_k 8, total_token 30, no confidence threshold; the
    EAGLE-1 paper's static 25-node tree is an option."""
    fake = _FakeHead()
    root = torch.log_softmax(torch.randn(2, 12, generator=torch.Generator().manual_seed(2)), -1)
    eagle = get_drafter("eagle")()
    assert (eagle.depth, eagle.top_k, eagle.total_token, eagle.choices) == (3, 8, 30, None)
    small = get_drafter("eagle")(depth=3, top_k=3, total_token=10)
    assert small.grow(_search(fake), root, torch.zeros(2, 4)) == _search(fake).dynamic(
        root, torch.zeros(2, 4), depth=3, top_k=3, total_token=10
    )
    static = get_drafter("eagle")(tree="static")
    trees = static.grow(_search(fake), root, torch.zeros(2, 4))
    assert [len(t) for t in trees] == [25, 25]
    paths = [(0,), (1,), (0, 0)]
    assert (
        len(get_drafter("eagle")(tree=paths).grow(_search(fake), root, torch.zeros(2, 4))[0]) == 3
    )
    with pytest.raises(ValueError, match="eagle tree must be dynamic, static or a list of paths"):
        get_drafter("eagle")(tree="wide")


def test_a_missing_zoo_head_says_how_to_train_one(tiny_targets) -> None:
    target = tiny_targets["tiny-llava"]
    saved = target.name
    target.name = "no-such-target"
    try:
        with pytest.raises(CheckpointError, match="train-drafter --method eagle"):
            Engine(target, get_drafter("eagle2")())
    finally:
        target.name = saved


def test_a_head_for_another_target_is_refused(tiny_targets, tmp_path) -> None:
    path = _random_head("eagle", tiny_targets["tiny-llava"], tmp_path / "h")
    config = json.loads((path / "config.json").read_text())
    config["hidden_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden 64"):
        Engine(tiny_targets["tiny-llava"], get_drafter("eagle")(checkpoint=str(path)))


def _reference_layout(head: torch.nn.Module, target) -> dict[str, torch.Tensor]:
    """A reference checkpoint's tensors: our keys plus the frozen embedding copy."""
    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["embed_tokens.weight"] = target.model.get_input_embeddings().weight.detach().clone()
    return state


@pytest.mark.parametrize("method", ["eagle", "vispec", "msd"])
def test_reference_checkpoints_load_and_bad_keys_are_named(tiny_targets, tmp_path, method) -> None:
    from safetensors.torch import save_file

    target = tiny_targets["tiny-llava"]
    torch.manual_seed(5)
    head = get_drafter(method).head_cls(DraftConfig.for_target(method, target))
    state = _reference_layout(head, target)
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text(json.dumps(reference_head_config(target)))
    torch.save(state, ref / "pytorch_model.bin")
    drafter = get_drafter(method)(checkpoint=str(ref))
    drafter.load(target)
    for k, v in head.state_dict().items():
        assert torch.equal(drafter.head.state_dict()[k], v), k
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(reference_head_config(target)))
    renamed = dict(state)
    renamed["layers.0.mlp.gate.weight"] = renamed.pop("layers.0.mlp.gate_proj.weight")
    save_file(renamed, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        get_drafter(method)(checkpoint=str(bad)).load(target)
    assert "layers.0.mlp.gate_proj.weight" in str(err.value)
    assert "layers.0.mlp.gate.weight" in str(err.value)


# ---- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eagle", "vispec", "msd"])
def test_a_few_training_steps_reduce_the_loss(tiny_targets, tmp_path, method) -> None:
    from mmspec.training.distill import DistillConfig
    from mmspec.training.train_drafter import recipe, train_head

    config = recipe(
        method,
        "tiny-llava",
        steps=16,
        lr=3e-3,
        warmup_steps=2,
        text_steps=4,
        ramp_steps=4 if method == "msd" else 0,
        distill=DistillConfig(per_topic=2, max_new_tokens=24),
    )
    _, result = train_head(config, tmp_path, tiny_targets["tiny-llava"])
    assert len(result.losses) == 16
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4, result.losses
    assert any(m["image"] for m in result.metrics) and not all(m["image"] for m in result.metrics)
    # the distilled data is cached: a second run of another head reuses it
    assert len(list((tmp_path / "distill").iterdir())) == 1


@pytest.mark.parametrize("method", ["eagle2", "medusa", "eagle3"])
def test_a_checkpoint_folder_that_is_not_there_fails_at_grid_validation(method) -> None:
    with pytest.raises(ValueError, match="is not a folder"):
        get_drafter(method)(checkpoint="./no/such/head")


def test_train_drafter_names_a_target_that_is_not_there(tmp_path) -> None:
    from click.testing import CliRunner

    from mmspec.cli.main import main

    args = ["train-drafter", "--method", "eagle", "--target", "./no/such/model"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "h")])
    assert result.exit_code == 2
    assert "--target" in result.output and "./no/such/model does not exist" in result.output
    assert not (tmp_path / "h").exists()
