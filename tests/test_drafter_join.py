"""Rows joining a running batch (`Drafter.join`) draft as they would in a batch of their own.

The training-free drafters keep MMSpec's state per sample (SAM's automaton, Lookahead's
tries, Token Recycling's per-sample matrix) and ViSkip its gate per row, so a row's drafts may
not depend on who else decodes beside it, or on when it joined. Each test plays a scripted
stream straight against the drafter: every request's prompt, emitted tokens, verification
logits, prompt features and vision scores are fixed by its id, so the same row sees the same
things whether it runs alone or joins a batch mid-way (as `Engine.serve` drives it: `begin`
for a group entering an empty batch, `join` for later groups, rows dropped after a step).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mmspec.methods.base import DraftContext, Drafter, StepOutcome
from mmspec.methods.registry import get_drafter
from mmspec.models.feature_taps import FINAL

VOCAB = 24
IMAGE_TOKEN = VOCAB - 1
ALPHABET = 8  # tokens 0..7: small, so suffixes recur and retrieval drafts something
THRESHOLD = 0.5  # ViSkip's, next to the scores below


@dataclass
class Request:
    """One row's scripted story: what it is prompted with, emits and is scored."""

    row: int
    join_step: int  # the stream step before which it joins
    steps: int  # verifications it takes before it finishes
    prompt: list[int]
    first: int  # the prefill's token
    emitted: list[list[int]]  # (steps,) tokens each verification emits
    seed: int

    @classmethod
    def make(cls, row: int, join_step: int, steps: int) -> Request:
        g = torch.Generator().manual_seed(row)
        prompt = torch.randint(
            ALPHABET, (int(torch.randint(5, 15, (1,), generator=g)),), generator=g
        )
        emitted = [
            torch.randint(ALPHABET, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)
            for _ in range(steps)
        ]
        first = int(torch.randint(ALPHABET, (1,), generator=g))
        return cls(
            row, join_step, steps, prompt.tolist(), first, [e.tolist() for e in emitted], row
        )

    def tokens(self, step: int) -> list[int]:
        """The row's sequence before its `step`-th verification, ending with the pending one."""
        return [*self.prompt, self.first, *(t for e in self.emitted[:step] for t in e)]

    def hidden(self) -> torch.Tensor:
        """(prompt, VOCAB) its prompt's final hidden states (the fake LM head is the identity)."""
        return torch.randn(len(self.prompt), VOCAB, generator=self._gen(-1))

    def logits(self, step: int, nodes: int) -> torch.Tensor:
        """(nodes + 1, VOCAB) the target's logits after its root and each draft node."""
        return torch.randn(nodes + 1, VOCAB, generator=self._gen(step))

    def score(self, step: int) -> float:
        """Vision score before `step`: high at its first step, which `after_draft` drafts."""
        return 0.9 if step == 0 else float(torch.rand(1, generator=self._gen(1000 + step)))

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 10_007 + salt)


# (row, join_step, steps): rows leave, others join mid-batch, the batch empties and restarts
STREAM = [(10, 0, 3), (11, 0, 8), (12, 2, 6), (13, 2, 4), (14, 4, 5), (15, 9, 3)]


class _FakeModel:
    """An identity LM head: a prompt's "final hidden states" are its logits."""

    def __init__(self) -> None:
        self.head = torch.nn.Linear(VOCAB, VOCAB, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(VOCAB))

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


def _drafter(method: str, args: dict[str, Any]) -> Drafter:
    drafter = get_drafter(method)(**args)
    target = SimpleNamespace(model=_FakeModel(), image_token_id=IMAGE_TOKEN)
    drafter.load(target)  # type: ignore[arg-type]
    return drafter


def _ctx(active: list[Request], done: dict[int, int], prefill: bool = False) -> DraftContext:
    extras: dict[str, Any] = {"vision_score": [r.score(done[r.row]) for r in active]}
    if prefill:  # left padded, as the engine hands a prefill's features over
        width = max(len(r.prompt) for r in active)
        padded = [
            torch.cat([torch.randn(width - len(r.prompt), VOCAB), r.hidden()]) for r in active
        ]
        extras["features"] = {FINAL: torch.stack(padded)}
    return DraftContext(
        rows=[r.row for r in active],
        tokens=[r.tokens(done[r.row]) for r in active],
        prompt_lens=[len(r.prompt) for r in active],
        extras=extras,
    )


Drafts = dict[int, list[tuple[list[int], list[int], bool]]]


