"""Token Recycling without a model: the adjacency matrix, the tree walk and MMSpec's rules.

The default rules pin MMSpec's `method/recycling/spec_model_recycling.py` `specgenerate`
(fork fanyunfeng-bit/MMSpec-fyf, commit fd33670) on crafted inputs; the options pin Token
Recycling's own `evaluation/inference_recycling.py` (Luowaterbi/TokenRecycling).
"""

from __future__ import annotations

import collections
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmspec.methods import recycling  # (importing it runs @register)
from mmspec.methods.base import DraftContext, StepOutcome
from mmspec.methods.recycling import (
    TEMPLATE_2_2_2,
    UNSEEN,
    Stops,
    TokenRecycling,
    ends_in_repeat,
    expand,
    template,
)
from mmspec.methods.registry import get_drafter
from mmspec.methods.tree import DraftTree
from mmspec.models.feature_taps import FINAL

# Token Recycling's own variant (its evaluation/inference_recycling.py), the old default
PAPER = {"tree": "2.2.2", "matrix": "shared", "prompt_seed": False, "stops": False}


class _FakeModel:
    """An LM head that is the identity: a prompt's "final hidden states" are its logits."""

    def __init__(self, vocab: int) -> None:
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(vocab))

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


def _drafter(vocab: int, image: int | None = None, **kwargs: object) -> TokenRecycling:
    drafter = TokenRecycling(**kwargs)  # type: ignore[arg-type]
    target = SimpleNamespace(
        model=_FakeModel(vocab),
        image_token_id=vocab - 1 if image is None else image,
        device=torch.device("cpu"),
    )
    drafter.load(target)  # type: ignore[arg-type]
    return drafter


def _ctx(roots: list[int], rows: list[int] | None = None) -> DraftContext:
    return DraftContext(
        rows=rows if rows is not None else list(range(len(roots))),
        tokens=[[7, r] for r in roots],  # a one-token "prompt", then the pending root
        prompt_lens=[1] * len(roots),
    )


def _seq_ctx(prompt: list[int], generated: list[int]) -> DraftContext:
    """One row: `prompt`, then `generated` (ending with the pending root)."""
    return DraftContext(rows=[0], tokens=[[*prompt, *generated]], prompt_lens=[len(prompt)])


def _peaked(vocab: int, order: list[int]) -> torch.Tensor:
    """Logits row whose ranking is `order` first, then the remaining tokens by id."""
    rest = [t for t in range(vocab) if t not in order]
    logits = torch.empty(vocab)
    for rank, tok in enumerate([*order, *rest]):
        logits[tok] = float(vocab - rank)
    return logits


def _set_top1(drafter: TokenRecycling, successor: dict[int, int], row: int = 0) -> None:
    """Give each token of `successor` that top-1 in the table of batch row `row`."""
    table = drafter.adjacency if drafter.matrix == "shared" else drafter.tables[row]
    for tok, nxt in successor.items():
        table[tok] = _peaked(table.shape[0], [nxt]).topk(table.shape[1]).indices


def _begun(vocab: int, rows: int = 1, **kwargs: object) -> TokenRecycling:
    """A default (MMSpec) drafter after `begin` on `rows` rows, nothing seeded."""
    drafter = _drafter(vocab, prompt_seed=False, **kwargs)
    drafter.begin(_ctx([1] * rows))
    return drafter


def _repeats_slow(seq: list[int]) -> bool:
    for n in range(1, 11):
        if len(seq) >= 2 * n and all(seq[-n + j] == seq[-2 * n + j] for j in range(n)):
            return True
    return False


def _path_walk(
    paths: list[tuple[int, ...]], adj: list[list[int]], root: int, stops: Stops | None = None
) -> list[tuple[int, ...]]:
    """Kept template paths, the slow way: walk each path from the root, then drop repeats."""
    token: dict[tuple[int, ...], int] = {(): root}
    kept: list[tuple[int, ...]] = []
    for path in paths:
        tok, line = root, []
        for c in path:  # every prefix is walked again from the root
            tok = adj[tok][c]
            if tok == UNSEEN:
                break
            line.append(tok)
        if tok == UNSEEN or path[:-1] not in token:
            continue
        earlier = [token[s] for s in kept if s[:-1] == path[:-1]]
        if tok in earlier:
            continue
        if stops is not None and (tok in stops.banned or _repeats_slow([*stops.tail, *line])):
            continue
        token[path] = tok
        kept.append(path)
    return kept


