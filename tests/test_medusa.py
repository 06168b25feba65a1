"""Medusa: MMSpec's beam over the heads (default) and the paper's static tree, both head
forms, the drafter's feature bookkeeping, losslessness, reference checkpoints (the paper's
and MMSpec's layouts) and training. All on the committed tiny zoo models, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmspec.methods.medusa  # noqa: F401 (runs @register("medusa"))
from mmspec.methods.base import DraftContext, StepOutcome
from mmspec.methods.draft_checkpoint import CheckpointError
from mmspec.methods.engine import Engine
from mmspec.methods.head_config import DraftConfig, save_head
from mmspec.methods.head_training import TeacherBatch
from mmspec.methods.medusa import MEDUSA_TREE, Medusa, MedusaHeads, beam_trees, tree_paths
from mmspec.methods.registry import get_drafter
from mmspec.methods.tree import DraftTree
from mmspec.models.feature_taps import FINAL
from mmspec.models.target import Target


@pytest.fixture(scope="module")
def target() -> Target:
    from mmspec.models.loader import load_target

    torch.set_num_threads(1)
    return load_target("tiny-llava", device="cpu")


def _heads(target: Target, seed: int = 0, **extra: object) -> MedusaHeads:
    torch.manual_seed(seed)
    return MedusaHeads(DraftConfig.for_target("medusa", target, **extra))


def _drafter(target: Target, head: MedusaHeads, where: Path, **kwargs: object) -> Medusa:
    save_head(head, head.config, where)
    drafter = get_drafter("medusa")(checkpoint=str(where), **kwargs)
    drafter.load(target)
    return drafter  # type: ignore[return-value]


def _paths(tree: DraftTree) -> list[tuple[int, ...]]:
    """Each node as the tokens from the root down to it."""
    out: list[tuple[int, ...]] = []
    for i, t in enumerate(tree.tokens):
        p = tree.parents[i]
        out.append((*out[p], t) if p >= 0 else (t,))
    return out


# ---- defaults and options ------------------------------------------------------------------


def test_defaults_are_mmspecs(target: Target) -> None:
    """MMSpec method/medusa/cnets_medusa.py `Model.__init__`: medusa_num_heads = 3 heads of
    medusa_num_layers = 1 ResBlock, no vocabulary projection of their own (the target's
    lm_head is passed to `topK_genrate`); scripts/*/eval_medusa_mmspec.sh: top_k 8,
    total_token 30."""
    drafter = Medusa()
    assert drafter.tree is None and drafter.top_k == 8 and drafter.total_token == 30
    head = _heads(target)
    assert head.config.extra == {"num_heads": 3, "num_layers": 1, "projection": "target"}
    # the reference's key names, and nothing V-wide
    assert sorted(head.state_dict()) == sorted(
        f"medusa_head.{k}.0.linear.{p}" for k in range(3) for p in ("weight", "bias")
    )
    assert all(not h[0].linear.weight.any() for h in head.medusa_head)  # zero-initialised
    h = torch.randn(2, head.config.hidden_size)
    lm_head = target.model.get_output_embeddings()
    with torch.no_grad():
        want = torch.stack([lm_head(block(h)) for block in head.medusa_head])
        assert torch.allclose(head(h, lm_head), want, atol=1e-5)
    with pytest.raises(ValueError, match="LM head"):
        head(h)


def test_the_training_recipe_trains_mmspecs_form() -> None:
    """MMSpec train/main_medusa.py trains cnets_medusa.Model (3 heads, 1 block) with uniform
    feature noise (train_config data_noise)."""
    from mmspec.training.train_drafter import HeadTrainConfig, recipe

    config = recipe("medusa", "tiny-llava")
    assert config.head_args == {"num_heads": 3, "num_layers": 1, "projection": "target"}
    assert config.noise == HeadTrainConfig.noise > 0


def test_options_are_checked(target: Target) -> None:
    """The paper's form stays an option: FasterDecoding medusa_model.py heads with their own
    projection, medusa_choices.py trees; bad values name the option."""
    assert Medusa(tree="static").tree == tree_paths(MEDUSA_TREE)
    assert Medusa(tree=[[0], [0, 1]]).tree == [(0,), (0, 1)]
    for bad, name in [
        ({"tree": "dynamic"}, "tree"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"total_token": 1}, "total_token"),
        ({"total_token": 2.5}, "total_token"),
    ]:
        with pytest.raises(ValueError, match=f"medusa {name}"):
            Medusa(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="projection"):
        _heads(target, projection="shared")
    with pytest.raises(ValueError, match="num_layers >= 1"):
        _heads(target, num_layers=0)  # the target's LM head alone is no head
    own = _heads(target, num_heads=4, projection="own", num_layers=0)
    assert own.num_heads == 4 and not own.initialised
    assert own.medusa_head[0][-1] is not own.medusa_head[1][-1]  # a projection per head


def test_a_config_from_before_projections_reads_as_own(target: Target) -> None:
    """Our config.json files written before `projection` existed (num_heads, num_layers only)
    hold the paper's form, each head with its own projection."""
    head = _heads(target, num_heads=4, num_layers=1)
    assert head.projection == "own" and head.config.extra["projection"] == "own"
    assert "medusa_head.3.1.weight" in head.state_dict()


# ---- the static tree (option) ----------------------------------------------------------------


def test_static_tree_is_mc_sim_7b_63() -> None:
    """FasterDecoding/Medusa medusa/model/medusa_choices.py `mc_sim_7b_63`."""
    paths = tree_paths(MEDUSA_TREE)
    assert len(paths) == 63 and len(set(MEDUSA_TREE)) == 63
    assert max(len(p) for p in paths) == 4 and max(p[-1] for p in paths) == 9
    assert paths == sorted(paths, key=lambda p: (len(p), p))  # parents before children


def test_tree_needs_every_parent() -> None:
    """FasterDecoding medusa/model/utils.py `generate_medusa_buffers` expects every prefix."""
    with pytest.raises(ValueError, match="parents"):
        Medusa(tree=[[0], [1, 0]])
    with pytest.raises(ValueError):
        Medusa(tree=[])


# ---- the beam (default) ------------------------------------------------------------------------


def _crafted() -> torch.Tensor:
    """Three heads' log-probs over 5 tokens for one row (others far below)."""
    logp = torch.full((3, 1, 5), -9.0)
    logp[0, 0, 3], logp[0, 0, 1] = -0.1, -1.0
    logp[1, 0, 0], logp[1, 0, 4] = -0.2, -0.5
    logp[2, 0, 2], logp[2, 0, 1] = -0.3, -0.4
    return logp


def test_beam_on_crafted_log_probs() -> None:
    """MMSpec method/medusa/cnets_medusa.py `Model.topK_genrate`, by hand, top_k 2:

    level 1 (head 0): 3 (-0.1), 1 (-1.0)
    level 2 (head 1 under both): 3>0 (-0.3), 3>4 (-0.6), 1>0 (-1.2), 1>4 (-1.5);
        frontier = the 2 best: 3>0, 3>4
    level 3 (head 2 under the frontier): 3>0>2 (-0.6), 3>0>1 (-0.7), 3>4>2 (-0.9), 3>4>1 (-1.0)
    the total_token - 1 best of all: with 6, five nodes - the root's second child 1 (-1.0)
    loses to deeper nodes; 1>0 is never expanded even with room for everything.
    """
    (tree,) = beam_trees(_crafted(), top_k=2, total_token=6)
    assert tree.tokens == [3, 0, 4, 2, 1] and tree.parents == [-1, 0, 0, 1, 1]
    (tree,) = beam_trees(_crafted(), top_k=2, total_token=9)
    assert sorted(_paths(tree)) == sorted(
        [(3,), (1,), (3, 0), (3, 4), (3, 0, 2), (3, 0, 1), (3, 4, 2), (3, 4, 1)]
    )
    # room for every candidate: 2 + 4 + 4, and nothing below 1>0 or 1>4
    (tree,) = beam_trees(_crafted(), top_k=2, total_token=100)
    assert len(tree) == 10 and all(len(p) < 3 or p[0] == 3 for p in _paths(tree))


def test_beam_rows_and_sizes() -> None:
    """`topK_genrate` per row; top_k 8, total_token 30 give 29 nodes over the 3 heads, every
    level-d node one of head d-1's top 8, every level-3 node under a top-8 level-2 node."""
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 2, 50) * 3, -1)
    trees = beam_trees(logp, top_k=8, total_token=30)
    for row, tree in enumerate(trees):
        assert len(tree) == 29 and max(tree.depths) <= 3
        top = logp[:, row].topk(8, -1)
        for path in _paths(tree):
            assert path[-1] in top.indices[len(path) - 1].tolist()
        level2 = {
            (a, b): float(top.values[0][top.indices[0] == a] + top.values[1][top.indices[1] == b])
            for a in top.indices[0].tolist()
            for b in top.indices[1].tolist()
        }
        frontier = sorted(level2, key=lambda p: -level2[p])[:8]
        assert all(p[:2] in frontier for p in _paths(tree) if len(p) == 3)
    # the second row's tree is its own
    (alone,) = beam_trees(logp[:, 1:], top_k=8, total_token=30)
    assert (alone.tokens, alone.parents) == (trees[1].tokens, trees[1].parents)
    # one head: the top_k of head 0, as many as fit
    (one,) = beam_trees(logp[:1, :1], top_k=8, total_token=30)
    assert one.tokens == logp[0, 0].topk(8).indices.tolist()


# ---- the drafter -------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["mmspec", "paper"])
def test_drafter_reads_the_right_feature(target: Target, tmp_path: Path, form: str) -> None:
    """The tree comes from the feature the bonus token came from (MMSpec method/medusa/utils.py
    `update_inference_inputs`: accept_hidden_state_new[-1]); rows the engine drops are dropped
    here too. mmspec: target projection, beam; paper: own projection, MEDUSA_TREE cut to the
    two heads (node = head (depth-1)'s ranked token)."""
    lm_head = target.model.get_output_embeddings()
    if form == "mmspec":
        head = _heads(target)
        drafter = _drafter(target, head, tmp_path)

        def expected(feature: torch.Tensor) -> tuple[list[int], list[int]]:
            with torch.no_grad():
                logp = torch.log_softmax(head(feature[None], lm_head), -1)
            (tree,) = beam_trees(logp, 8, 30)
            return tree.tokens, tree.parents

    else:
        head = _heads(target, num_heads=2, projection="own")
        drafter = _drafter(target, head, tmp_path, tree="static")
        paths = [p for p in tree_paths(MEDUSA_TREE) if len(p) <= 2]
        parents = [paths.index(p[:-1]) if len(p) > 1 else -1 for p in paths]

        def expected(feature: torch.Tensor) -> tuple[list[int], list[int]]:
            with torch.no_grad():
                top = head(feature, heads=2).topk(10, dim=-1).indices  # (2, V) -> ranks
            return [int(top[len(p) - 1, p[-1]]) for p in paths], parents

    assert drafter.features == (FINAL,)
    h = target.model.config.get_text_config().hidden_size
    prompt = torch.randn(3, 5, h)
    ctx = DraftContext(rows=[0, 1, 2], tokens=[[1, 2]] * 3, prompt_lens=[1, 1, 1])
    ctx.extras["features"] = {FINAL: prompt}
    drafter.begin(ctx)
    trees = drafter.propose(ctx)
    assert [(t.tokens, t.parents) for t in trees] == [expected(prompt[i, -1]) for i in range(3)]
    # row 0 accepted nodes 0 then 10 (q-index 11), row 1 nothing (q 0), row 2 node 3 (q 4)
    q_feats = torch.randn(3, 1 + len(trees[0]), h)
    outcome = StepOutcome(trees, [[0, 10], [], [3]], [[5, 6, 7], [8], [9, 1]], q_feats, None)
    outcome.features = {FINAL: q_feats}
    drafter.update(ctx, outcome)
    # the engine then drops row 1
    ctx2 = DraftContext(rows=[0, 2], tokens=[[1, 2]] * 2, prompt_lens=[1, 1])
    trees = drafter.propose(ctx2)
    assert [(t.tokens, t.parents) for t in trees] == [
        expected(q_feats[0, 11]),
        expected(q_feats[2, 4]),
    ]


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


@pytest.mark.parametrize(
    ("projection", "tree"), [("target", "beam"), ("own", "static"), ("own", "beam")]
)
def test_greedy_medusa_equals_ar(
    target: Target, tmp_path: Path, projection: str, tree: str
) -> None:
    """The project's contract (no reference: MMSpec's evaluate_posterior is greedy too)."""
    convs, images = _suite()
    ref = _generate(Engine(target, get_drafter("ar")()), convs, images, 4)
    head = _heads(target, projection=projection, num_heads=3 if projection == "target" else 4)
    # every head = the LM head (own projections copied from it, zero blocks): it drafts the
    # target's next token again, which is right whenever the target repeats a token, so
    # some drafts get accepted
    head.init_from_target(target.model.get_output_embeddings())
    for h in head.medusa_head:
        torch.nn.init.zeros_(h[0].linear.bias)
    save_head(head, head.config, tmp_path)
    engine = Engine(target, get_drafter("medusa")(checkpoint=str(tmp_path), tree=tree))
    for batch in (1, 4):
        out = _generate(engine, convs, images, batch)
        assert [r.tokens for r in out] == [r.tokens for r in ref], f"batch {batch}"
        assert all(r.drafted > 0 for r in out if r.steps)
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


def _mmspec(target: Target) -> tuple[dict, dict[str, torch.Tensor]]:
    """MMSpec's Medusa checkpoint (train/main_medusa.py `accelerator.save_state` of
    cnets_medusa.Model, config.json copied from train/configs/llava1.5_7b_config.json):
    the frozen embed_tokens and the three heads' ResBlocks."""
    text = target.model.config.get_text_config()
    h, v = text.hidden_size, text.vocab_size
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": h,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "num_hidden_layers": 1,
        "vocab_size": v,
        "draft_vocab_size": v,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
    }
    state = {"embed_tokens.weight": torch.randn(v, h)}
    for i in range(3):
        state[f"medusa_head.{i}.0.linear.weight"] = torch.randn(h, h)
        state[f"medusa_head.{i}.0.linear.bias"] = torch.randn(h)
    return config, state


def _write(path: Path, config: dict, state: dict[str, torch.Tensor], file: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if file.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path / file))
    else:
        torch.save(state, path / file)
    return path


def _loaded(target: Target, path: Path, **kwargs: object) -> Medusa:
    drafter = get_drafter("medusa")(checkpoint=str(path), **kwargs)
    drafter.load(target)
    return drafter  # type: ignore[return-value]


def test_mmspec_checkpoint_loads(target: Target, tmp_path: Path) -> None:
    """MMSpec method/medusa/spec_model_medusa.py `SpecModel.__init__` loads the state into
    cnets_medusa.Model (keys medusa_head.{k}.0.linear.*, embed_tokens.weight unused by
    Medusa) and drafts through the target's lm_head."""
    config, state = _mmspec(target)
    for file in ("model.safetensors", "pytorch_model.bin"):
        drafter = _loaded(target, _write(tmp_path / file, config, state, file))
        head = drafter.head
        assert head.config.extra == {"num_heads": 3, "num_layers": 1, "projection": "target"}
        for k, v in state.items():
            if k != "embed_tokens.weight":
                assert torch.equal(head.get_parameter(k).detach(), v), k
        assert drafter.tree is None and drafter.depth == 3  # the beam over all three heads
    h = torch.randn(1, config["hidden_size"])
    lm_head = target.model.get_output_embeddings()
    with torch.no_grad():
        block = state["medusa_head.2.0.linear.weight"], state["medusa_head.2.0.linear.bias"]
        want = lm_head(h + F.silu(F.linear(h, *block)))
        assert torch.allclose(head(h, lm_head)[2], want, atol=1e-5)


def test_mmspec_checkpoint_errors_name_the_key(target: Target, tmp_path: Path) -> None:
    """What does not fit MMSpec's layout is named, not loaded (MMSpec's own loader checks
    shapes and prints missing/unexpected keys)."""
    config, state = _mmspec(target)
    state["medusa_head.1.0.lin.weight"] = state.pop("medusa_head.1.0.linear.weight")
    with pytest.raises(CheckpointError) as err:
        _loaded(target, _write(tmp_path / "renamed", config, state, "model.safetensors"))
    assert "medusa_head.1.0.linear.weight" in str(err.value)  # missing
    assert "medusa_head.1.0.lin.weight" in str(err.value)  # unexpected
    config, state = _mmspec(target)
    file = "model.safetensors"
    with pytest.raises(CheckpointError, match="hidden"):
        _loaded(target, _write(tmp_path / "h", {**config, "hidden_size": 7}, state, file))
    with pytest.raises(CheckpointError, match="medusa_head"):
        _loaded(target, _write(tmp_path / "none", config, {"fc.weight": torch.zeros(2)}, file))


def test_reference_v01_checkpoint_loads(target: Target, tmp_path: Path) -> None:
    """FasterDecoding/Medusa v0.1 `MedusaModel.from_pretrained`: medusa_lm_head.pt beside a
    config naming medusa_num_heads / medusa_num_layers; the paper's form (own projections)."""
    state = _v01_state(target, heads=2)
    config = {"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "x"}
    drafter = _loaded(target, _write(tmp_path, config, state, "medusa_lm_head.pt"), tree="static")
    head = drafter.head
    assert head.num_heads == 2
    assert head.config.extra == {"num_heads": 2, "num_layers": 1, "projection": "own"}
    for k, v in state.items():
        i, rest = k.split(".", 1)
        got = head.medusa_head[int(i)].get_parameter(rest)
        assert torch.equal(got.detach().to(v.dtype), v), k
    assert drafter.paths == [p for p in tree_paths(MEDUSA_TREE) if len(p) <= 2]
    assert len(drafter.parents) == len(drafter.paths)
    assert head.initialised  # loaded weights are never overwritten by the LM head


def test_reference_prefixed_checkpoint_loads(target: Target, tmp_path: Path) -> None:
    """FasterDecoding/Medusa 1.0 full repos: `medusa_head.` keys beside the base model's."""
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
    assert drafter.head.projection == "own"
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
    # neither the paper's config nor MMSpec's keys
    with pytest.raises(CheckpointError, match="medusa_num_heads"):
        _loaded(target, _write(tmp_path / "noheads", {}, state, "medusa_lm_head.pt"))


# ---- training -------------------------------------------------------------------------------


def test_mmspec_loss_on_a_crafted_batch(target: Target) -> None:
    """MMSpec train/main_medusa.py training loop: head k at position t predicts the target's
    hidden state t+1+k (SmoothL1, mean over the hidden size, v_w 1) and its distribution
    (soft cross-entropy through the target's lm_head, p_w 0.1); the heads' losses are
    averaged (total_vloss / K, total_ploss / K). Here on answer tokens t+2+k."""
    head = _heads(target)
    for h in head.medusa_head:  # zero blocks: each head passes h_t through unchanged
        torch.nn.init.zeros_(h[0].linear.bias)
    lm_head = target.model.get_output_embeddings()
    length, width, vocab = 7, head.config.hidden_size, head.config.vocab_size
    torch.manual_seed(1)
    feats, logits = torch.randn(1, length, width), torch.randn(1, length, vocab)
    real = torch.ones(1, length, dtype=torch.bool)
    answer = torch.zeros(1, length, dtype=torch.bool)
    answer[0, 3:] = True
    ids = torch.randint(0, vocab, (1, length))
    batch = TeacherBatch(ids, real, answer, ~real, {FINAL: feats}, logits)
    loss, parts = head.train_loss(batch, target.model.get_input_embeddings(), lm_head)
    want = 0.0
    with torch.no_grad():
        for k in range(3):
            terms = []
            for t in range(length - 2 - k):
                if answer[0, t + 2 + k]:
                    want_p = logits[0, t + 1 + k].softmax(-1)
                    logp = lm_head(feats[0, t]).log_softmax(-1)
                    v = F.smooth_l1_loss(feats[0, t], feats[0, t + 1 + k])
                    terms.append(v - 0.1 * (want_p * logp).sum())
            want += sum(terms) / len(terms) / 3
    assert torch.allclose(loss, torch.as_tensor(want), atol=1e-5)
    assert {"acc", "loss_0", "v_loss_2", "p_loss_2", "acc_2"} <= set(parts)


def test_fresh_own_heads_start_from_the_lm_head(target: Target) -> None:
    """FasterDecoding medusa_model.py (v0.1): each head's projection := the base lm_head."""
    head = _heads(target, num_heads=2, projection="own")
    assert head.config.extra == {"num_heads": 2, "num_layers": 1, "projection": "own"}
    assert not head.initialised
    lm_head = target.model.get_output_embeddings()
    head.init_from_target(lm_head)
    assert all(torch.equal(h[-1].weight, lm_head.weight) for h in head.medusa_head)
    assert all(not h[0].linear.weight.any() for h in head.medusa_head)  # zero-initialised


@pytest.mark.parametrize("projection", ["target", "own"])
def test_training_lowers_the_loss(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, projection: str
) -> None:
    """Both forms train (MMSpec train/main_medusa.py; the paper's Medusa-1 cross-entropy)."""
    from mmspec.training.distill import DistillConfig
    from mmspec.training.train_drafter import recipe, train_head

    monkeypatch.setenv("MMSPEC_HOME", str(tmp_path))
    head_args = {"num_heads": 3, "num_layers": 1, "projection": projection}
    config = recipe(
        "medusa",
        "tiny-llava",
        steps=12,
        lr=3e-3,
        warmup_steps=2,
        head_args=head_args,
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
    assert len(_loaded(target, tmp_path / "head", tree="static").parents) == 61  # depth <= 3
    drafter = _loaded(target, tmp_path / "head")
    assert drafter.head.projection == projection and drafter.tree is None
