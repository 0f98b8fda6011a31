"""Rectified flow: x_t = (1 - t) x0 + t eps, the model predicts the velocity eps - x0.

All randomness (timestep, noise, caption dropout, conditioning frames) is drawn from a
generator seeded by (seed, global sample id, step). A sample therefore gets the same noise
whichever rank, layout or resume point processes it — what makes parallel == single and
exact resume hold without shipping RNG state around.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megasora.config import DiffusionConfig
from megasora.diffusion.masks import draw_frame_mask, latent_frame_mask, mask_probabilities, per_token_timesteps


def sample_generator(seed: int, sample_id: int, step: int) -> torch.Generator:
    mixed = (seed * 1_000_003 + sample_id) * 1_000_033 + step
    return torch.Generator().manual_seed(mixed % (2 ** 63))


def resolution_shift(num_tokens: int, cfg: DiffusionConfig) -> float:
    """Larger / longer clips need more noise to destroy the same structure: shift ~ sqrt(tokens/base)."""
    return min(max(math.sqrt(num_tokens / cfg.shift_base_tokens), 1.0), cfg.max_shift)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Monotone map of [0, 1] onto itself that pushes t towards 1 (noise) for shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class NoisedBatch:
    x_t: torch.Tensor            # (B, C, T, H, W) model input
    target: torch.Tensor         # (B, C, T, H, W) velocity eps - x0
    t_tokens: torch.Tensor       # (B,) or per-token (B, N) timesteps fed to the model
    loss_mask: torch.Tensor      # (B, 1, T, 1, 1) 1 where the loss counts (not conditioning frames)
    drop_text: torch.Tensor      # (B,) bool


def noise_batch(x0: torch.Tensor, ids: torch.Tensor, step: int, seed: int, cfg: DiffusionConfig,
                patch: tuple[int, int, int]) -> NoisedBatch:
    """Draw per-sample t, noise, caption dropout and conditioning mask; build x_t and the target.

    Conditioning frames (megasora/diffusion/masks.py) are given clean with t = 0 on their
    tokens and are left out of the loss.
    """
    b, c, frames, h, w = x0.shape
    pt, ph, pw = patch
    num_tokens = (frames // pt) * (h // ph) * (w // pw)
    shift = resolution_shift(num_tokens, cfg)
    probs = mask_probabilities(cfg)
    noise = torch.empty_like(x0, dtype=torch.float32)
    t = torch.empty(b)
    drop = torch.zeros(b, dtype=torch.bool)
    cond = torch.zeros(b, frames // pt, dtype=torch.bool)  # (B, T') token frames given clean
    for i, sample_id in enumerate(ids.tolist()):
        g = sample_generator(seed, sample_id, step)
        t[i] = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn((), generator=g))
        noise[i] = torch.randn(x0.shape[1:], generator=g)
        uniforms = torch.rand(2, generator=g)
        drop[i] = uniforms[0] < cfg.caption_dropout
        cond[i] = draw_frame_mask(float(uniforms[1]), g, frames // pt, probs)
    t = shift_timesteps(t, shift)

    t_frames = torch.where(latent_frame_mask(cond, pt), 0.0, t[:, None])  # (B, T) per latent frame
    t_bcast = t_frames[:, None, :, None, None].to(device=x0.device, dtype=x0.dtype)  # (B, 1, T, 1, 1)
    x_t = (1 - t_bcast) * x0 + t_bcast * noise.to(device=x0.device, dtype=x0.dtype)
    loss_mask = (t_bcast > 0).to(x0.dtype)
    t_model = per_token_timesteps(t, cond, (h // ph) * (w // pw)) if cond.any() else t
    return NoisedBatch(x_t, noise.to(device=x0.device, dtype=x0.dtype) - x0, t_model.to(x0.device),
                       loss_mask, drop.to(x0.device))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the elements where mask is 1 (mask broadcasts over pred)."""
    err = (pred.float() - target.float()).pow(2) * mask
    denom = mask.expand_as(pred).sum().clamp_min(1)
    return err.sum() / denom
