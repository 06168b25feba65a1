"""Medusa: the tree, the drafter's feature bookkeeping, losslessness, reference checkpoints,
and that training lowers the loss. All on the committed tiny zoo models, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmspec.methods.medusa  # noqa: F401 (runs @register("medusa"))
from mmspec.methods.base import DraftContext, StepOutcome
from mmspec.methods.draft_checkpoint import CheckpointError
from mmspec.methods.engine import Engine
from mmspec.methods.head_config import DraftConfig, save_head
from mmspec.methods.medusa import MEDUSA_TREE, Medusa, MedusaHeads, tree_paths
from mmspec.methods.registry import get_drafter
from mmspec.models.feature_taps import FINAL
from mmspec.models.target import Target


@pytest.fixture(scope="module")
def target() -> Target:
    from mmspec.models.loader import load_target

    torch.set_num_threads(1)
    return load_target("tiny-llava", device="cpu")


def _heads(target: Target, seed: int = 0, **extra: int) -> MedusaHeads:
    torch.manual_seed(seed)
    return MedusaHeads(DraftConfig.for_target("medusa", target, **extra))


def _drafter(target: Target, head: MedusaHeads, where: Path, **kwargs: object) -> Medusa:
    save_head(head, head.config, where)
    drafter = get_drafter("medusa")(checkpoint=str(where), **kwargs)
    drafter.load(target)
    return drafter  # type: ignore[return-value]


# ---- the tree ------------------------------------------------------------------------------


def test_default_tree_is_mc_sim_7b_63() -> None:
    paths = tree_paths(MEDUSA_TREE)
    assert len(paths) == 63 and len(set(MEDUSA_TREE)) == 63
    assert max(len(p) for p in paths) == 4 and max(p[-1] for p in paths) == 9
    assert paths == sorted(paths, key=lambda p: (len(p), p))  # parents before children


def test_tree_needs_every_parent() -> None:
    with pytest.raises(ValueError, match="parents"):
        Medusa(tree=[[0], [1, 0]])
    with pytest.raises(ValueError):
        Medusa(tree=[])


def test_drafter_reads_the_right_feature(target: Target, tmp_path: Path) -> None:
    """Each node is head (depth-1)'s ranked token from the feature the bonus came from; rows
    the engine drops are dropped here too."""
    head = _heads(target, num_heads=2)
    drafter = _drafter(target, head, tmp_path, tree=MEDUSA_TREE)
    assert drafter.features == (FINAL,)
    # MEDUSA_TREE cut to the two heads: depth 1 and 2 only
    paths = [p for p in tree_paths(MEDUSA_TREE) if len(p) <= 2]
    h = target.model.config.get_text_config().hidden_size
    prompt = torch.randn(3, 5, h)
    ctx = DraftContext(rows=[0, 1, 2], tokens=[[1, 2]] * 3, prompt_lens=[1, 1, 1])
    ctx.extras["features"] = {FINAL: prompt}
    drafter.begin(ctx)

    def expected(feature: torch.Tensor) -> list[int]:
        with torch.no_grad():
            top = head(feature, 2).topk(10, dim=-1).indices  # (2, V) -> ranks per head
        return [int(top[len(p) - 1, p[-1]]) for p in paths]

    trees = drafter.propose(ctx)
    assert [t.tokens for t in trees] == [expected(prompt[i, -1]) for i in range(3)]
    assert trees[0].parents == [paths.index(p[:-1]) if len(p) > 1 else -1 for p in paths]
    # row 0 accepted nodes 0 then 10 (q-index 11), row 1 nothing (q 0), row 2 node 3 (q 4)
    q_feats = torch.randn(3, 1 + len(paths), h)
    outcome = StepOutcome(trees, [[0, 10], [], [3]], [[5, 6, 7], [8], [9, 1]], q_feats, None)
    outcome.features = {FINAL: q_feats}
    drafter.update(ctx, outcome)
    # the engine then drops row 1
    ctx2 = DraftContext(rows=[0, 2], tokens=[[1, 2]] * 2, prompt_lens=[1, 1])
    trees = drafter.propose(ctx2)
    assert [t.tokens for t in trees] == [expected(q_feats[0, 11]), expected(q_feats[2, 4])]


# ---- lossless through the engine -------------------------------------------------------------


def _suite() -> tuple[list, list]:
    from mmspec.orchestrator.runner import conversation
    from mmspec.workloads import synthetic_suite

    samples = synthetic_suite(per_topic=1, seed=0)
    return [conversation(s, [], True) for s in samples], [s.load_image() for s in samples]


def _generate(engine: Engine, convs: list, images: list, batch: int) -> list:
    out = []
    for i in range(0, len(convs), batch):
        out += engine.generate(convs[i : i + batch], images[i : i + batch], max_new_tokens=40)
    return out


@pytest.mark.parametrize("kind", ["random", "lm_head"])
def test_greedy_medusa_equals_ar(target: Target, tmp_path: Path, kind: str) -> None:
    convs, images = _suite()
    ref = _generate(Engine(target, get_drafter("ar")()), convs, images, 4)
    head = _heads(target)
    if kind == "lm_head":
        # every head = the LM head: it drafts the target's next token again, which is right
        # whenever the target repeats a token, so some drafts get accepted
        head.init_from_target(target.model.get_output_embeddings())
        for h in head.medusa_head:
            torch.nn.init.zeros_(h[0].linear.bias)
    save_head(head, head.config, tmp_path)
    engine = Engine(target, get_drafter("medusa")(checkpoint=str(tmp_path)))
    for batch in (1, 4):
        out = _generate(engine, convs, images, batch)
        assert [r.tokens for r in out] == [r.tokens for r in ref], f"batch {batch}"
        assert all(r.drafted > 0 for r in out if r.steps)
        if kind == "lm_head":
            assert sum(r.accepted for r in out) > 0


# ---- reference checkpoints ---------------------------------------------------------------------


def _v01_state(target: Target, heads: int, layers: int = 1) -> dict[str, torch.Tensor]:
    """Medusa v0.1's medusa_lm_head.pt layout: `{head}.{layer}.linear.*`, `{head}.{L}.weight`."""
    text = target.model.config.get_text_config()
    h, v = text.hidden_size, text.vocab_size
    state = {}
    for i in range(heads):
        for j in range(layers):
            state[f"{i}.{j}.linear.weight"] = torch.randn(h, h).half()
            state[f"{i}.{j}.linear.bias"] = torch.randn(h).half()
        state[f"{i}.{layers}.weight"] = torch.randn(v, h).half()
    return state


