"""ShardRunner: one loaded model + one drafter; turns a shard into result rows.

(Interface fixed; body being written by the engine owner.)
"""

from __future__ import annotations

from typing import Any

from mmspec.orchestrator.cells import ModelConfig, Shard
from mmspec.orchestrator.schema import ResultRow


class ShardRunner:
    """Loads the target and drafter once; `run` may be called for many shards of that pair.

    Every (sample, turn) of the shard yields exactly one row; a sample that fails (bad image,
    generation error) yields error rows and never raises.
    """

    def __init__(
        self,
        model: ModelConfig,
        method: str,
        method_args: dict[str, Any],
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        raise NotImplementedError

    def run(self, shard: Shard) -> list[ResultRow]:
        raise NotImplementedError