# ---- the template ------------------------------------------------------------------------


def test_template_2_2_2_is_specbench_tree() -> None:
    paths = template("2.2.2", draft_len=10)
    assert len(paths) == len(set(paths)) == 80
    assert collections.Counter(map(len, paths)) == {1: 8, 2: 21, 3: 25, 4: 15, 5: 8, 6: 3}
    assert paths[:3] == [(0,), (1,), (2,)] and paths[-1] == (0, 0, 0, 1, 0, 0)
    for i, p in enumerate(paths):
        assert len(p) == 1 or p[:-1] in paths[:i]  # parents first
        # lowering any choice stays in the tree: dropping a repeated sibling (a higher choice
        # under the same token) drops only paths its kept twin also drafts
        for j in range(len(p)):
            for lower in range(p[j]):
                assert (*p[:j], lower, *p[j + 1 :]) in paths
    assert template("chain", draft_len=3) == [(0,), (0, 0), (0, 0, 0)]
    assert tuple(paths) == TEMPLATE_2_2_2


def test_distinct_rows_expand_to_all_80_nodes() -> None:
    vocab = 50
    gen = torch.Generator().manual_seed(0)
    adj = torch.stack([torch.randperm(vocab, generator=gen)[:8] for _ in range(vocab)])
    tree, source = expand(template("2.2.2", 10), adj, root=3)
    paths = list(TEMPLATE_2_2_2)
    assert len(tree) == 80 and source == list(range(80))
    assert tree.depths == [len(p) for p in paths]
    for i, p in enumerate(paths):
        parent = tree.parents[i]
        assert parent == (paths.index(p[:-1]) if len(p) > 1 else -1)
        assert tree.tokens[i] == int(adj[3 if parent < 0 else tree.tokens[parent], p[-1]])


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    vocab=st.integers(2, 12),
    tree=st.sampled_from(["2.2.2", "chain"]),
    draft_len=st.integers(1, 12),
    with_stops=st.booleans(),
)
def test_expand_equals_path_walk(
    data: st.DataObject, vocab: int, tree: str, draft_len: int, with_stops: bool
) -> None:
    # a small vocabulary forces repeated siblings and repeats; some rows are still unseen
    row = st.one_of(
        st.just([UNSEEN] * 8), st.lists(st.integers(0, vocab - 1), min_size=8, max_size=8)
    )
    adj = data.draw(st.lists(row, min_size=vocab, max_size=vocab))
    root = data.draw(st.integers(0, vocab - 1))
    paths = template(tree, draft_len)
    stops = None
    if with_stops:
        banned = data.draw(st.frozensets(st.integers(0, vocab - 1), max_size=2))
        earlier = data.draw(st.lists(st.integers(0, vocab - 1), max_size=25))
        stops = Stops(banned, [*earlier, root])

    got, source = expand(paths, torch.tensor(adj, dtype=torch.long), root, stops)

    kept = _path_walk(paths, adj, root, stops)
    assert [paths[i] for i in source] == kept
    assert got.depths == [len(p) for p in kept]
    assert got.parents == [kept.index(p[:-1]) if len(p) > 1 else -1 for p in kept]
    for i, p in enumerate(kept):
        tok = root
        for c in p:
            tok = adj[tok][c]
        assert got.tokens[i] == tok
    for node in range(-1, len(got)):
        children = [got.tokens[c] for c in got.children(node)]
        assert len(children) == len(set(children))


# ---- MMSpec's drafting rules (the defaults) ----------------------------------------------


def test_defaults_are_mmspec_runs() -> None:
    """evaluation/eval_recycling_mmspec.py main(): --matrix-top-k 8, --draft-len 10 (the
    scripts/*/eval_recycling_mmspec.sh pass the same); specgenerate drafts the top-1 chain
    from a matrix it builds per call, seeded from the prefill, with its chain stops."""
    drafter = TokenRecycling()
    assert (drafter.tree, drafter.draft_len, drafter.topk) == ("chain", 10, 8)
    assert drafter.paths == [(0,) * d for d in range(1, 11)]
    assert (drafter.matrix, drafter.prompt_seed, drafter.stops) == ("per_sample", True, True)
    assert drafter.features == (FINAL,)  # the engine hands `begin` the prompt's hidden states
    assert TokenRecycling(prompt_seed=False).features == ()


