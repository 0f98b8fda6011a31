"""Build the configured data source as a per-rank SampleStream."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from megasora.config import Config
from megasora.data.clips import build_clip_source
from megasora.data.preprocess import collect_inputs
from megasora.data.shard_stream import build_shard_stream
from megasora.data.shards import finished_shards
from megasora.data.stream import SampleStream, SpanCut
from megasora.data.synthetic import CaptionEmbeddings, render_clip
from megasora.errors import DataError, MissingPathError
from megasora.models.text import check_text_path
from megasora.models.vae import check_vae_path


class SyntheticVideos:
    """Loads synthetic clips by id as a micro-batch dict (latents are the RGB clip itself); with a
    `cut`, only the frames of this sequence rank's span are rendered (the same values)."""

    def __init__(self, cfg: Config, cut: SpanCut | None = None) -> None:
        self.seed = cfg.train.seed
        self.shape = (cfg.data.frames, cfg.data.height, cfg.data.width)
        self.frames = None if cut is None else cut.frames(self.shape)
        self.captions = CaptionEmbeddings(cfg.text.path, cfg.text.max_length)

    def __call__(self, ids: list[int]) -> dict[str, torch.Tensor]:
        clips, captions = zip(*(render_clip(self.seed, i, *self.shape, only=self.frames) for i in ids))
        text_emb, text_mask = self.captions.lookup(list(captions))
        return {"ids": torch.tensor(ids), "clip_shape": torch.tensor(self.shape),
                "latents": torch.from_numpy(np.stack(clips)), "text_emb": text_emb, "text_mask": text_mask}


def check_source(cfg: Config) -> None:
    """The configured data and the encoders training reads exist: checked before any process group,
    so a wrong path is one line."""
    d = cfg.data
    if d.kind == "synthetic" or cfg.train.sample_every:  # captions encoded at start-up / for previews
        check_text_path(cfg.text.path)
    if d.kind != "clips" and cfg.train.sample_every:  # previews decode through the VAE (train-vae, on
        check_vae_path(cfg.vae.path)                 # clips, writes vae.path instead of reading it)
    if d.kind == "shards":
        if not Path(d.shards).is_dir():
            raise MissingPathError(f"data.shards={d.shards!r} is not a directory",
                                   "point it at the output directory of `megasora preprocess`")
        if not finished_shards(d.shards):
            raise DataError(f"data.shards={d.shards!r} holds no finished shard (shard-*.tar + shard-*.json)",
                            "point it at the output directory of `megasora preprocess`, or run it first")
    if d.kind == "clips":
        if not collect_inputs(list(d.inputs)):
            raise DataError(f"data.inputs={list(d.inputs)} holds no video or image file",
                            "list video/image files or directories that contain them")


def build_stream(cfg: Config, dp_rank: int, dp_size: int, cut: SpanCut | None = None) -> Any:
    """This dp rank's stream; `cut`: latents (shards, synthetic) come cut to this sequence rank's span."""
    if cfg.data.kind == "shards":  # preprocessed real data: bucketed micro-batches (data/shard_stream.py)
        return build_shard_stream(cfg, dp_rank, dp_size, cut)
    if cfg.data.kind == "clips":  # pixels for train-vae (data/clips.py)
        clips = build_clip_source(cfg)
        return SampleStream(clips, len(clips), cfg.train.seed, cfg.train.micro_batch_size,
                            cfg.train.grad_accum, dp_rank, dp_size)
    if cfg.data.kind == "synthetic":
        load, num_samples = SyntheticVideos(cfg, cut), cfg.data.num_samples
    else:
        raise ValueError(f"data.kind={cfg.data.kind!r} has no source")
    return SampleStream(load, num_samples, cfg.train.seed, cfg.train.micro_batch_size,
                        cfg.train.grad_accum, dp_rank, dp_size)
