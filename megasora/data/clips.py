"""Pixel clips for `megasora train-vae`: decoded once into memory, served as fixed-size random crops.

VAE training needs pixels, not latents, and a fixed crop lets any micro-batch size stack
clips of different native sizes. The crop of sample i is a pure function of (seed, i), so
the lead's SampleStream (global counter, resumable, elastic in dp size) serves them as is.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from megasora.data.preprocess import collect_inputs
from megasora.data.video_io import clip_to_tensor, iter_clips
from megasora.errors import DataError

log = logging.getLogger("megasora.data")


def decode_all_clips(inputs: list[str], fps: float, frames: int, max_area: int, multiple: int,
                     max_clips_per_video: int = 0) -> list[np.ndarray]:
    """Every full clip of every readable input (uint8 (T, H, W, 3)); unreadable inputs are logged and skipped."""
    clips = []
    for path in collect_inputs(inputs):
        try:
            clips += [c.frames for c in iter_clips(path, fps, frames, max_area, multiple,
                                                   max_clips=max_clips_per_video) if len(c.frames) == frames]
        except Exception as err:  # corrupt media must not stop training
            log.warning("train-vae: skipping %s: %s: %s", path, type(err).__name__, err)
    return clips


class PixelClips:
    """load(ids) -> {"ids", "pixels" (B, 3, T, crop, crop) in [-1, 1]} for SampleStream."""

    def __init__(self, clips: list[np.ndarray], crop: int, seed: int) -> None:
        small = [c.shape[1:3] for c in clips if min(c.shape[1:3]) < crop]
        if not clips or small:
            raise DataError(f"train-vae needs clips at least {crop}x{crop}; got {len(clips)} clips, too small: "
                            f"{small[:3]}", "lower vae.train_crop or raise data.max_area; inputs shorter than "
                            "data.clip_frames frames give no clip")
        self.clips, self.crop, self.seed = clips, crop, seed

    def __len__(self) -> int:
        return len(self.clips)

    def __call__(self, ids: list[int]) -> dict[str, torch.Tensor]:
        crops = []
        for i in ids:
            clip = self.clips[i]
            rng = np.random.default_rng([self.seed, 104729, i])
            top = int(rng.integers(0, clip.shape[1] - self.crop + 1))
            left = int(rng.integers(0, clip.shape[2] - self.crop + 1))
            crops.append(clip_to_tensor(clip[:, top:top + self.crop, left:left + self.crop]))
        return {"ids": torch.tensor(ids, dtype=torch.long), "pixels": torch.stack(crops)}


def build_clip_source(cfg) -> PixelClips:
    """The data.kind=clips source (train-vae) for a `megasora.config.Config`."""
    d = cfg.data
    clips = decode_all_clips(list(d.inputs), d.fps, d.clip_frames, d.max_area, multiple=8)
    log.info("train-vae: %d clips of %d frames decoded from %d inputs", len(clips), d.clip_frames, len(d.inputs))
    return PixelClips(clips, cfg.vae.train_crop, cfg.train.seed)
