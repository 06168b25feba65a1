"""What was measured, as one hash: recorded in every run's manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from .sample import Sample


def workload_sha256(samples_by_workload: Mapping[str, Sequence[Sample]]) -> str:
    """Hash of what was measured: workload names, sample ids, turns and image bytes, in order.

    Every part is length-prefixed so two different workloads can never hash alike by shifting
    bytes from one field to the next.
    """
    digest = hashlib.sha256()

    def put(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for name in sorted(samples_by_workload):
        put(name.encode())
        for sample in samples_by_workload[name]:
            put(sample.id.encode())
            put("\x1f".join(sample.turns).encode())
            put(sample.image_bytes or b"")
    return digest.hexdigest()
