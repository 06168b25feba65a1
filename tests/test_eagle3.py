"""EAGLE-3 (methods/eagle3.py): MMSpec's features (and the int-only configs of before), the
training-time test's attention against the tree it trains for, the draft vocabulary, lossless
drafting, reference checkpoints, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmspec.methods.draft_checkpoint import CheckpointError
from mmspec.methods.engine import Engine
from mmspec.methods.head_cache import DraftKV, feed
from mmspec.methods.head_config import save_head
from mmspec.methods.head_training import TeacherBatch
from mmspec.methods.registry import get_drafter
from mmspec.models.feature_taps import EMBEDS
from tests.conftest import reference_head_config, target_view

MODELS = ["tiny-llava", "tiny-qwen2.5-vl"]
DRAFT_VOCAB = 512


@pytest.fixture(scope="module")
def e3():
    """methods/eagle3.py, imported (so "eagle3" registers) only once tests run: imported at
    collection, it would add eagle3 to the method lists other test files parametrize over."""
    import mmspec.methods.eagle3 as module

    return module


@pytest.fixture(scope="module")
def targets(e3, tiny_targets) -> dict:
    return tiny_targets


@pytest.fixture(scope="module")
def samples(head_samples) -> tuple[list, list]:
    return head_samples


def _random_head(target, seed: int = 0, **extra):
    """An untrained head with a random (not the default leading-ids) draft vocabulary."""
    from mmspec.methods.eagle3 import Eagle3Head

    torch.manual_seed(seed)
    extra.setdefault("draft_vocab_size", DRAFT_VOCAB)
    head = Eagle3Head(Eagle3Head.draft_config("eagle3", target, **extra))
    head.set_draft_vocab(torch.rand(head.config.vocab_size))
    return head.eval()


def _legacy(head):
    """`head` with a config of before MMSpec's rule: three decoder layers, no image rule."""
    from mmspec.methods.eagle3 import Eagle3Head
    from mmspec.methods.head_config import DraftConfig

    raw = json.loads(head.config.to_json())
    for key in ("zero_image_positions", "image_slot_token"):
        del raw["extra"][key]
    raw["extra"]["feature_layers"] = [0, 1, 2]
    old = Eagle3Head(DraftConfig.from_json(json.dumps(raw)))
    old.load_state_dict(head.state_dict())
    return old.eval()


def test_new_heads_take_mmspecs_features_and_image_rule(e3, targets) -> None:
    from mmspec.methods.head_config import DraftConfig

    target = targets["tiny-llava"]
    pad = target.tokenizer.pad_token_id
    assert pad == 4  # not 0: the check below could not pass by a default
    # how the trainer builds heads (draft_config), and a bare DraftConfig for the target
    for config in (
        e3.Eagle3Head.draft_config("eagle3", target),
        DraftConfig.for_target("eagle3", target),
    ):
        head = e3.Eagle3Head(config)
        assert head.target_features == (EMBEDS, 0, 1) and head.zero_image
        extra = json.loads(head.config.to_json())["extra"]
        assert extra["feature_layers"] == ["embeds", 0, 1]
        assert extra["zero_image_positions"] is True and extra["image_slot_token"] == pad
        assert extra["draft_vocab_size"] == 512 and extra["ttt_steps"] == 7
    with pytest.raises(ValueError, match="layer index"):
        e3.Eagle3Head(e3.Eagle3Head.draft_config("eagle3", target, feature_layers=["x", 0, 1]))


def test_an_int_only_config_loads_as_before(targets, tmp_path) -> None:
    old = _legacy(_random_head(targets["tiny-llava"]))
    save_head(old, old.config, tmp_path / "old")
    extra = json.loads((tmp_path / "old" / "config.json").read_text())["extra"]
    assert extra["feature_layers"] == [0, 1, 2] and extra["zero_image_positions"] is False
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    del raw["extra"]["zero_image_positions"]  # as the zoo's heads of before were saved
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    drafter = get_drafter("eagle3")(checkpoint=str(tmp_path / "old"))
    drafter.load(targets["tiny-llava"])
    assert drafter.head.target_features == (0, 1, 2) and not drafter.head.zero_image


