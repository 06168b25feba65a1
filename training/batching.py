"""The training data stream: seeded training-split scenes in length-sorted batches.

Batches are built from length-sorted pools under a token budget, so short VQA answers and long
multi-turn chats do not waste compute on padding.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from PIL import Image

from mmspec.training.encoding import Encoder, Example
from mmspec.training.tiny_config import TrainConfig
from mmspec.workloads.sample import TOPICS
from mmspec.workloads.synthetic import Scene, synthetic_scenes


class Stream:
    """An endless, seeded stream of training-split scenes, drawn topic by topic by weight.

    Pictures are drawn straight to pixels: the suite's PNG bytes decode to the same pixels,
    and skipping the round trip halves the cost of a training example.
    """

    def __init__(self, mix: dict[str, float], seed: int, data_seed: int) -> None:
        unknown = sorted(set(mix) - set(TOPICS))
        if unknown:
            raise ValueError(f"unknown topics in mix: {unknown}; allowed: {list(TOPICS)}")
        self._topics = [t for t in TOPICS if mix.get(t, 0) > 0]
        self._weights = [mix[t] for t in self._topics]
        self._rng = random.Random(f"mmspec-train-tiny:{seed}")
        self._data_seed = data_seed
        self._next_index = dict.fromkeys(self._topics, 0)  # per topic: first unused scene

    def take(self, n: int) -> list[tuple[Scene, Image.Image]]:
        topics = self._rng.choices(self._topics, self._weights, k=n)
        scenes: list[Scene] = []
        for topic in self._topics:
            k = topics.count(topic)
            if k:
                start = self._next_index[topic]
                self._next_index[topic] += k
                found = synthetic_scenes(k, self._data_seed, [topic], "train", start)
                scenes += [scene for _, scene in found]
        self._rng.shuffle(scenes)
        return [(scene, scene.picture.draw()) for scene in scenes]


def batches(
    encoder: Encoder, stream: Stream, budget: int, pool_batches: int, rng: random.Random
) -> Iterator[list[Example]]:
    """Batches of similar length under a padded-token budget, in shuffled order."""
    while True:
        # a pool's size in examples, guessed from the mean length seen so far
        pool: list[Example] = []
        padded = 0
        while padded < budget * pool_batches:
            examples = [encoder.encode(scene, image) for scene, image in stream.take(32)]
            pool += examples
            padded += sum(len(e.input_ids) for e in examples)
        out = pack_by_length(pool, lambda e: len(e.input_ids), budget)
        rng.shuffle(out)
        yield from out


T = TypeVar("T")


def pack_by_length(items: Sequence[T], length: Callable[[T], int], budget: int) -> list[list[T]]:
    """Items sorted by length, cut into batches whose padded size (rows x longest) stays
    within `budget` tokens (an item longer than the budget goes alone)."""
    out: list[list[T]] = []
    current: list[T] = []
    for item in sorted(items, key=length):
        if current and (len(current) + 1) * length(item) > budget:
            out.append(current)
            current = []
        current.append(item)
    if current:
        out.append(current)
    return out


class BatchSource(torch.utils.data.IterableDataset):
    """The batch stream of a config, so a DataLoader worker can draw while the model trains."""

    def __init__(self, encoder: Encoder, config: TrainConfig) -> None:
        self.encoder = encoder
        self.config = config

    def __iter__(self) -> Iterator[list[Example]]:
        c = self.config
        stream = Stream(c.mix, c.seed, c.data_seed)
        order = random.Random(f"mmspec-train-tiny-order:{c.seed}")
        return batches(self.encoder, stream, c.token_budget, c.pool_batches, order)
