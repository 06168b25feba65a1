"""MSD (methods/msd.py): each rule of MMSpec's `method/msd` (commit fd33670) pinned without the
reference - the layer per target family, what the head reads at image slots, the tree and its
positions; benchmarks/parity runs the reference itself (README there, `msd` rows)."""

from __future__ import annotations

import json

import pytest
import torch

from mmspec.methods.draft_checkpoint import CheckpointError
from mmspec.methods.engine import Engine
from mmspec.methods.head_config import DraftConfig, save_head
from mmspec.methods.head_training import TeacherBatch
from mmspec.methods.msd import MSD, MSDHead
from mmspec.methods.registry import get_drafter
from mmspec.models.feature_taps import EMBEDS, FINAL
from mmspec.orchestrator.runner import conversation
from mmspec.workloads import synthetic_suite
from tests.conftest import reference_head_config, target_view

MODELS = ["tiny-llava", "tiny-qwen2.5-vl"]


def _random_head(target, seed: int = 0, **extra) -> MSDHead:
    torch.manual_seed(seed)
    return MSDHead(DraftConfig.for_target("msd", target, **extra)).eval()


def _drafter(target, tmp_path, seed: int = 0, **args) -> MSD:
    head = _random_head(target, seed)
    save_head(head, head.config, tmp_path / f"msd-{seed}")
    return get_drafter("msd")(checkpoint=str(tmp_path / f"msd-{seed}"), **args)


# ---- the layer --------------------------------------------------------------------------------


def test_the_layer_is_mmspecs_for_the_target_family(tiny_targets) -> None:
    """MMSpec builds a Qwen2-VL layer on Qwen (input norm, q/k/v biases) and EAGLE's first
    LLaMA layer on LLaVA (no input norm); config.json records the choice."""
    for model, norm in (("tiny-qwen2.5-vl", True), ("tiny-llava", False)):
        head = _random_head(tiny_targets[model])
        keys = set(head.state_dict())
        assert json.loads(head.config.to_json())["extra"]["input_norm"] is norm, model
        assert ("layers.0.input_layernorm.weight" in keys) is norm, model
        assert ("layers.0.self_attn.q_proj.bias" in keys) is norm, model  # Qwen2 blocks only
    x = torch.randn(1, 3, head.config.hidden_size)
    assert torch.equal(head.layers[0].input_layernorm(x), x)  # LLaVA: the fc output as it is


def test_a_head_saved_with_an_input_norm_keeps_it(tiny_targets, tmp_path) -> None:
    """The MSD repository's LLaVA form (and the zoo's LLaVA head before MMSpec's rule) has
    an input norm: a config that says so loads with it, and the norm is applied."""
    target = tiny_targets["tiny-llava"]
    head = _random_head(target, input_norm=True)
    with torch.no_grad():
        head.layers[0].input_layernorm.weight.mul_(3.0)
    save_head(head, head.config, tmp_path / "old")
    drafter = get_drafter("msd")(checkpoint=str(tmp_path / "old"))
    drafter.load(target)
    norm = drafter.head.layers[0].input_layernorm
    assert torch.equal(norm.weight, head.layers[0].input_layernorm.weight)
    x = torch.randn(1, 3, head.config.hidden_size)
    assert not torch.allclose(norm(x), x)