def test_prompt_seed_sets_each_prompt_tokens_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """spec_model_recycling.py specgenerate, "Initialize adjacency matrix from prompt
    logits": adjacency_matrix[prompt_token_ids] = topk(prefill logits), the last occurrence of
    a token winning; each row of the batch from its own (left padded) positions."""
    vocab, k = 12, 3
    monkeypatch.setattr(recycling, "SEED_CHUNK_LOGITS", 2 * vocab)  # 2 positions per chunk
    drafter = _drafter(vocab, topk=k)
    prompts = [[4, 5, 4, 6, 2], [5, 3]]
    orders = [
        [[1, 2, 3], [6, 7, 8], [9, 8, 7], [0, 1, 2], [3, 3, 3]],
        [[2, 4, 6], [8, 10, 0]],
    ]
    hidden = torch.zeros(2, 5, vocab)  # the identity head: hidden states are the logits
    for i, rows in enumerate(orders):
        for j, order in enumerate(rows):
            hidden[i, 5 - len(rows) + j] = _peaked(vocab, list(dict.fromkeys(order)))
    hidden[1, :3] = _peaked(vocab, [11, 11, 11])  # padding: never read
    ctx = DraftContext(
        rows=[0, 1],
        tokens=[[*p, 9] for p in prompts],
        prompt_lens=[5, 2],
        extras={"features": {FINAL: hidden}},
    )
    drafter.begin(ctx)
    first, second = drafter.tables[0], drafter.tables[1]
    assert first[4].tolist() == [9, 8, 7]  # the second 4 wins
    assert first[5].tolist() == [6, 7, 8]
    assert first[6].tolist() == [0, 1, 2]
    assert first[2].tolist() == _peaked(vocab, [3]).topk(k).indices.tolist()
    assert first[3].tolist() == first[9].tolist() == [UNSEEN] * k
    assert second[5].tolist() == [2, 4, 6] and second[3].tolist() == [8, 10, 0]
    assert second[4].tolist() == [UNSEEN] * k  # rows do not see each other's prompts
    assert drafter.propose(ctx)[1].tokens == []  # 9 is unseen in both
    # 5 -> 6, whose top-1 is token 0: a stop
    assert drafter.propose(DraftContext([0], [[*prompts[0], 5]], [5]))[0].tokens == [6]


def test_prompt_seed_needs_the_final_hidden_states() -> None:
    drafter = _drafter(10)
    with pytest.raises(RuntimeError, match="prompt_seed needs the prompt's final hidden"):
        drafter.begin(_ctx([1]))


def test_chain_stops_at_token_zero_the_image_token_and_unseen_rows() -> None:
    """spec_model_recycling.py specgenerate, chain draft loop: `if next_tok == 0: break`
    (its unseen test, so a seen top-1 of token 0 stops too) and `next_tok == image_token_id`
    (the image placeholder)."""
    drafter = _begun(20, image=15, draft_len=6)
    _set_top1(drafter, {1: 2, 2: 3, 3: 0, 0: 4, 5: 6, 6: 15, 15: 7, 8: 9})
    assert drafter.propose(_ctx([1]))[0].tokens == [2, 3]
    assert drafter.propose(_ctx([5]))[0].tokens == [6]
    assert drafter.propose(_ctx([8]))[0].tokens == [9]  # row 9 was never seen
    assert drafter.propose(_ctx([0]))[0].tokens == [4]  # a root of 0 is no stop
    off = _drafter(20, image=15, draft_len=6, prompt_seed=False, stops=False)
    off.begin(_ctx([1]))
    _set_top1(off, {1: 2, 2: 3, 3: 0, 0: 4, 5: 6, 6: 15, 15: 7, 8: 9})
    assert off.propose(_ctx([1]))[0].tokens == [2, 3, 0, 4]
    assert off.propose(_ctx([5]))[0].tokens == [6, 15, 7]


