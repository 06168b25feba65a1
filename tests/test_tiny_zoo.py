"""The tiny model zoo: training plumbing on the untrained build, and the committed weights.

CI never retrains: the smoke test runs a few optimizer steps on the untrained init, and the
committed checkpoints are only loaded and spot-checked.
"""

from __future__ import annotations

import pytest
import torch

from mmspec.models.loader import load_target
from mmspec.models.tiny import BUILDERS, tiny_init_path, tiny_model_path
from mmspec.models.zoo_paths import ZOO_DIR
from mmspec.orchestrator.runner import conversation
from mmspec.training.encoding import GROUNDED, NO_LOSS, Encoder, training_messages
from mmspec.training.evaluation import eval_accuracy
from mmspec.training.tiny_config import TrainConfig
from mmspec.training.train_loop import train
from mmspec.workloads.synthetic import synthetic_items

MODELS = sorted(BUILDERS)
ZOO_LIMIT_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module", params=MODELS)
def init_target(request: pytest.FixtureRequest):
    return load_target(str(tiny_init_path(request.param)), device="cpu")


def test_training_messages_match_the_runner() -> None:
    """Training chats have the layout the runner builds at inference, answers included."""
    (item,) = synthetic_items(1, 0, ["multi-turn conversation"], "train")
    turns, refs = item.scene.turns, item.scene.references
    for t in range(len(turns)):
        prompt = training_messages(turns[: t + 1], refs[:t])
        assert prompt == conversation(item.sample, list(refs[:t]), True)
        assert training_messages(turns[: t + 1], refs[: t + 1])[:-1] == prompt


def test_loss_mask_covers_exactly_the_answers(init_target) -> None:
    encoder = Encoder(init_target)
    tok = init_target.tokenizer
    for item in synthetic_items(1, 3, None, "train"):
        example = encoder.encode(item.scene, item.sample.load_image())
        answer_ids = [i for i, k in zip(example.input_ids, example.kinds) if k != NO_LOSS]
        text = tok.decode(answer_ids)
        eos = tok.convert_ids_to_tokens(sorted(init_target.eos_token_ids))[0]
        assert [a.strip() for a in text.split(eos)[:-1]] == list(item.scene.references)


def test_grounded_tokens_are_the_facts_read_off_the_picture(init_target) -> None:
    encoder = Encoder(init_target)
    tok = init_target.tokenizer
    for item in synthetic_items(4, 2, ["general vqa", "text vqa"], "train"):
        example = encoder.encode(item.scene, item.sample.load_image())
        grounded = [
            tok.decode([i]).strip()
            for i, k in zip(example.input_ids, example.kinds)
            if k == GROUNDED
        ]
        start, end = item.scene.grounded[0][0]
        fact = item.scene.references[0][start:end]
        # a number: each digit; a word or colour: the one token it is
        assert grounded[0] == (fact[0] if fact.isdigit() else fact), (grounded, fact)


def test_training_prompt_is_the_inference_prompt(init_target) -> None:
    """The tokens before the first answer equal what the target encodes for generation."""
    encoder = Encoder(init_target)
    for item in synthetic_items(1, 1, ["general vqa", "text vqa"], "train"):
        example = encoder.encode(item.scene, item.sample.load_image())
        prompt = init_target.encode(
            [training_messages(item.scene.turns[:1], [])], [item.sample.load_image()]
        )
        ids = prompt.input_ids[0].tolist()
        assert example.input_ids[: len(ids)] == ids
        assert not any(example.kinds[: len(ids)]) and example.kinds[len(ids)] != NO_LOSS


@pytest.mark.parametrize("where", [tiny_init_path, tiny_model_path])
def test_tiny_qwen_text_rope_tells_image_columns_apart(where) -> None:
    """Qwen2.5-VL hands image columns to the language model only through the slowest rotary
    pairs (mrope's w section). At head_dim 32 and the usual theta they barely turn, and the
    trained model could not say which colour sits left or right (benchmarks/RESULTS.md)."""
    target = load_target(str(where("tiny-qwen2.5-vl")), device="cpu")
    rotary = target.model.model.language_model.rotary_emb
    # one token per cell column (merged-token columns 0 and 2), same time step and row
    positions = torch.tensor([[[5, 5]], [[5, 5]], [[5, 7]]])
    cos, sin = rotary(torch.zeros(1, 2, 1), positions)
    turn = (torch.atan2(sin[0, 1], cos[0, 1]) - torch.atan2(sin[0, 0], cos[0, 0])).abs()
    turn = torch.minimum(turn, 2 * torch.pi - turn)
    assert turn.max() >= 0.5, turn


@pytest.mark.parametrize("model", MODELS)
def test_a_few_training_steps_reduce_the_loss(model: str) -> None:
    config = TrainConfig(
        model,
        steps=8,
        token_budget=1024,
        pool_batches=2,
        warmup_steps=2,
        lr=3e-3,
        eval_per_topic=0,
    )
    _, result = train(config)
    assert len(result.losses) == 8
    assert sum(result.losses[-2:]) / 2 < result.losses[0] - 0.5, result.losses


def test_training_is_deterministic() -> None:
    """The same config gives the same weights: what lets a newcomer retrain the zoo exactly."""
    config = TrainConfig(
        "tiny-llava", steps=3, token_budget=512, pool_batches=2, warmup_steps=1, eval_per_topic=0
    )
    first, _ = train(config)
    second, _ = train(config)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the committed zoo --------------------------------------------------------------------------


def test_zoo_is_committed_and_small() -> None:
    total = 0
    for name in MODELS:
        path = tiny_model_path(name)
        assert path == ZOO_DIR / name
        for required in ("config.json", "model.safetensors", "tokenizer.json", "TRAINING.md"):
            assert (path / required).is_file(), (name, required)
        total += sum(f.stat().st_size for f in path.iterdir())
    assert total <= ZOO_LIMIT_BYTES


def test_unknown_tiny_model() -> None:
    with pytest.raises(KeyError, match="known"):
        tiny_model_path("tiny-nope")


@pytest.mark.parametrize("model", MODELS)
def test_zoo_model_reads_the_image(model: str) -> None:
    """Spot check: held-out short answers come out right (the benchmark measures it fully)."""
    target = load_target(model, device="cpu")
    accuracy = eval_accuracy(target, per_topic=8)
    assert accuracy["all"] >= 0.7, accuracy


def test_roc_auc_is_the_pairwise_win_rate() -> None:
    import random

    from mmspec.training.grounding import roc_auc

    rng = random.Random(0)
    pos = [rng.choice([0.1, 0.2, 0.3, 0.5]) for _ in range(40)]
    neg = [rng.choice([0.0, 0.1, 0.2, 0.4]) for _ in range(55)]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert roc_auc(pos, neg) == pytest.approx(wins / (len(pos) * len(neg)))
    assert roc_auc([1.0], [0.0]) == 1.0 and roc_auc([0.0], [1.0]) == 0.0
    with pytest.raises(ValueError):
        roc_auc([], [0.1])
