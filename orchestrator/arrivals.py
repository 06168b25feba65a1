"""Poisson arrival times of a serving stream (grid `scenario.poisson`).

The gaps are drawn once per (seed, requests) as standard exponential draws and only then
scaled by 1/rate, so every method and every rate of a grid replays the same pattern: a cell at
rate 2 sees the rate-1 stream played twice as fast, and two methods at one rate see identical
arrivals. The first request arrives after the first gap (not at 0), as in a Poisson process
observed from the moment the stream opens.
"""

from __future__ import annotations

import numpy as np


def arrival_times(seed: int, requests: int, rate: float) -> list[float]:
    """Seconds after the stream starts at which each of `requests` requests arrives
    (non-decreasing); `rate` is the mean arrivals per second."""
    if requests < 0:
        raise ValueError(f"requests must be >= 0, got {requests}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 arrivals per second, got {rate}")
    gaps = np.random.default_rng(seed).standard_exponential(requests)
    return (np.cumsum(gaps) / rate).tolist()