def test_chain_stops_before_an_immediate_repeat() -> None:
    """spec_model_recycling.py specgenerate, "N-gram cycle detection (1..10-gram)": stop
    before a token that makes recent generated tokens + draft end in some n-gram twice in a
    row; the recent tokens are the last draft_len * 5 from the first generated one."""
    drafter = _begun(30, draft_len=8)
    _set_top1(drafter, {1: 2, 2: 1, 3: 3, 4: 5, 5: 6})
    assert drafter.propose(_seq_ctx([7], [9, 1]))[0].tokens == [2, 1]  # 1 2 1 2: 2-gram
    assert drafter.propose(_seq_ctx([7], [3]))[0].tokens == []  # 3 3: 1-gram
    assert drafter.propose(_seq_ctx([7], [4, 5, 6, 4]))[0].tokens == [5]  # 4 5 6 4 5 6
    # the prompt is not part of the recent tokens
    assert drafter.propose(_seq_ctx([4, 5, 6], [4]))[0].tokens == [5, 6]


def test_repeat_stop_window_and_longest_ngram() -> None:
    """spec_model_recycling.py specgenerate: `_recent_tail = input_ids[max(input_len,
    len - draft_len * 5):]`, and n-grams up to 10 (`for _n in range(1, 11)`)."""
    # a 4-gram repeat needs 7 recent tokens before the draft: draft_len 1 looks at 5
    short = _begun(30, draft_len=1)
    _set_top1(short, {13: 14})
    generated = [11, 12, 13, 14, 11, 12, 13]
    assert short.propose(_seq_ctx([7], generated))[0].tokens == [14]
    wide = _begun(30, draft_len=2)
    _set_top1(wide, {13: 14})
    assert wide.propose(_seq_ctx([7], generated))[0].tokens == []
    # a 10-gram repeat stops the chain, an 11-gram one does not
    drafter = _begun(30, draft_len=5)
    _set_top1(drafter, {19: 20, 20: 21})
    ten = list(range(11, 21))
    assert drafter.propose(_seq_ctx([7], [*ten, *ten[:-1]]))[0].tokens == []
    eleven = list(range(10, 21))
    assert drafter.propose(_seq_ctx([7], [*eleven, *eleven[:-1]]))[0].tokens == [20, 21]
    assert ends_in_repeat([1, 2, 3] * 2) and not ends_in_repeat([1, 2, 3, 1, 2])
    assert not ends_in_repeat(list(range(11)) * 2) and not ends_in_repeat([5])


def test_stops_on_a_tree_drop_the_subtree_only() -> None:
    """Our generalisation of MMSpec's chain stops to the "2.2.2" option: a halted node goes
    with its subtree, its siblings stay."""
    drafter = _begun(40, image=39, tree="2.2.2")
    table = drafter.tables[0]
    table[1] = torch.tensor([39, 2, 3, 4, 5, 6, 7, 8])  # the image token first
    table[2] = torch.tensor([2, 9, 10, 11, 12, 13, 14, 15])  # 2 2: a 1-gram repeat
    tree = drafter.propose(_seq_ctx([7], [1]))[0]
    assert [tree.tokens[c] for c in tree.children(-1)] == [2, 3, 4, 5, 6, 7, 8]
    # node 0 is 2 (path (1,)): of its template children (1, 0..3), 2 2 is a repeat
    assert [tree.tokens[c] for c in tree.children(0)] == [9, 10, 11]


def test_per_sample_matrix_is_fresh_each_begin_and_per_row() -> None:
    """spec_model_recycling.py specgenerate builds `adjacency_matrix = torch.zeros(...)` on
    every call, and eval_recycling_mmspec.py calls it once per sample and turn."""
    vocab = 20
    drafter = _begun(vocab, rows=2)
    trees = [DraftTree.empty(), DraftTree.empty()]
    logits = torch.stack([_peaked(vocab, [11])[None], _peaked(vocab, [12])[None]])
    drafter.update(_ctx([5, 5]), StepOutcome(trees, [[], []], [[11], [12]], logits))
    assert drafter.propose(_ctx([5, 5]))[0].tokens == [11]
    assert drafter.propose(_ctx([5, 5]))[1].tokens == [12]
    # row 0 left the batch: row 1 keeps its own table
    assert drafter.propose(_ctx([5], rows=[1]))[0].tokens == [12]
    drafter.begin(_ctx([5], rows=[0]))  # the next sample (or turn) starts from nothing
    assert drafter.propose(_ctx([5], rows=[0]))[0].tokens == []


# ---- the adjacency matrix ----------------------------------------------------------------