def _first_inputs(head) -> tuple[dict, list]:
    """Records the first input of head.fc and of the head's layer (its token embeddings)."""
    seen: dict = {}

    def fc(module, args):
        seen.setdefault("fused", args[0].detach().clone())

    def layer(module, args):
        seen.setdefault("embeds", args[0].detach().clone())

    hooks = [
        head.fc.register_forward_pre_hook(fc),
        head.midlayer.register_forward_pre_hook(layer),
    ]
    return seen, hooks


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rule", ["mmspec", "int-only"])
def test_the_head_reads_mmspecs_features_drafting_and_training(
    targets, samples, tmp_path, model, rule
) -> None:
    """Drafting and training fuse [embeddings, layer 0 out, layer 1 out] = the target's own
    hidden_states[0..2] with image rows zeroed, and at image slots read the pad token's
    embedding (MMSpec's rule); an int-only config reads hidden_states[1..3] as they are."""
    target = targets[model]
    convs, images = samples
    prompt, hs, logits, image = target_view(target, convs[0], images[0])
    head = _random_head(target)
    if rule == "mmspec":
        want = torch.cat(hs[0:3], dim=-1).masked_fill(image[..., None], 0.0)
        slot = target.model.get_input_embeddings().weight[target.tokenizer.pad_token_id]
    else:
        head = _legacy(head)
        want = torch.cat(hs[1:4], dim=-1)
        slot = None
    # embeddings of tokens 1..n-1 (the last position reads the first generated token)
    want_embeds = hs[0][0, 1:].clone()
    if slot is not None:
        want_embeds[image[0, 1:]] = slot
    assert not torch.equal(want_embeds, hs[0][0, 1:]) or slot is None

    save_head(head, head.config, tmp_path / "eagle3")
    engine = Engine(target, get_drafter("eagle3")(checkpoint=str(tmp_path / "eagle3")))
    seen, hooks = _first_inputs(engine.drafter.head)
    engine.generate(convs[:1], images[:1], 4)
    for h in hooks:
        h.remove()
    assert torch.allclose(seen["fused"], want, atol=1e-5)
    assert torch.allclose(seen["embeds"][0, :-1], want_embeds, atol=1e-5)
    if rule == "mmspec":
        assert torch.equal(seen["fused"][image], torch.zeros_like(seen["fused"][image]))

    # training reads the same: a teacher batch of that prompt, as the tap hands it over
    real = prompt.attention_mask.bool()
    batch = TeacherBatch(
        input_ids=prompt.input_ids,
        real=real,
        answer=real,
        image=image,
        features={EMBEDS: hs[0], 0: hs[1], 1: hs[2], 2: hs[3]},
        logits=logits,
    )
    trained = _random_head(target) if rule == "mmspec" else _legacy(_random_head(target))
    seen, hooks = _first_inputs(trained)
    embed = target.model.get_input_embeddings()
    trained.train_loss(batch, embed, target.model.get_output_embeddings())
    for h in hooks:
        h.remove()
    assert torch.allclose(seen["fused"], want, atol=1e-5)
    # step 0's embeddings: tokens 1..n-1, then past the row's end (padding)
    n = prompt.input_ids.shape[1]
    assert torch.allclose(seen["embeds"][0, : n - 1], want_embeds, atol=1e-5)


def test_log_probs_cover_the_draft_vocabulary_only(targets) -> None:
    head = _random_head(targets["tiny-llava"])
    ids = head.draft_ids
    assert ids.tolist() == sorted(set(ids.tolist())) and len(ids) == DRAFT_VOCAB
    assert head.t2d.sum() == DRAFT_VOCAB and bool(head.t2d[ids].all())
    with torch.no_grad():
        lp = head.logp(torch.randn(2, 3, head.config.hidden_size), lm_head=None)
    assert lp.shape == (2, 3, head.config.vocab_size)
    assert torch.isinf(lp[..., ~head.t2d]).all() and torch.isfinite(lp[..., ids]).all()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 3), atol=1e-5)


