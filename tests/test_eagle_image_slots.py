"""What the EAGLE-1/2 head reads at the prompt's image slots (methods/eagle.py,
methods/head_image_slots.py): MMSpec's rule per target family for new heads, the image
features for heads saved before, the same in drafting and in training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmspec.methods.eagle import EagleHead
from mmspec.methods.engine import Engine
from mmspec.methods.head_config import DraftConfig, save_head
from mmspec.methods.head_image_slots import ImageSlotHead
from mmspec.methods.head_training import TeacherBatch
from mmspec.methods.registry import get_drafter
from mmspec.models.feature_taps import EMBEDS, FINAL
from tests.conftest import reference_head_config, target_view

MODELS = ["tiny-llava", "tiny-qwen2.5-vl"]
ZOO = Path(__file__).resolve().parents[1] / "models/zoo/drafters"


def _head(target, rule: str, seed: int = 0) -> EagleHead:
    """An untrained EAGLE head: "mmspec" as the trainer builds new ones, "features" with a
    config of before the rule (no image_slot_token)."""
    torch.manual_seed(seed)
    if rule == "mmspec":
        return EagleHead(EagleHead.draft_config("eagle", target)).eval()
    return EagleHead(DraftConfig.for_target("eagle", target)).eval()


def _mmspec_head_embeds(target, prompt) -> torch.Tensor:
    """(P, h) what MMSpec's EAGLE head embeds for the prompt's tokens, written from its code
    (method/eagle/spec_model.py, cnets.py `topK_genrate`): on Qwen2.5-VL the inputs_embeds
    the target was fed (image features at image slots); on LLaVA-1.5 it gets none and runs
    its copy of the target's table over the prompt's ids."""
    ids = prompt.input_ids
    table = target.model.get_input_embeddings()
    if target.family == "llava":
        return table(ids)[0]
    with torch.inference_mode():
        out = target.model(**prompt.inputs, output_hidden_states=True)
    return out.hidden_states[0][0]


def _first_fc_input(head) -> tuple[dict, object]:
    """Records the first input of head.fc: cat(token embeddings, features) of a prompt."""
    seen: dict = {}

    def hook(module, args):
        seen.setdefault("x", args[0].detach().clone())

    return seen, head.fc.register_forward_pre_hook(hook)


def test_new_heads_take_mmspecs_rule_per_target_family(tiny_targets) -> None:
    llava, qwen = tiny_targets["tiny-llava"], tiny_targets["tiny-qwen2.5-vl"]
    image_id = llava.image_token_id
    assert image_id not in (0, llava.tokenizer.pad_token_id)  # no default could pass below
    head = EagleHead(EagleHead.draft_config("eagle", llava))
    assert head.slot_token == image_id and not head.zero_image
    assert json.loads(head.config.to_json())["extra"] == {"image_slot_token": image_id}
    # Qwen2.5-VL: the image features, recorded as such
    head = EagleHead(EagleHead.draft_config("eagle", qwen))
    assert head.slot_token is None
    assert json.loads(head.config.to_json())["extra"] == {"image_slot_token": None}
    # a head that names its rule keeps it
    head = EagleHead(EagleHead.draft_config("eagle", llava, image_slot_token=None))
    assert head.slot_token is None
    # ViSpec and MSD read image slots their own way: no rule recorded for them
    for method in ("vispec", "msd"):
        head_cls = get_drafter(method).head_cls
        assert "image_slot_token" not in head_cls.draft_config(method, llava).extra


def test_a_head_saved_before_the_rule_reads_the_features(tiny_targets, tmp_path) -> None:
    target = tiny_targets["tiny-llava"]
    old = _head(target, "features")
    save_head(old, old.config, tmp_path / "old")
    assert "image_slot_token" not in json.loads((tmp_path / "old/config.json").read_text())["extra"]
    drafter = get_drafter("eagle2")(checkpoint=str(tmp_path / "old"))
    drafter.load(target)
    assert drafter.head.slot_token is None


def test_the_zoo_heads_follow_mmspecs_rule(tiny_targets) -> None:
    """The tiny LLaVA head was retrained with the `<image>` embedding at image slots; the
    Qwen head was trained on the image features, which is MMSpec's rule there."""
    for model, want in (
        ("tiny-llava", tiny_targets["tiny-llava"].image_token_id),
        ("tiny-qwen2.5-vl", None),
    ):
        extra = json.loads((ZOO / model / "eagle/config.json").read_text())["extra"]
        assert extra.get("image_slot_token") == want, model
        assert not extra.get("zero_image_positions", False)


