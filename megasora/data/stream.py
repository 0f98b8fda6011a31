"""The global sample stream and its split into per-rank micro-batches.

Samples are counted globally: position p of the stream maps to a sample id through a
per-epoch permutation seeded by (seed, epoch). Step k of a run that started at global
position s covers positions [s + k*G, s + (k+1)*G), G = the global batch; dp rank r takes
the r-th contiguous slice of it. Resuming at any position — with any dp size — continues
the same stream, so no sample is skipped or seen twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch


@dataclass
class StepBatch:
    micro_batches: list[dict[str, torch.Tensor]]  # this dp rank's, in accumulation order
    samples_after: int                            # global samples consumed after this step


def stream_ids(seed: int, num_samples: int, start: int, count: int) -> list[int]:
    """Sample ids at global stream positions [start, start + count)."""
    ids = []
    cache: dict[int, np.ndarray] = {}
    for pos in range(start, start + count):
        epoch, offset = divmod(pos, num_samples)
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([seed, 7919, epoch]).permutation(num_samples)
        ids.append(int(cache[epoch][offset]))
    return ids


class SampleStream:
    """Cuts the global stream into steps and hands this dp rank its micro-batches."""

    def __init__(self, load: Callable[[list[int]], dict[str, torch.Tensor]], num_samples: int, seed: int,
                 micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int) -> None:
        self.load = load
        self.num_samples = num_samples
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    def steps(self, start_sample: int = 0) -> Iterator[StepBatch]:
        position = start_sample
        per_rank = self.micro_batch_size * self.grad_accum
        while True:
            ids = stream_ids(self.seed, self.num_samples, position + self.dp_rank * per_rank, per_rank)
            micro = [self.load(ids[i:i + self.micro_batch_size]) for i in range(0, per_rank, self.micro_batch_size)]
            position += self.global_batch
            yield StepBatch(micro, position)