def test_a_full_draft_vocabulary_is_the_identity(targets) -> None:
    head = _random_head(targets["tiny-llava"], draft_vocab_size=10**6)
    assert head.config.extra["draft_vocab_size"] == head.config.vocab_size
    assert head.draft_ids.tolist() == list(range(head.config.vocab_size))


def test_training_time_test_sees_what_the_tree_sees(targets) -> None:
    """Unrolled step j at position t equals the head's output j levels down a tree chain
    grown from position t through its cache (the way the drafter runs it), and a short row
    padded beside a long one is unrolled as if alone."""
    head = _random_head(targets["tiny-llava"])
    h, steps, n = head.config.hidden_size, 3, 9
    torch.manual_seed(1)
    hidden = torch.randn(2, n, h)
    embeds = torch.randn(2, n + steps - 1, h)
    counts = torch.tensor([n, 5])
    with torch.no_grad():
        outs = head.unroll(embeds, hidden, counts, steps)
        alone = head.unroll(embeds[1:, : 5 + steps - 1], hidden[1:, :5], counts[1:], steps)
        for j in range(steps):
            assert torch.allclose(outs[j][1, :5], alone[j][0], atol=1e-5)
        for t in (0, 4, n - 1):
            kv = DraftKV(1, torch.device("cpu"))

            def step(x, p, m, kv=kv):
                return head.block(x, p, m, kv.cache)

            x = head.combine(embeds[:1, : t + 1], hidden[:1, : t + 1], None)
            out = feed(kv, step, x, torch.arange(t + 1)[None], [t + 1])[:, t]
            assert torch.allclose(out, outs[0][0, t], atol=1e-5)
            for j in range(1, steps):
                x = head.combine(embeds[:1, t + j : t + j + 1], out[:, None], None)
                out = feed(kv, step, x, torch.tensor([[t + j]]), [1])[:, 0]
                assert torch.allclose(out, outs[j][0, t], atol=1e-5), (t, j)


@pytest.mark.parametrize("model", MODELS)
def test_an_untrained_head_is_lossless(targets, samples, tmp_path, model) -> None:
    target = targets[model]
    convs, images = samples
    head = _random_head(target)
    save_head(head, head.config, tmp_path / "eagle3")
    ref = Engine(target, get_drafter("ar")()).generate(convs, images, 24)
    engine = Engine(target, get_drafter("eagle3")(checkpoint=str(tmp_path / "eagle3")))
    assert torch.equal(engine.drafter.head.d2t, head.d2t)
    assert engine.drafter.head.target_features == (EMBEDS, 0, 1)
    one = [r for i in range(4) for r in engine.generate(convs[i : i + 1], images[i : i + 1], 24)]
    four = engine.generate(convs, images, 24)
    assert [r.tokens for r in one] == [r.tokens for r in ref]
    assert [r.tokens for r in four] == [r.tokens for r in ref]
    assert [r.accept_lengths for r in four] == [r.accept_lengths for r in one]


def _reference_checkpoint(path: Path, target, state: dict, **extra) -> Path:
    from safetensors.torch import save_file

    config = reference_head_config(
        target,
        architectures=["LlamaForCausalLMEagle3"],
        draft_vocab_size=DRAFT_VOCAB,
        rope_theta=10000.0,
        **extra,
    )
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"))
    return path


