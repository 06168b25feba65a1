"""Sampling (temperature > 0) is lossless: a method's output distribution equals `ar`'s.

One fixed prompt, hundreds of seeds (rows of one batch), two-sample chi-square over the tokens
generated after the first (the first comes from prefill, before any draft). The same test
must reject a deliberately wrong acceptance rule, or passing it would mean nothing.
"""

from __future__ import annotations

import collections

import pytest
import torch
from PIL import Image

import mmspec.methods.engine as engine_module
from mmspec.methods.accept import Acceptance
from mmspec.methods.base import DraftContext, Drafter
from mmspec.methods.engine import Engine
from mmspec.methods.registry import get_drafter
from mmspec.methods.tree import DraftTree
from mmspec.models.loader import load_target
from mmspec.models.target import Target
from tests.conftest import contract_methods

N = 400
# The trained tiny-llava on this prompt: at 0.1 one token takes all, at 1.0 the mass spreads
# over hundreds; at 0.3 the top token has ~20% at the first position after prefill.
TEMPERATURE = 0.3
POSITIONS = (1, 2, 3)
ALPHA = 1e-3


@pytest.fixture(scope="module")
def target() -> Target:
    # acceptance must decide a lot of mass: drafts of a common token, several tokens likely
    return load_target("tiny-llava")


def red_circle_prompt() -> tuple[list[dict], Image.Image]:
    """The one prompt of the sampling tests: a red image and a repetitive phrase."""
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "the red circle is next to the red circle is next to"},
            ],
        }
    ]
    return conv, Image.new("RGB", (112, 112), (200, 30, 30))


def _sample(target: Target, drafter: str | Drafter, seed0: int) -> list[list[int]]:
    conv, image = red_circle_prompt()
    if isinstance(drafter, str):
        drafter = get_drafter(drafter)()
    engine = Engine(target, drafter)
    seeds = list(range(seed0, seed0 + N))
    results = engine.generate([conv] * N, [image] * N, 6, TEMPERATURE, seeds)
    return [r.tokens for r in results]


def chi2_two_sample_p(a: list[int], b: list[int], min_count: int = 10) -> float:
    """p-value that samples a and b come from one distribution (rare tokens pooled)."""
    ca, cb = collections.Counter(a), collections.Counter(b)
    keys = [k for k in ca.keys() | cb.keys() if ca[k] + cb[k] >= min_count]
    rows = [[ca[k] for k in keys], [cb[k] for k in keys]]
    rows[0].append(len(a) - sum(rows[0]))
    rows[1].append(len(b) - sum(rows[1]))
    table = torch.tensor(rows, dtype=torch.float64)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(table.shape[1] - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def _min_p(x: list[list[int]], y: list[list[int]]) -> float:
    return min(
        chi2_two_sample_p([t[p] for t in x if len(t) > p], [t[p] for t in y if len(t) > p])
        for p in POSITIONS
    )


@pytest.fixture(scope="module")
def reference(target: Target) -> list[list[int]]:
    return _sample(target, "ar", seed0=10_000)


@pytest.mark.parametrize("method", ["ar", *contract_methods()])
def test_method_matches_ar_distribution(target, reference, method: str) -> None:
    got = _sample(target, method, seed0=0)
    assert _min_p(got, reference) > ALPHA / len(POSITIONS)


class FixedChain(Drafter):
    """Always drafts the same token: a common one, so acceptance decides a lot of mass."""

    def __init__(self, token: int) -> None:
        self.token = token

    def propose(self, ctx: DraftContext) -> list[DraftTree]:
        return [DraftTree.chain([self.token]) for _ in ctx.rows]


def _doubled_acceptance(tree: DraftTree, logits, temperature, generator) -> Acceptance:
    """A plausible bug: accept a draft with probability 2 p(x) instead of p(x)."""
    p = torch.softmax(logits[0].float() / temperature, dim=-1)
    if tree.tokens and torch.rand((), generator=generator) < 2 * p[tree.tokens[0]]:
        q = torch.softmax(logits[1].float() / temperature, dim=-1)
        return Acceptance([0], [tree.tokens[0], int(torch.multinomial(q, 1, generator=generator))])
    return Acceptance([], [int(torch.multinomial(p, 1, generator=generator))])


def test_a_wrong_acceptance_rule_is_detected(target, reference, monkeypatch) -> None:
    # the top token where acceptance decides much mass (~20%): doubling it is plain to see
    common = collections.Counter(t[1] for t in reference).most_common(1)[0][0]
    right = _sample(target, FixedChain(common), seed0=0)
    assert _min_p(right, reference) > ALPHA / len(POSITIONS)  # the drafter itself is fine

    monkeypatch.setattr(engine_module, "accept_sampling", _doubled_acceptance)
    wrong = _sample(target, FixedChain(common), seed0=0)
    assert _min_p(wrong, reference) < ALPHA / len(POSITIONS)
