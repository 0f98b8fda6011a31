"""Epoch plans: which samples form which micro-batch, bucketed by latent shape (T, H, W).

The plan depends only on (sample shapes, seed, epoch, bucketing rule) — never on the dp
size or gradient accumulation — so the global sequence of micro-batches is one fixed
stream that any number of dp ranks can cut into steps, and a resumed run (on any dp size)
continues it exactly. Every sample appears in exactly one micro-batch per epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Shape = tuple[int, int, int]  # latent (T, H, W)


@dataclass(frozen=True)
class BucketRule:
    """Micro-batch size per bucket: fixed, or scaled so each micro-batch holds ~tokens_per_microbatch tokens."""

    patch: tuple[int, int, int]
    micro_batch_size: int = 1
    tokens_per_microbatch: int = 0
    max_micro_batch: int = 0

    def tokens(self, shape: Shape) -> int:
        return math.prod(s // p for s, p in zip(shape, self.patch))

    def batch_size(self, shape: Shape) -> int:
        if self.tokens_per_microbatch <= 0:
            return self.micro_batch_size
        size = max(1, self.tokens_per_microbatch // self.tokens(shape))
        return min(size, self.max_micro_batch) if self.max_micro_batch > 0 else size

    def fits(self, shape: Shape) -> bool:
        return all(s % p == 0 for s, p in zip(shape, self.patch))


def _windows(shard_order: np.ndarray, shuffle_shards: int) -> list[np.ndarray]:
    if shuffle_shards <= 0:
        return [shard_order]
    return [shard_order[i:i + shuffle_shards] for i in range(0, len(shard_order), shuffle_shards)]


def plan_epoch(shapes: list[Shape], shard_of: np.ndarray, rule: BucketRule, seed: int, epoch: int,
               shuffle_shards: int = 0) -> list[list[int]]:
    """Micro-batches (lists of sample ids) of one epoch, all samples of a micro-batch sharing a shape.

    Shards are visited in a seeded order, samples shuffled within windows of `shuffle_shards`
    shards (0 = the whole dataset), and streamed into per-shape buckets; a bucket is emitted
    when full. Partial buckets are carried across windows and flushed at the epoch end, so
    nothing is dropped.
    """
    rng = np.random.default_rng([seed, 40961, epoch])
    num_shards = int(shard_of.max()) + 1 if len(shard_of) else 0
    by_shard = [np.flatnonzero(shard_of == s) for s in range(num_shards)]
    pending: dict[Shape, list[int]] = {}
    plan: list[list[int]] = []
    for window in _windows(rng.permutation(num_shards), shuffle_shards):
        ids = np.concatenate([by_shard[s] for s in window]) if len(window) else np.empty(0, int)
        for i in rng.permutation(ids):
            shape = shapes[i]
            bucket = pending.setdefault(shape, [])
            bucket.append(int(i))
            if len(bucket) == rule.batch_size(shape):
                plan.append(bucket)
                pending[shape] = []
    plan += [pending[s] for s in sorted(pending) if pending[s]]
    return plan
