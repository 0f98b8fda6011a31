"""Does a trained DiT model motion, and the caption's direction? Denoising loss on altered clips.

The same clips, noise and timesteps are scored four ways:
  real      the clip with its caption;
  reversed  the clip played backwards (= moving the opposite way), same caption;
  static    every frame replaced by the first one;
  opposite  the real clip with the caption's direction word swapped for its opposite.
A model that follows the direction word has loss(real) < loss(reversed) and
loss(real) < loss(opposite); one that sees clips as near-still has loss(static) <= loss(real).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from megasora.config import Config
from megasora.data.synthetic import CaptionEmbeddings, render_clip
from megasora.diffusion.flow import masked_mse, noise_batch

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def opposite_caption(caption: str) -> str:
    words = caption.split()
    return " ".join(words[:-1] + [OPPOSITE[words[-1]]])


def _variants(cfg: Config, ids: list[int]) -> dict[str, tuple[torch.Tensor, list[str]]]:
    d = cfg.data
    clips, captions = zip(*(render_clip(cfg.train.seed, i, d.frames, d.height, d.width) for i in ids))
    real = torch.from_numpy(np.stack(clips))  # (B, 3, T, H, W)
    static = real[:, :, :1].expand_as(real).contiguous()
    return {"real": (real, list(captions)), "reversed": (real.flip(2), list(captions)),
            "static": (static, list(captions)),
            "opposite": (real, [opposite_caption(c) for c in captions])}


@torch.no_grad()
def probe_losses(model: nn.Module, cfg: Config, num_clips: int = 256, batch: int = 32,
                 step: int = 10 ** 6) -> dict[str, float]:
    """Mean velocity loss per variant over clips 0..num_clips-1; noise drawn at a `step` never trained on."""
    table = CaptionEmbeddings(cfg.text.path, cfg.text.max_length)
    # Every clip keeps its caption and is noised whole (no conditioning frames), whatever the run trained with.
    diffusion = dataclasses.replace(cfg.diffusion, caption_dropout=0.0, cond_frames_prob=0.0,
                                    cond_masks=type(cfg.diffusion.cond_masks)())
    totals: dict[str, float] = {}
    for start in range(0, num_clips, batch):
        ids = list(range(start, min(start + batch, num_clips)))
        for name, (x0, captions) in _variants(cfg, ids).items():
            text, mask = table.lookup(captions)
            noised = noise_batch(x0, torch.tensor(ids), step, cfg.train.seed, diffusion, cfg.model.patch_size)
            pred = model(noised.x_t, noised.t_tokens, text, mask, None)
            loss = masked_mse(pred, noised.target, noised.loss_mask).item()
            totals[name] = totals.get(name, 0.0) + loss * len(ids)
    return {name: total / num_clips for name, total in totals.items()}
