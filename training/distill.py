"""Self-distillation data for draft heads: the target's own greedy answers on training prompts.

A draft head should predict what its target says, not what a reference answer says, so each
training conversation of the synthetic suite's *training* split is answered by the target
itself, turn by turn (each turn sees the target's earlier answers, as at inference). One
pass per target serves every drafter. Records hold the scene's address (topic, index, data
seed) instead of pixels: the picture is redrawn from it, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from mmspec.models.target import Target
from mmspec.training.encoding import training_messages
from mmspec.workloads.sample import TOPICS
from mmspec.workloads.synthetic import Scene, synthetic_scenes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    per_topic: int = 150
    data_seed: int = 7  # a seed the zoo's own training stream never drew from
    max_new_tokens: int = 320
    batch_size: int = 16
    topics: tuple[str, ...] = TOPICS


@dataclass
class Record:
    """One distilled conversation: where its scene is, and the target's answer to each turn."""

    topic: str
    index: int
    data_seed: int
    answers: list[str]

    def scene(self) -> Scene:
        ((_, scene),) = synthetic_scenes(1, self.data_seed, [self.topic], "train", self.index)
        return replace(scene, references=tuple(self.answers), grounded=((),) * len(self.answers))


def distill(target: Target, config: DistillConfig) -> list[Record]:
    """Answer `per_topic` training conversations per topic with the target (greedy)."""
    from mmspec.methods.engine import Engine
    from mmspec.methods.registry import get_drafter

    engine = Engine(target, get_drafter("ar")())
    records: list[Record] = []
    start = time.perf_counter()
    for topic in config.topics:
        found = synthetic_scenes(config.per_topic, config.data_seed, [topic], "train")
        scenes = [scene for _, scene in found]
        for lo in range(0, len(scenes), config.batch_size):
            batch = scenes[lo : lo + config.batch_size]
            images = [s.picture.draw() for s in batch]
            answers: list[list[str]] = [[] for _ in batch]
            for turn in range(max(len(s.turns) for s in batch)):
                live = [i for i, s in enumerate(batch) if turn < len(s.turns)]
                convs = [training_messages(batch[i].turns[: turn + 1], answers[i]) for i in live]
                with torch.inference_mode():
                    results = engine.generate(
                        convs, [images[i] for i in live], config.max_new_tokens
                    )
                for i, r in zip(live, results, strict=True):
                    answers[i].append(target.decode(r.tokens).strip())
            records += [
                Record(topic, lo + i, config.data_seed, answers[i]) for i in range(len(batch))
            ]
        log.info(
            "distilled %s: %d records (%.0f s)", topic, len(records), time.perf_counter() - start
        )
    return records


def data_key(target_name: str, config: DistillConfig, weights_sha: str) -> str:
    """A name for the data of one target + config (changes when either does)."""
    blob = json.dumps([target_name, asdict(config), weights_sha], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def save_records(records: Sequence[Record], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # per process: two trainings of one target may distil at once (same bytes, own temp file)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
    tmp.replace(path)


def load_records(path: Path) -> list[Record]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(Record(**json.loads(line)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: not a distillation record ({exc})") from exc
    return records
