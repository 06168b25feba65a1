"""The contract of every method: greedy output equals `ar` token for token.

Every registered method, both tiny architectures, batch sizes 1, 2 and 4, the synthetic suite
and real MMSpec testmini samples (multi-turn included).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import pytest

from mmspec.orchestrator.runner import ShardRunner
from mmspec.orchestrator.shards import Shard
from mmspec.results.cells import Cell, ModelConfig
from mmspec.results.schema import ResultRow
from mmspec.workloads import Sample, load_mmspec, synthetic_suite
from tests.conftest import contract_methods, mmspec_split

MODELS = ["tiny-qwen2.5-vl", "tiny-llava"]
BATCH_SIZES = (1, 2, 4)
MAX_NEW_TOKENS = 40


def _mini_samples() -> list[Sample]:
    """Two samples per topic of MMSpec testmini, the multi-turn ones first."""
    samples = load_mmspec(mmspec_split("testmini"))
    by_topic: dict[str, list[Sample]] = collections.defaultdict(list)
    for s in sorted(samples, key=lambda s: -len(s.turns)):
        if len(by_topic[s.topic]) < 2:
            by_topic[s.topic].append(s)
    picked = [s for group in by_topic.values() for s in group]
    assert any(len(s.turns) > 1 for s in picked)
    return picked


WORKLOADS: dict[str, Callable[[], list[Sample]]] = {
    "synthetic": lambda: synthetic_suite(per_topic=2, seed=0),
    "mmspec-testmini": _mini_samples,
}


class Runs:
    """Runners and results cached per model: each (model, method) is loaded once."""

    def __init__(self, model: str) -> None:
        self.model = ModelConfig(model)
        self._runners: dict[str, ShardRunner] = {}
        self._rows: dict[tuple[str, str, int], list[ResultRow]] = {}

    def rows(self, method: str, workload: str, batch_size: int) -> list[ResultRow]:
        key = (method, workload, batch_size)
        if key not in self._rows:
            if method not in self._runners:
                self._runners[method] = ShardRunner(self.model, method, {}, threads=1)
            cell = Cell(
                "c", self.model, method, {}, batch_size, 0.0, 0, 0, MAX_NEW_TOKENS, workload
            )
            samples = tuple(WORKLOADS[workload]())
            self._rows[key] = self._runners[method].run(Shard("run", "s", cell, samples))
        return self._rows[key]


@pytest.fixture(scope="module", params=MODELS)
def runs(request: pytest.FixtureRequest) -> Runs:
    return Runs(request.param)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("method", contract_methods())
def test_greedy_output_equals_ar(runs: Runs, method: str, workload: str) -> None:
    base = {(r.sample_id, r.turn): r for r in runs.rows("ar", workload, 1)}
    samples = WORKLOADS[workload]()
    assert set(base) == {(s.id, t) for s in samples for t in range(len(s.turns))}
    assert all(r.status == "ok" for r in base.values())
    accepted = 0
    for bs in BATCH_SIZES:
        for reference in ("ar", method):
            rows = runs.rows(reference, workload, bs)
            assert all(r.status == "ok" for r in rows), [r.error for r in rows if r.error]
            got = {(r.sample_id, r.turn): r.output_tokens for r in rows}
            assert got == {k: r.output_tokens for k, r in base.items()}, (reference, bs)
            if reference == method:
                accepted += sum(r.accepted_tokens for r in rows)
    # a method that never accepts a draft would pass trivially and prove nothing
    assert accepted > 0, f"{method} accepted no draft on {runs.model.id} / {workload}"