@st.composite
def _steps(draw: st.DrawFn, vocab: int) -> list[tuple[list[int], list[DraftTree], torch.Tensor]]:
    """Verification steps: roots, trees and (active, q, vocab) logits with distinct values."""
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        active = draw(st.integers(1, 3))
        roots = draw(st.lists(st.integers(0, vocab - 1), min_size=active, max_size=active))
        trees = []
        for _ in range(active):
            n = draw(st.integers(0, 5))
            tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
            parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
            trees.append(DraftTree(tokens, parents))
        q = 1 + max(len(t) for t in trees)
        perm = st.permutations(list(range(vocab)))
        logits = torch.tensor(
            [[draw(perm) for _ in range(q)] for _ in range(active)], dtype=torch.float32
        )
        steps.append((roots, trees, logits))
    return steps


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    vocab=st.integers(2, 9),
    k=st.integers(1, 8),
    matrix=st.sampled_from(["shared", "per_sample"]),
)
def test_adjacency_equals_slow_reference(
    data: st.DataObject, vocab: int, k: int, matrix: str
) -> None:
    """spec_model_recycling.py specgenerate: `adjacency_matrix[chunk_ids] = topk` of every
    forwarded position (and of the fallback step's one); shared across rows as an option."""
    k = min(k, vocab)
    drafter = _drafter(vocab, tree="chain", topk=k, matrix=matrix, prompt_seed=False)
    drafter.begin(_ctx([0, 0, 0]))
    slow: dict[int, dict[int, list[int]]] = collections.defaultdict(dict)  # row -> table
    for roots, trees, logits in data.draw(_steps(vocab)):
        ctx = _ctx(roots)
        drafter.update(ctx, StepOutcome(trees, [[] for _ in roots], [[] for _ in roots], logits))
        for i, (root, tree) in enumerate(zip(roots, trees)):
            # root then each node, row by row; padding q-indices past the tree are not read
            for q, tok in enumerate([root, *tree.tokens]):
                row = logits[i, q].tolist()
                slow[i if matrix == "per_sample" else 0][tok] = sorted(
                    range(vocab), key=lambda t: -row[t]
                )[:k]
    for r in range(3 if matrix == "per_sample" else 1):
        expected = [slow[r].get(t, [UNSEEN] * k) for t in range(vocab)]
        got = drafter.tables[r] if matrix == "per_sample" else drafter.adjacency
        assert got.tolist() == expected


# ---- Token Recycling's own variant (options) -----------------------------------------------


def test_chain_follows_top1_and_stops_at_unseen() -> None:
    drafter = _drafter(20, tree="chain", draft_len=4, matrix="shared", prompt_seed=False)
    for tok in range(10):
        drafter.adjacency[tok] = torch.tensor([tok + 1, 0, 0, 0, 0, 0, 0, 0])
    assert drafter.propose(_ctx([2]))[0].tokens == [3, 4, 5, 6]
    assert drafter.propose(_ctx([8]))[0].tokens == [9, 10]  # row 10 was never seen
    assert drafter.propose(_ctx([15]))[0].tokens == []
    chain = drafter.propose(_ctx([0]))[0]
    assert chain.parents == [-1, 0, 1, 2]


def test_learns_from_verification_and_keeps_it_across_batches() -> None:
    """Token Recycling's evaluation/inference_recycling.py: one adj_matrix for the whole run
    (made in __main__, passed to every query), the 2.2.2 tree, nothing from the prefill."""
    vocab = 30
    drafter = _drafter(vocab, **PAPER)
    assert drafter.adjacency.shape == (vocab, 8) and drafter.adjacency.dtype == torch.long
    assert drafter.features == ()
    drafter.begin(_ctx([5, 6]))
    assert [len(t) for t in drafter.propose(_ctx([5, 6]))] == [0, 0]  # nothing seen yet

    # row 0 fed 5 with tree 5 -> 11 (node 0) ; row 1 fed 6 with an empty tree (padding q-index)
    trees = [DraftTree.chain([11]), DraftTree.empty()]
    logits = torch.stack(
        [
            torch.stack([_peaked(vocab, [11, 12]), _peaked(vocab, [20, 21])]),
            torch.stack([_peaked(vocab, [1, 2]), _peaked(vocab, [25])]),  # second is padding
        ]
    )
    drafter.update(_ctx([5, 6]), StepOutcome(trees, [[0], []], [[11, 20], [1]], logits))
    assert drafter.adjacency[5, :2].tolist() == [11, 12]
    assert drafter.adjacency[11, :2].tolist() == [20, 21]
    assert drafter.adjacency[6, :2].tolist() == [1, 2]
    assert drafter.adjacency[25].tolist() == [UNSEEN] * 8  # a padding position's token

    # a new batch, another batch row: the matrix is keyed by token and outlives the batch
    drafter.begin(_ctx([5], rows=[3]))
    tree = drafter.propose(_ctx([5], rows=[3]))[0]
    assert tree.tokens[:8] == _peaked(vocab, [11, 12]).topk(8).indices.tolist()
    assert tree.parents[:8] == [-1] * 8
    below_11 = [tree.tokens[c] for c in tree.children(0)]
    assert below_11 == _peaked(vocab, [20, 21]).topk(8).indices.tolist()
    assert tree.probs is None  # deterministic drafts