def _write(path: Path, config: dict, state: dict[str, torch.Tensor], file: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if file.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path / file))
    else:
        torch.save(state, path / file)
    return path


def _loaded(target: Target, path: Path) -> Medusa:
    drafter = get_drafter("medusa")(checkpoint=str(path))
    drafter.load(target)
    return drafter  # type: ignore[return-value]


def test_reference_v01_checkpoint_loads(target: Target, tmp_path: Path) -> None:
    state = _v01_state(target, heads=2)
    config = {"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "x"}
    drafter = _loaded(target, _write(tmp_path, config, state, "medusa_lm_head.pt"))
    head = drafter.head
    assert head.num_heads == 2 and head.config.extra == {"num_heads": 2, "num_layers": 1}
    for k, v in state.items():
        i, rest = k.split(".", 1)
        got = head.medusa_head[int(i)].get_parameter(rest)
        assert torch.equal(got.detach().to(v.dtype), v), k
    assert drafter.paths == [p for p in tree_paths(MEDUSA_TREE) if len(p) <= 2]
    assert len(drafter.parents) == len(drafter.paths)
    assert head.initialised  # loaded weights are never overwritten by the LM head


def test_reference_prefixed_checkpoint_loads(target: Target, tmp_path: Path) -> None:
    text = target.model.config.get_text_config()
    state = {f"medusa_head.{k}": v for k, v in _v01_state(target, heads=3).items()}
    # a full model repo also holds the base model, which the drafter does not take
    state["lm_head.weight"] = torch.randn(text.vocab_size, text.hidden_size)
    state["model.norm.weight"] = torch.ones(text.hidden_size)
    config = {
        "medusa_num_heads": 3,
        "medusa_num_layers": 1,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
    }
    drafter = _loaded(target, _write(tmp_path, config, state, "model.safetensors"))
    assert torch.equal(
        drafter.head.medusa_head[2][1].weight.detach(), state["medusa_head.2.1.weight"]
    )


def test_reference_checkpoint_errors_name_the_key(target: Target, tmp_path: Path) -> None:
    config = {"medusa_num_heads": 2, "medusa_num_layers": 1}
    state = _v01_state(target, heads=2)
    state["1.0.lin.weight"] = state.pop("1.0.linear.weight")
    with pytest.raises(CheckpointError) as err:
        _loaded(target, _write(tmp_path / "renamed", config, state, "medusa_lm_head.pt"))
    assert "medusa_head.1.0.linear.weight" in str(err.value)  # missing
    assert "medusa_head.1.0.lin.weight" in str(err.value)  # unexpected
    # a head made for another vocabulary
    state = _v01_state(target, heads=2)
    state = {k: v[:-1] if k.endswith(".1.weight") else v for k, v in state.items()}
    with pytest.raises(CheckpointError, match="vocab"):
        _loaded(target, _write(tmp_path / "vocab", config, state, "medusa_lm_head.pt"))
    with pytest.raises(CheckpointError, match="medusa_num_heads"):
        _loaded(target, _write(tmp_path / "noheads", {}, state, "medusa_lm_head.pt"))


# ---- training -------------------------------------------------------------------------------


def test_fresh_heads_start_from_the_lm_head(target: Target) -> None:
    head = _heads(target, num_heads=2)
    assert head.config.extra == {"num_heads": 2, "num_layers": 1}
    assert not head.initialised
    lm_head = target.model.get_output_embeddings()
    head.init_from_target(lm_head)
    assert all(torch.equal(h[-1].weight, lm_head.weight) for h in head.medusa_head)
    assert all(not h[0].linear.weight.any() for h in head.medusa_head)  # zero-initialised


def test_training_lowers_the_loss(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmspec.training.distill import DistillConfig
    from mmspec.training.train_drafter import recipe, train_head

    monkeypatch.setenv("MMSPEC_HOME", str(tmp_path))
    config = recipe(
        "medusa",
        "tiny-llava",
        steps=12,
        lr=3e-3,
        warmup_steps=2,
        distill=DistillConfig(per_topic=2, max_new_tokens=32),
    )
    head, result = train_head(config, home=tmp_path, target=target)
    assert isinstance(head, MedusaHeads) and head.initialised
    losses = result.losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all("acc" in m and "loss_0" in m for m in result.metrics)
    # what the trainer saves loads back into the drafter and drafts full trees
    save_head(head, head.config, tmp_path / "head")
    drafter = _loaded(target, tmp_path / "head")
    assert len(drafter.parents) == len(MEDUSA_TREE)
