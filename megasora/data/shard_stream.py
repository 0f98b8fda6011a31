"""Trainer batch source over `megasora preprocess` shards: bucketed, resumable, elastic in dp size.

The global stream is the concatenation of epoch plans (megasora/data/buckets.py): a fixed
sequence of micro-batches. A step takes the next dp_size * grad_accum of them and dp rank
r reads the r-th contiguous slice of grad_accum; tp/sp/pp ranks of one dp rank therefore
read identical samples. The position in the stream is the global sample counter, so
`steps(start_sample)` resumes exactly, on any dp size, as long as start_sample is a
micro-batch boundary (every counter this class ever reports is one).

A sample with several captions trains with one of them per step, drawn by data.caption_mix
from (seed, sample id, step) (megasora/data/captions.py caption_choice); the step is named by
the global sample counter at its end, which every layout and every resume shares. Only the
drawn caption's members are read.

Unreadable samples are skipped and counted (`stats()`); a micro-batch with no readable
sample is replaced by the next readable micro-batch of the stream, so every rank still
yields the same number of micro-batches per step.

With a `SpanCut` (sequence parallelism) each rank reads only its span's latent frames from the
shard (shards.read_latent_frames: C ranged reads inside the npy member), so no rank holds or
reads the whole clip; `clip_shape` keeps the whole clip's (T, H, W).
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch

from megasora.data.buckets import BucketRule, Shape, plan_epoch
from megasora.data.captions import caption_choice
from megasora.data.shards import (
    FIELDS,
    caption_count,
    caption_fields,
    decode_sample,
    finished_shards,
    read_latent_frames,
    read_member,
)
from megasora.data.stream import SpanCut, StepBatch
from megasora.errors import DataError

log = logging.getLogger("megasora.data")


@dataclass
class ShardIndex:
    """All finished shards of a directory; sample id = position in (sorted shard, file order)."""

    tars: list[Path]
    shard_of: np.ndarray  # (N,) shard number of each sample
    keys: list[str]
    spans: list[dict[str, list[int]]]  # per sample: field -> [offset, size] in its tar
    shapes: list[Shape]  # per sample: latent (T, H, W)

    @classmethod
    def load(cls, directory: str | Path, rule: BucketRule | None = None) -> "ShardIndex":
        tars, shard_of, keys, spans, shapes, dropped = [], [], [], [], [], 0
        for index_file in finished_shards(directory):
            entries = json.loads(index_file.read_text())["samples"]
            tars.append(index_file.with_suffix(".tar"))
            for e in entries:
                shape = tuple(e["shape"][1:])
                if rule is not None and not rule.fits(shape):
                    dropped += 1
                    continue
                if set(FIELDS) - set(e["members"]):
                    dropped += 1
                    continue
                shard_of.append(len(tars) - 1)
                keys.append(e["key"])
                spans.append(e["members"])
                shapes.append(shape)
        if dropped:
            log.warning("%s: %d samples left out (missing members, or latent shape not divisible by patch %s)",
                        directory, dropped, rule.patch if rule else None)
        if not keys:
            raise DataError(f"data.shards={str(directory)!r} holds no usable samples (no finished "
                            "shard-*.tar + shard-*.json pair)", "point data.shards at the output directory of "
                            "`megasora preprocess`, or run it first")
        return cls(tars, np.asarray(shard_of, dtype=np.int64), keys, spans, shapes)

    def __len__(self) -> int:
        return len(self.keys)


class ShardStream:
    """Yields this dp rank's `StepBatch`es; see the module docstring for the stream definition."""

    def __init__(self, index: ShardIndex, rule: BucketRule, seed: int, grad_accum: int, dp_rank: int,
                 dp_size: int, shuffle_shards: int = 0, prefetch: bool = True,
                 caption_mix: list[float] | None = None, cut: SpanCut | None = None) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.index, self.rule, self.seed = index, rule, seed
        self.grad_accum, self.dp_rank, self.dp_size = grad_accum, dp_rank, dp_size
        self.shuffle_shards = shuffle_shards
        self.prefetch = prefetch
        self.caption_mix = list(caption_mix or [])
        self.cut = cut  # None: whole clips
        self.corrupt_samples = 0
        self.substituted_microbatches = 0
        self._plans: dict[int, list[list[int]]] = {}
        self._handles: dict[int, BinaryIO] = {}

    @property
    def num_samples(self) -> int:
        return len(self.index)

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.index.shapes, self.index.shard_of, self.rule, self.seed,
                                             epoch, self.shuffle_shards)}  # keep one epoch in memory
        return self._plans[epoch]

    def micro_batches(self, start_sample: int = 0) -> Iterator[tuple[list[int], int]]:
        """Global stream from `start_sample`: (sample ids, global samples consumed after it)."""
        epoch, offset = divmod(start_sample, self.num_samples)
        plan, position, seen = self.plan(epoch), 0, 0
        while seen < offset:
            seen += len(plan[position])
            position += 1
        if seen != offset:
            raise ValueError(f"start_sample={start_sample} is not a micro-batch boundary of this dataset "
                             f"(seed={self.seed}, bucketing {self.rule}); resume with the counter the "
                             "checkpoint stored and the same data settings")
        consumed = start_sample
        while True:
            plan = self.plan(epoch)
            for ids in plan[position:]:
                consumed += len(ids)
                yield ids, consumed
            epoch, position = epoch + 1, 0

    def _step_jobs(self, start_sample: int) -> Iterator[tuple[Callable[[], list[dict]], int]]:
        """Per step: (a loader of this rank's micro-batches, global samples consumed after the step)."""
        per_step = self.dp_size * self.grad_accum
        stream = self.micro_batches(start_sample)
        while True:
            group = [next(stream) for _ in range(per_step)]
            mine = [ids for ids, _ in group[self.dp_rank * self.grad_accum:(self.dp_rank + 1) * self.grad_accum]]
            after = group[-1][1]
            yield partial(self._load_all, mine, after), after

    def _load_all(self, mine: list[list[int]], after: int) -> list[dict]:
        return [self._load_or_substitute(ids, after) for ids in mine]

    def steps(self, start_sample: int = 0) -> Iterator[StepBatch]:
        jobs = self._step_jobs(start_sample)
        if not self.prefetch:
            for job, after in jobs:
                yield StepBatch(job(), after)
            return
        # One step of read-ahead on a worker thread: tar reads + npy parsing overlap the train step.
        pool = ThreadPoolExecutor(1, thread_name_prefix="megasora-data")
        try:
            job, after = next(jobs)
            pending = (pool.submit(job), after)
            for job, after in jobs:
                upcoming = (pool.submit(job), after)
                yield StepBatch(pending[0].result(), pending[1])
                pending = upcoming
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, int]:
        """Counters for the trainer's metrics."""
        return {"data/corrupt_samples": self.corrupt_samples,
                "data/substituted_microbatches": self.substituted_microbatches}

    def _load_or_substitute(self, ids: list[int], after: int) -> dict[str, torch.Tensor]:
        batch = self.load(ids, after)
        if batch is not None:
            return batch
        # Nothing readable: take the next readable micro-batch after this step (deterministic).
        for tries, (other, _) in enumerate(self.micro_batches(after)):
            batch = self.load(other, after)
            if batch is not None:
                self.substituted_microbatches += 1
                log.warning("micro-batch %s unreadable; substituted %s", ids, other)
                return batch
            if tries > len(self.plan(0)):
                break
        raise RuntimeError(f"no readable micro-batch in a whole epoch of {self.index.tars[0].parent}")

    def load(self, ids: list[int], step_key: int = 0) -> dict[str, torch.Tensor] | None:
        """Read and stack samples (each with its caption for the step named `step_key`, the global
        sample counter at the step's end); unreadable ones are skipped and counted. None if none is readable."""
        latents, text_emb, text_mask, good = [], [], [], []
        for i in ids:
            try:
                sample = self._read(i, self.caption_of(i, step_key))
            except (OSError, ValueError, KeyError) as err:
                self.corrupt_samples += 1
                log.warning("skipping unreadable sample %s (%s): %s", self.index.keys[i],
                            self.index.tars[self.index.shard_of[i]], err)
                continue
            latents.append(torch.from_numpy(sample.latents))  # (C, T, H, W), or (C, T_span, H, W) with a cut
            text_emb.append(sample.text_emb)
            text_mask.append(sample.text_mask)
            good.append(i)
        if not good:
            return None
        clip = self.index.shapes[good[0]]  # one bucket: every sample of the micro-batch has this (T, H, W)
        return {"ids": torch.tensor(good, dtype=torch.long), "clip_shape": torch.tensor(clip),
                "latents": torch.stack(latents),  # copies the span's frames only
                "text_emb": torch.from_numpy(np.stack(text_emb)),
                "text_mask": torch.from_numpy(np.stack(text_mask))}

    def caption_of(self, i: int, step_key: int) -> int:
        """Which caption sample i trains with in the step named `step_key` (0 without data.caption_mix)."""
        return caption_choice(self.seed, i, step_key, self.caption_mix, caption_count(self.index.spans[i]))

    def _read(self, i: int, caption: int = 0, whole: bool = False):
        shard = int(self.index.shard_of[i])
        if shard not in self._handles:
            if len(self._handles) >= 32:  # bound open files on big datasets
                self._handles.pop(next(iter(self._handles))).close()
            self._handles[shard] = open(self.index.tars[shard], "rb")
        handle = self._handles[shard]
        emb_name, mask_name = caption_fields(caption)
        spans = self.index.spans[i]
        wanted = {"latents.npy": "latents.npy", "json": "json", emb_name: "text_emb.npy", mask_name: "text_mask.npy"}
        clip = self.index.shapes[i]
        frames = (0, clip[0]) if self.cut is None or whole else self.cut.frame_range(clip)
        if frames[1] - frames[0] < clip[0]:  # this sequence rank reads its span's frames only
            del wanted["latents.npy"]
        raw = {as_field: read_member(handle, spans[member]) for member, as_field in wanted.items()}
        rows = None if "latents.npy" in wanted else read_latent_frames(handle, spans["latents.npy"], frames)
        sample = decode_sample(self.index.keys[i], raw, latents=rows)
        if tuple(sample.latents.shape[1:]) != (frames[1] - frames[0], *clip[1:]):
            raise ValueError(f"latents shape {sample.latents.shape} != indexed {clip} (frames {frames})")
        return sample