def _serve(drafter: Drafter, requests: list[Request]) -> tuple[Drafts, list[list[int]]]:
    """Play the stream; each row's drafts by its own step, and the rows of every step."""
    drafts: Drafts = {r.row: [] for r in requests}
    done = {r.row: 0 for r in requests}
    active: list[Request] = []
    batches = []
    for t in range(max(r.join_step + r.steps for r in requests)):
        group = [r for r in requests if r.join_step == t]
        if group:
            ctx = _ctx(group, done, prefill=True)
            if active:
                drafter.join(ctx)
            else:
                drafter.begin(ctx)
            active += group
        if not active:
            continue
        ctx = _ctx(active, done)
        trees = drafter.propose(ctx)
        for r, tree in zip(active, trees):
            drafts[r.row].append((tree.tokens, tree.parents, tree.skipped))
        q = 1 + max(len(tree) for tree in trees)
        logits = torch.stack(  # padding q-indices are noise: no drafter may read them
            [
                torch.cat([r.logits(done[r.row], len(tree)), torch.randn(q - 1 - len(tree), VOCAB)])
                for r, tree in zip(active, trees)
            ]
        )
        emitted = [r.emitted[done[r.row]] for r in active]
        outcome = StepOutcome(trees, [[] for _ in trees], emitted, logits)
        drafter.update(ctx, outcome)
        batches.append(ctx.rows)
        for r in active:
            done[r.row] += 1
        active = [r for r in active if done[r.row] < r.steps]  # the engine drops them
    return drafts, batches


CASES = [
    ("sam", {}),
    ("sam", {"rule": "specbench", "threshold": 1}),
    ("lookahead", {}),
    ("lookahead", {"rule": "mmspec_tree"}),
    ("lookahead", {"branch_length": 3}),  # its outputs count soon: they break ties
    ("lookahead", {"rule": "best_first"}),
    ("recycling", {}),
    ("recycling", {"tree": "2.2.2", "stops": False}),
    ("viskip+sam", {"viskip_threshold": THRESHOLD}),
    ("viskip+lookahead", {"viskip_threshold": THRESHOLD, "viskip_gate": "every_step"}),
    ("viskip+recycling", {"viskip_threshold": THRESHOLD}),
]


@pytest.mark.parametrize(("method", "args"), CASES)
def test_a_joining_row_drafts_as_in_a_batch_of_its_own(method: str, args: dict) -> None:
    stream = [Request.make(*r) for r in STREAM]
    got, batches = _serve(_drafter(method, args), stream)
    # the stream shows something: rows joined running batches and left them
    assert {11, 12, 13} <= set(max(batches, key=len)) and [15] in batches
    alone = {
        r.row: _serve(_drafter(method, args), [Request.make(r.row, 0, r.steps)])[0] for r in stream
    }
    for r in stream:
        assert got[r.row] == alone[r.row][r.row], r.row
    drafts = [d for row in got.values() for d in row]
    assert any(tokens for tokens, _, _ in drafts), "nothing drafted: the test shows nothing"
    if method.startswith("viskip+"):
        assert any(skipped for _, _, skipped in drafts)


@pytest.mark.parametrize(
    ("method", "state"), [("sam", "_automata"), ("lookahead", "_rows"), ("recycling", "tables")]
)
def test_a_stream_keeps_no_state_of_rows_gone(method: str, state: str) -> None:
    """Under `Engine.serve` a drafter sees every request of a stream: a finished row's state
    (Token Recycling's table is ~10 MB a row at a 152k vocabulary) must go with it."""
    drafter = _drafter(method, {})
    stream = [Request.make(*r) for r in STREAM[:-1]]  # never empty: no `begin` clears it
    _, batches = _serve(drafter, stream)
    assert batches[-1] == [14] and len(batches[0]) > 1
    assert set(getattr(drafter, state)) == {14}


def test_viskip_lets_a_joining_rows_first_step_draft() -> None:
    """MMSpec's `after_draft` gate: a row's first step drafts whatever its score, also when
    the row joins a batch whose other rows are gated."""
    drafter = _drafter("viskip+sam", {"viskip_threshold": THRESHOLD})
    running = DraftContext(rows=[0], tokens=[[1, 2, 1, 2]], prompt_lens=[2])
    drafter.begin(running)
    running.extras["vision_score"] = [0.0]
    drafter.propose(running)  # drafted: row 0 is gated from now on
    joining = DraftContext(rows=[7], tokens=[[3, 4, 3, 4]], prompt_lens=[2])
    drafter.join(joining)
    both = DraftContext(rows=[0, 7], tokens=[[1, 2, 1, 2, 1], [3, 4, 3, 4]], prompt_lens=[2, 2])
    both.extras["vision_score"] = [0.9, 0.9]
    trees = drafter.propose(both)
    assert [t.skipped for t in trees] == [True, False]
    assert trees[1].tokens == [3, 4]  # SAM: what followed the first 4
