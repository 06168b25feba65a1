"""Topic filter and evenly spread limit, shared by every workload source."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import WorkloadError
from .sample import TOPICS, Sample


def check_limit(limit: int | None, source: str) -> None:
    """Reject a limit that is not a positive int (bool is an int in Python, so say no to it)."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise WorkloadError(f"{source}: limit must be a positive integer, got {limit!r}")
    if limit < 1:
        raise WorkloadError(f"{source}: limit must be a positive integer, got {limit}")


def filter_topics(
    samples: Sequence[Sample], topics: Sequence[str] | None, source: str
) -> list[Sample]:
    """Keep the samples of the given topics, in their original order.

    Every requested topic must have samples: a typo would otherwise silently shrink the run.
    """
    if topics is None:
        return list(samples)
    if isinstance(topics, str):
        # A bare string would be iterated character by character.
        raise WorkloadError(f"{source}: topics must be a list of topic names, got {topics!r}")
    present = list(dict.fromkeys(s.topic for s in samples))
    for topic in topics:
        if topic in present:
            continue
        if topic in TOPICS:
            raise WorkloadError(
                f"{source}: topic {topic!r} in the topics filter has no samples; "
                f"topics present: {present}"
            )
        raise WorkloadError(
            f"{source}: unknown topic {topic!r} in the topics filter; allowed: {present} "
            f"(MMSpec topics: {list(TOPICS)})"
        )
    wanted = set(topics)
    return [s for s in samples if s.topic in wanted]


def spread_limit(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """At most `limit` samples, taken round-robin over topics (in order of first appearance).

    Round-robin keeps a small run representative: limit=12 on six topics gives two of each
    instead of twelve of the first topic. A topic with too few samples leaves its share to the
    others. The chosen samples keep their original (file) order, so the result is the same on
    every call and a prefix of a larger limit's result per topic.
    """
    if limit is None or limit >= len(samples):
        return list(samples)
    by_topic: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        by_topic.setdefault(sample.topic, []).append(index)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for indices in by_topic.values():
            if depth < len(indices):
                chosen.append(indices[depth])
                if len(chosen) == limit:
                    break
        depth += 1
    return [samples[i] for i in sorted(chosen)]
