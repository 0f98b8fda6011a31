"""The global sample stream and its split into per-rank micro-batches.

Samples are counted globally: position p of the stream maps to a sample id through a
per-epoch permutation seeded by (seed, epoch). Step k of a run that started at global
position s covers positions [s + k*G, s + (k+1)*G), G = the global batch; dp rank r takes
the r-th contiguous slice of it. Resuming at any position — with any dp size — continues
the same stream, so no sample is skipped or seen twice.

Under sequence parallelism a `SpanCut` cuts each decoded clip to the latent frames of this
rank's token span before samples are stacked, so a host batch never holds a whole clip; the
batch's `clip_shape` keeps the whole clip's latent (T, H, W) for the token grid and accounting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from megasora.models.patch import TokenSpan, patch_grid


@dataclass
class StepBatch:
    micro_batches: list[dict[str, torch.Tensor]]  # this dp rank's, in accumulation order
    samples_after: int                            # global samples consumed after this step


@dataclass(frozen=True)
class SpanCut:
    """The latent frames of this sequence rank's span of a clip (TokenSpan.latent_frames, the cut
    the model and the objective make): the only frames a data source reads or renders."""
    span_of: Callable[[tuple[int, int, int]], TokenSpan]  # the model's sequence hook's `span`
    patch: tuple[int, int, int]

    def span(self, clip: tuple[int, int, int]) -> TokenSpan:
        """This rank's tokens of a clip with latent (T, H, W) `clip`."""
        return self.span_of(patch_grid(clip, self.patch))

    def frame_range(self, clip: tuple[int, int, int]) -> tuple[int, int]:
        """[first, end) latent frames of the span: what a source reads from storage."""
        return self.span(clip).latent_frames(clip[0], self.patch[0])

    def frames(self, clip: tuple[int, int, int]) -> list[int]:
        """Latent frame numbers of the span: a source that renders frames independently renders only these."""
        return list(range(*self.frame_range(clip)))


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