def test_the_slot_embedding_is_the_targets_row_and_never_saved(tiny_targets) -> None:
    target = tiny_targets["tiny-llava"]
    head = _head(target, "mmspec")
    embed = target.model.get_input_embeddings()
    head.bind_embeddings(embed)
    assert torch.equal(head.slot_embed, embed.weight[target.image_token_id])
    assert "slot_embed" not in head.state_dict()
    embeds, image = torch.randn(5, head.config.hidden_size), torch.tensor([0, 1, 1, 0, 0]).bool()
    out = head.token_embeddings(embeds, image)
    assert torch.equal(out[~image], embeds[~image])
    assert torch.equal(out[image], head.slot_embed.expand(2, -1))
    assert torch.equal(_head(target, "features").token_embeddings(embeds, image), embeds)
    assert isinstance(head, ImageSlotHead)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rule", ["mmspec", "features"])
def test_the_head_reads_mmspecs_embeddings_drafting_and_training(
    tiny_targets, head_samples, tmp_path, model, rule
) -> None:
    """Under MMSpec's rule the head's fc reads, beside the target's final features, the
    embeddings MMSpec's head computes for the prompt (LLaVA: the `<image>` text embedding at
    image slots; Qwen: the image features); a head of before reads the image features on
    both. Drafting and training alike."""
    target = tiny_targets[model]
    convs, images = head_samples
    prompt, hs, logits, slots = target_view(target, convs[0], images[0])
    feats = {EMBEDS: hs[0], FINAL: hs[-1]}
    n = prompt.input_ids.shape[1]
    h = target.model.config.get_text_config().hidden_size
    # embeddings of tokens 1..n-1, position t's pair
    mmspec = rule == "mmspec"
    want = (_mmspec_head_embeds(target, prompt) if mmspec else feats[EMBEDS][0])[1:]
    # the two rules differ exactly where LLaVA's image slots are
    differs = not torch.allclose(want, feats[EMBEDS][0, 1:], atol=1e-5)
    assert differs == (model == "tiny-llava" and rule == "mmspec")
    head = _head(target, rule)

    save_head(head, head.config, tmp_path / "eagle")
    engine = Engine(target, get_drafter("eagle")(checkpoint=str(tmp_path / "eagle")))
    seen, hook = _first_fc_input(engine.drafter.head)
    engine.generate(convs[:1], images[:1], 4)
    hook.remove()
    # tokens 1..n-1 of the prompt, then the first generated token
    assert torch.allclose(seen["x"][: n - 1, :h], want, atol=1e-5)
    assert torch.allclose(seen["x"][:, h:], feats[FINAL][0], atol=1e-5)

    real = prompt.attention_mask.bool()
    batch = TeacherBatch(
        input_ids=prompt.input_ids,
        real=real,
        answer=real,
        image=slots,
        features=feats,
        logits=logits,
    )
    trained = _head(target, rule)
    seen, hook = _first_fc_input(trained)
    trained.train_loss(
        batch, target.model.get_input_embeddings(), target.model.get_output_embeddings()
    )
    hook.remove()
    assert torch.allclose(seen["x"][:, :h], want, atol=1e-5)
    assert torch.allclose(seen["x"][:, h:], feats[FINAL][0, :-1], atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_reference_checkpoints_read_mmspecs_rule(tiny_targets, tmp_path, model) -> None:
    """A published EAGLE head runs as MMSpec runs it on that target."""
    from safetensors.torch import save_file

    target = tiny_targets[model]
    head = _head(target, "features")
    ref = tmp_path / "ref"
    ref.mkdir()
    qkv_bias = head.config.block == "qwen2"  # how a reference config says so
    (ref / "config.json").write_text(json.dumps(reference_head_config(target, qkv_bias=qkv_bias)))
    save_file(head.state_dict(), str(ref / "model.safetensors"))
    drafter = get_drafter("eagle")(checkpoint=str(ref))
    drafter.load(target)
    want = target.image_token_id if model == "tiny-llava" else None
    assert drafter.head.slot_token == want
