"""Request streams for engine tests: joins at chosen points of decoding, not of wall time.

`Engine.serve` admits what `arrivals` returns between steps. Releasing requests by the
engine's forward count (its heartbeat) instead of the clock makes every test run join rows at
the same steps, mid-batch, whatever the machine's speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmspec.methods.engine import Engine, Generation, Request


@dataclass
class StepSource:
    """Releases `per_release` requests each time the engine has made `every` more forwards
    (at once when nothing runs, so an idle engine never waits on itself)."""

    engine: Engine
    requests: list[Request]
    every: int = 2
    per_release: int = 1
    results: dict[int, Generation] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    released: int = 0
    running: int = 0
    joins_mid_batch: int = 0  # releases while other rows were decoding
    _mark: int = -1

    def arrivals(self, now_s: float) -> list[Request]:
        if self.released == len(self.requests):
            return []
        beat = self.engine.heartbeat
        if self.running and beat - self._mark < self.every:
            return []
        self.joins_mid_batch += self.running > 0
        self._mark = beat
        out = self.requests[self.released : self.released + self.per_release]
        self.released += len(out)
        self.running += len(out)
        return out

    def next_arrival_s(self) -> float | None:
        return 0.0 if self.released < len(self.requests) else None

    def finished(
        self, request: Request, result: Generation | None, error: str | None, now_s: float
    ) -> None:
        self.running -= 1
        if result is not None:
            self.results[request.id] = result
        if error is not None:
            self.errors[request.id] = error