def test_reference_checkpoints_load_and_bad_keys_are_named(targets, tmp_path) -> None:
    target = targets["tiny-llava"]
    h = target.model.config.get_text_config().hidden_size
    torch.manual_seed(7)
    # the reference's layout and shapes, written out by hand
    shapes = {
        "fc.weight": (h, 3 * h),
        "midlayer.self_attn.q_proj.weight": (128, 2 * h),
        "midlayer.self_attn.k_proj.weight": (64, 2 * h),
        "midlayer.self_attn.v_proj.weight": (64, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, 128),
        "midlayer.mlp.gate_proj.weight": (384, h),
        "midlayer.mlp.up_proj.weight": (384, h),
        "midlayer.mlp.down_proj.weight": (h, 384),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
        "lm_head.weight": (DRAFT_VOCAB, h),
    }
    state = {k: torch.randn(s) for k, s in shapes.items()}
    used = torch.randperm(1024)[:DRAFT_VOCAB].sort().values
    state["d2t"] = used - torch.arange(DRAFT_VOCAB)
    state["t2d"] = torch.zeros(1024, dtype=torch.bool)
    state["t2d"][used] = True
    state["embed_tokens.weight"] = torch.randn(1024, h)  # the frozen copy: dropped
    ref = _reference_checkpoint(tmp_path / "ref", target, state)
    drafter = get_drafter("eagle3")(checkpoint=str(ref))
    drafter.load(target)
    loaded = drafter.head.state_dict()
    assert set(loaded) == set(state) - {"embed_tokens.weight"}
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k
    assert drafter.head.draft_ids.tolist() == used.tolist()
    # MMSpec's published heads run on its rule, whatever the checkpoint
    assert drafter.head.target_features == (EMBEDS, 0, 1) and drafter.head.zero_image
    # as MMSpec's loader: `model.` / `module.` dropped, `layers.0.` read as `midlayer.`
    prefixed = {
        "module.model." + k.replace("midlayer.", "layers.0."): v
        for k, v in state.items()
        if k != "embed_tokens.weight"
    }
    drafter = get_drafter("eagle3")(
        checkpoint=str(_reference_checkpoint(tmp_path / "prefixed", target, prefixed))
    )
    drafter.load(target)
    assert all(torch.equal(v, state[k]) for k, v in drafter.head.state_dict().items())
    # heads that name their layers (inputs of layers 2, 3, 4 -> outputs of 1, 2, 3)
    named = _reference_checkpoint(
        tmp_path / "named",
        target,
        state,
        eagle_config={"eagle_aux_hidden_state_layer_ids": [2, 3, 4]},
    )
    drafter = get_drafter("eagle3")(checkpoint=str(named))
    drafter.load(target)
    assert drafter.head.target_features == (1, 2, 3) and not drafter.head.zero_image
    renamed = dict(state)
    renamed["midlayer.hidden_norm.w"] = renamed.pop("midlayer.hidden_norm.weight")
    bad = _reference_checkpoint(tmp_path / "bad", target, renamed)
    with pytest.raises(CheckpointError) as err:
        get_drafter("eagle3")(checkpoint=str(bad)).load(target)
    assert "midlayer.hidden_norm.weight" in str(err.value)
    assert "midlayer.hidden_norm.w" in str(err.value)


def test_a_few_training_steps_reduce_the_loss(targets, tmp_path) -> None:
    from mmspec.training.distill import DistillConfig
    from mmspec.training.train_drafter import recipe, train_head

    config = recipe(
        "eagle3",
        "tiny-llava",
        steps=12,
        warmup_steps=2,
        text_steps=0,
        head_args={"ttt_steps": 3, "draft_vocab_size": DRAFT_VOCAB},
        distill=DistillConfig(per_topic=2, max_new_tokens=32),
    )
    head, result = train_head(config, tmp_path, targets["tiny-llava"])
    assert len(result.losses) == 12
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4, result.losses
    assert {"acc", "acc_1", "acc_2", "p_loss_0", "p_loss_2"} <= set(result.metrics[-1])
    # the draft vocabulary was chosen from the data, and travels with the weights
    assert head.vocab_ready and int(head.t2d.sum()) == DRAFT_VOCAB
    assert not torch.equal(head.d2t, torch.zeros_like(head.d2t))
    save_head(head, head.config, tmp_path / "trained")
    drafter = get_drafter("eagle3")(checkpoint=str(tmp_path / "trained"))
    drafter.load(targets["tiny-llava"])
    assert torch.equal(drafter.head.d2t, head.d2t) and drafter.head.vocab_ready
    assert drafter.head.config.extra["ttt_steps"] == 3