@pytest.mark.parametrize("model", MODELS)
def test_reference_checkpoints_load_in_mmspecs_form(tiny_targets, tmp_path, model) -> None:
    """MMSpec's MSD checkpoints (its Model's keys plus the embedding copy, a config of its
    model_type: Qwen2-VL's or llava) load with the layer they hold; a missing tensor is
    named."""
    from safetensors.torch import save_file

    target = tiny_targets[model]
    head = _random_head(target, seed=4)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["embed_tokens.weight"] = target.model.get_input_embeddings().weight.detach().clone()
    ref = tmp_path / "ref"
    ref.mkdir()
    kind = "qwen2_vl" if model == "tiny-qwen2.5-vl" else "llava"
    (ref / "config.json").write_text(json.dumps(reference_head_config(target, model_type=kind)))
    save_file(state, str(ref / "model.safetensors"))
    drafter = get_drafter("msd")(checkpoint=str(ref))
    drafter.load(target)
    assert drafter.head.config.extra["input_norm"] is (model == "tiny-qwen2.5-vl")
    for k, v in head.state_dict().items():
        assert torch.equal(drafter.head.state_dict()[k], v), k
    del state["fc.weight"]
    save_file(state, str(ref / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"fc\.weight"):
        get_drafter("msd")(checkpoint=str(ref)).load(target)


# ---- what the head reads ----------------------------------------------------------------------


def _first_layer_input(head) -> tuple[dict, object]:
    seen: dict = {}

    def hook(module, args):
        seen.setdefault("x", args[0].detach().clone())

    # the layer's first module reads its input (the head calls the layer through run_layer)
    return seen, head.layers[0].input_layernorm.register_forward_pre_hook(hook)


@pytest.mark.parametrize("model", MODELS)
def test_image_positions_read_the_visual_token_itself(
    tiny_targets, head_samples, tmp_path, model
) -> None:
    """Position t reads fc(cat(embedding of token t+1, final feature t)), except where token
    t+1 is an image slot: there the projected image feature itself, no fc (MMSpec overwrites
    the fc output with it); drafting and training alike."""
    target = tiny_targets[model]
    convs, images = head_samples
    prompt, hs, logits, image = target_view(target, convs[0], images[0])
    embeds, final = hs[0], hs[-1]
    head = _random_head(target)
    nxt = image[0, 1:]
    with torch.no_grad():
        fused = head.fc(torch.cat([embeds[0, 1:], final[0, :-1]], dim=-1))
    want = torch.where(nxt[:, None], embeds[0, 1:], fused)
    assert not torch.allclose(want[nxt], fused[nxt])

    save_head(head, head.config, tmp_path / "msd")
    engine = Engine(target, get_drafter("msd")(checkpoint=str(tmp_path / "msd")))
    seen, hook = _first_layer_input(engine.drafter.head)
    engine.generate(convs[:1], images[:1], 3)
    hook.remove()
    assert torch.allclose(seen["x"][0, :-1], want, atol=1e-5)  # the last: the pending token

    real = prompt.attention_mask.bool()
    batch = TeacherBatch(
        input_ids=prompt.input_ids,
        real=real,
        answer=real,
        image=image,
        features={EMBEDS: embeds, FINAL: final},
        logits=logits,
    )
    trained = _random_head(target)
    seen, hook = _first_layer_input(trained)
    model = target.model
    trained.train_loss(batch, model.get_input_embeddings(), model.get_output_embeddings())
    hook.remove()
    assert torch.allclose(seen["x"][0], want, atol=1e-5)


# ---- the tree ---------------------------------------------------------------------------------


def test_the_defaults_are_mmspecs_script() -> None:
    drafter = MSD()
    assert (drafter.depth, drafter.top_k, drafter.total_token) == (5, 10, 59)
    assert drafter.tree_positions == "mmspec"
    with pytest.raises(ValueError, match="tree_positions"):
        MSD(tree_positions="paper")


def test_a_tree_holds_total_token_minus_the_root(tiny_targets, head_samples, tmp_path) -> None:
    """EAGLE-2's dynamic tree without a threshold: 58 drafted nodes (59 with the root), depth
    5 expansions after the root's children, so paths of at most 6 drafts (the zoo's trained
    head: its confident drafts reach that deep)."""
    target = tiny_targets["tiny-qwen2.5-vl"]
    drafter = get_drafter("msd")()
    trees: list = []
    engine = Engine(target, drafter)
    propose = drafter.propose

    def record(ctx):
        out = propose(ctx)
        trees.extend(out)
        return out

    drafter.propose = record
    engine.generate(*[x[:1] for x in head_samples], 4)
    assert trees and all(len(t) == 58 for t in trees)
    deepest = [max(_depths(t)) for t in trees]
    assert max(deepest) == 6, deepest


def _depths(tree) -> list[int]:
    depth: list[int] = []
    for p in tree.parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    return depth


def _level_positions(target, tmp_path, convs, images, **args) -> list[list[int]]:
    """Per row, the positions the head's first tree level is fed at, counted from the
    pending token's (the last prompt position the head reads)."""
    engine = Engine(target, _drafter(target, tmp_path, **args))
    calls: list[torch.Tensor] = []
    block = engine.drafter.head.block

    def record(x, positions, mask, cache):
        calls.append(positions.clone())
        return block(x, positions, mask, cache)

    engine.drafter.head.block = record
    engine.generate(convs, images, 2)
    # calls[0]: the prompt (positions 0..n-1 per row), calls[1]: the root's children
    lens = target.encode(convs, images).attention_mask.sum(dim=1)
    return (calls[1] - (lens[:, None] - 1)).tolist()


def test_llava_trees_sit_one_position_past_the_sequence(
    tiny_targets, head_samples, tmp_path
) -> None:
    """MMSpec's LLaVA path counts the image block one position too many when it places its
    tree: a prompt with image slots drafts level 1 two positions past the pending token, one
    without an image (and every Qwen prompt) right after it; `tree_positions: sequence`
    places every tree right after the sequence."""
    convs, images = head_samples
    plain = conversation(synthetic_suite(per_topic=1, seed=5)[0], [], has_image=False)
    llava, qwen = tiny_targets["tiny-llava"], tiny_targets["tiny-qwen2.5-vl"]
    with_image = _level_positions(llava, tmp_path, [convs[0], plain], [images[0], None])
    assert [set(row) for row in with_image] == [{2}, {1}]
    assert _level_positions(qwen, tmp_path, convs[:2], images[:2]) == [[1] * 10] * 2
    seq = _level_positions(llava, tmp_path, convs[:2], images[:2], tree_positions="sequence")
    assert seq == [[1] * 10] * 2


@pytest.mark.parametrize("tree_positions", ["mmspec", "sequence"])
def test_ragged_llava_batches_stay_lossless(tiny_targets, head_samples, tree_positions) -> None:
    """Rows with and without an image (gaps 1 and 0) in one batch, rows finishing apart."""
    target = tiny_targets["tiny-llava"]
    convs, images = head_samples
    plain = conversation(synthetic_suite(per_topic=1, seed=5)[0], [], has_image=False)
    batch_convs, batch_images = [convs[1], plain, convs[2]], [images[1], None, images[2]]
    greedy = Engine(target, get_drafter("ar")()).generate(batch_convs, batch_images, 24)
    drafter = get_drafter("msd")(tree_positions=tree_positions)  # the zoo's head: it drafts
    got = Engine(target, drafter).generate(batch_convs, batch_images, 24)
    assert [g.tokens for g in got] == [g.tokens for g in greedy]
    assert sum(g.accepted for g in got) > 0
    assert len({len(g.tokens) for g in got}) > 1  # a row left early: the gaps were re-indexed