def test_last_write_wins_within_a_step() -> None:
    vocab = 10
    drafter = _drafter(vocab, tree="chain", topk=2, matrix="shared", prompt_seed=False)
    # token 4 is the root of row 0 and a node of row 1: row 1's write comes later
    trees = [DraftTree.empty(), DraftTree.chain([4, 4])]
    logits = torch.stack(
        [
            torch.stack([_peaked(vocab, [1, 2])] * 3),
            torch.stack([_peaked(vocab, [3]), _peaked(vocab, [5]), _peaked(vocab, [6, 7])]),
        ]
    )
    drafter.update(_ctx([4, 9]), StepOutcome(trees, [[], []], [[1], [3]], logits))
    assert drafter.adjacency[4].tolist() == [6, 7]
    assert drafter.adjacency[9, 0].item() == 3


def test_registered_and_validates_kwargs() -> None:
    assert get_drafter("recycling") is TokenRecycling
    assert TokenRecycling.training_free and not TokenRecycling.vision_aware
    with pytest.raises(ValueError, match=re.escape("tree must be one of 2.2.2, chain")):
        TokenRecycling(tree="2.2")
    with pytest.raises(ValueError, match="draft_len >= 1"):
        TokenRecycling(tree="chain", draft_len=0)
    with pytest.raises(ValueError, match="topk >= 1"):
        TokenRecycling(topk=0)
    with pytest.raises(ValueError, match="needs topk >= 8"):
        TokenRecycling(tree="2.2.2", topk=4)
    with pytest.raises(ValueError, match=re.escape("matrix must be one of per_sample, shared")):
        TokenRecycling(matrix="global")
    with pytest.raises(ValueError, match="prompt_seed must be true or false"):
        TokenRecycling(prompt_seed="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stops must be true or false"):
        TokenRecycling(stops=1)  # type: ignore[arg-type]
    assert len(TokenRecycling(tree="chain", topk=1).paths) == 10
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        _drafter(4, topk=8)
    assert set(TokenRecycling.arg_names()) == {
        "tree", "draft_len", "topk", "matrix", "prompt_seed", "stops"
    }  # fmt: skip


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_prompt_seed_reads_the_prefill_logits(tiny_targets, head_samples, model) -> None:
    """spec_model_recycling.py specgenerate seeds from `init_out.logits` of the prefill: our
    engine's FINAL tap through the LM head gives the same top-k at every prompt position
    (two prompts of different lengths: left padding)."""
    from mmspec.methods.engine import Engine

    target = tiny_targets[model]
    convs, images = head_samples
    drafter = TokenRecycling()
    seeded: dict[int, torch.Tensor] = {}
    begin = drafter.begin

    def keep_tables(ctx: DraftContext) -> None:
        begin(ctx)
        seeded.update({r: t.clone() for r, t in drafter.tables.items()})

    drafter.begin = keep_tables  # type: ignore[method-assign]
    Engine(target, drafter).generate(convs[1:3], images[1:3], max_new_tokens=3)

    prompt = target.encode(convs[1:3], images[1:3])
    assert len(set(prompt.prompt_lens)) == 2  # one row is left padded
    positions, _ = target.prefill_positions(prompt)
    with torch.inference_mode():
        logits = target.model(**prompt.inputs, position_ids=positions).logits
    best = logits.topk(drafter.topk, dim=-1).indices
    for i, tokens in enumerate(prompt.tokens()):
        expected = torch.full_like(seeded[i], UNSEEN)
        for pos, tok in enumerate(tokens):  # the last occurrence wins
            expected[tok] = best[i, logits.shape[1] - len(tokens) + pos]
        assert torch.equal(seeded[i], expected)
        assert (seeded[i][:, 0] != UNSEEN).sum() == len(set(tokens))
