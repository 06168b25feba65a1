"""Rows joining a trained head's running batch (continuous batching, `Drafter.join`).

The head's own cache gains the joining rows beside rows already fed, with any length on either
side (tests/test_serving_engine.py checks every method end to end with rows joining mid-batch);
here the cache merge on its own, and joins before the running rows were ever fed.
"""

from __future__ import annotations

import pytest
import torch

from mmspec.methods.engine import Engine, Request
from mmspec.methods.head_cache import DraftKV, feed
from mmspec.methods.head_config import DraftConfig
from mmspec.methods.registry import get_drafter
from mmspec.orchestrator.runner import conversation
from mmspec.workloads import synthetic_suite
from tests.serving import StepSource

# rows fed before the merge: (running rows' lengths, joining rows' lengths); [] = never fed
MERGES = {
    "fed-then-fresh": ([7, 3], []),  # how the engine joins: the joiners have nothing fed
    "fresh-then-fed": ([], [5]),
    "longer-then-shorter": ([7, 3], [2]),
    "shorter-then-longer": ([2], [6, 4]),
    "fresh-then-fresh": ([], []),  # a join right after `begin`
}


@pytest.fixture(scope="module")
def head(tiny_targets) -> torch.nn.Module:
    torch.manual_seed(0)
    config = DraftConfig.for_target("eagle", tiny_targets["tiny-llava"])
    return get_drafter("eagle").head_cls(config).eval()


def _feed(kv: DraftKV, head: torch.nn.Module, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Feed per-row inputs (n_i, h) into `kv`; each row's real outputs."""
    counts = [p.shape[0] for p in parts]
    x = torch.zeros(len(parts), max(counts), parts[0].shape[1])
    for i, p in enumerate(parts):
        x[i, : p.shape[0]] = p
    pos = kv.next_pos[:, None] + torch.arange(max(counts))[None]
    out = feed(kv, lambda a, p, m: head.block(a, p, m, kv.cache), x, pos, counts)
    return [out[i, :c] for i, c in enumerate(counts)]


@pytest.mark.parametrize("merge", MERGES)
def test_merged_rows_see_only_their_own_slots(head, merge: str) -> None:
    running, joining = MERGES[merge]
    h = head.config.hidden_size
    size = max(len(running), 1), max(len(joining), 1)
    torch.manual_seed(1)
    before = [[torch.randn(n, h) for n in lens] for lens in (running, joining)]
    after = [torch.randn(n, h) for n in (4, 1, 3, 2)[: sum(size)]]

    with torch.no_grad():
        sides = [DraftKV(n, torch.device("cpu")) for n in size]
        for kv, parts in zip(sides, before):
            if parts:
                _feed(kv, head, parts)
        merged = sides[0]
        merged.extend(sides[1])
        assert merged.valid.shape == (sum(size), max(s.length for s in sides))
        together = _feed(merged, head, after)

        for i in range(sum(size)):
            alone = DraftKV(1, torch.device("cpu"))
            side, row = (0, i) if i < size[0] else (1, i - size[0])
            if before[side]:
                _feed(alone, head, [before[side][row]])
            assert torch.allclose(together[i], _feed(alone, head, [after[i]])[0], atol=1e-5)


@pytest.mark.parametrize("method", ["eagle2", "vispec", "msd", "medusa"])
def test_rows_joining_before_the_first_step_keep_greedy_outputs(tiny_targets, method) -> None:
    """Every request released at once, one per admission: rows join a batch whose drafter has
    begun but never proposed, then mid-batch as rows finish."""
    target = tiny_targets["tiny-llava"]
    samples = synthetic_suite(per_topic=1, seed=0)[:5]
    convs = [conversation(s, [], True) for s in samples]
    images = [s.load_image() for s in samples]
    ar = Engine(target, get_drafter("ar")())
    expected = [ar.generate([c], [i], 24)[0].tokens for c, i in zip(convs, images)]
    engine = Engine(target, get_drafter(method)())
    requests = [Request(k, c, i, 0.0) for k, (c, i) in enumerate(zip(convs, images))]
    source = StepSource(engine, requests, every=0, per_release=1)
    engine.serve(source, 3, 24)
    assert source.joins_mid_batch >= 3
    assert [source.results[k].tokens for k in range(len(requests))] == expected
    assert sum(r.accepted for r in source.results.values()) > 0