def build_shard_stream(cfg, dp_rank: int, dp_size: int, cut: SpanCut | None = None) -> ShardStream:
    """The `data.kind=shards` source for a `megasora.config.Config`."""
    rule = BucketRule(patch=cfg.model.patch_size, micro_batch_size=cfg.train.micro_batch_size,
                      tokens_per_microbatch=cfg.data.tokens_per_microbatch,
                      max_micro_batch=cfg.data.max_micro_batch)
    index = ShardIndex.load(cfg.data.shards, rule)
    stream = ShardStream(index, rule, cfg.train.seed, cfg.train.grad_accum, dp_rank, dp_size,
                       cfg.data.shuffle_shards, caption_mix=cfg.data.caption_mix, cut=cut)
    check_compatible(stream, cfg.model.in_channels, cfg.text.dim)
    return stream


def check_compatible(stream: ShardStream, in_channels: int, text_dim: int) -> None:
    """Fail at start-up, not at step 1, if the shards were made with another VAE or text encoder."""
    sample = stream._read(0, whole=True)
    channels, dim = sample.latents.shape[0], sample.text_emb.shape[1]
    if channels != in_channels or dim != text_dim:
        raise DataError(f"shards in {stream.index.tars[0].parent} hold {channels}-channel latents and {dim}-d text "
                        f"embeddings but the config expects model.in_channels={in_channels}, text.dim={text_dim}",
                        "re-run `megasora preprocess` with this config's vae/text, or fix the config")
