"""Rectified flow: x_t = (1 - t) x0 + t eps, the model predicts the velocity eps - x0.

All randomness (timestep, noise, caption dropout, conditioning frames) is drawn from a
generator seeded by (seed, global sample id, step), the noise of each token frame from its own
one (+ frame index). A sample therefore gets the same noise whichever rank, layout or resume
point processes it — what makes parallel == single and exact resume hold without shipping RNG
state around — and a sequence-parallel rank draws the noise of its own frames only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megasora.config import DiffusionConfig
from megasora.diffusion.masks import draw_frame_mask, latent_frame_mask, mask_probabilities, per_token_timesteps
from megasora.models.patch import TokenSpan


def sample_generator(seed: int, sample_id: int, step: int) -> torch.Generator:
    mixed = (seed * 1_000_003 + sample_id) * 1_000_033 + step
    return torch.Generator().manual_seed(mixed % (2 ** 63))


def frame_generator(seed: int, sample_id: int, step: int, frame: int) -> torch.Generator:
    """The noise stream of one token frame of one sample: a sequence rank draws the noise of
    its own frames only, and gets the values one process draws for them."""
    mixed = ((seed * 1_000_003 + sample_id) * 1_000_033 + step) * 1_000_037 + frame + 1
    return torch.Generator().manual_seed(mixed % (2 ** 63))


def resolution_shift(num_tokens: int, cfg: DiffusionConfig) -> float:
    """Larger / longer clips need more noise to destroy the same structure: shift ~ sqrt(tokens/base);
    diffusion.shift > 0 fixes it instead (Wan 2.1 was trained with one shift per resolution)."""
    if cfg.shift > 0:
        return cfg.shift
    return min(max(math.sqrt(num_tokens / cfg.shift_base_tokens), 1.0), cfg.max_shift)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Monotone map of [0, 1] onto itself that pushes t towards 1 (noise) for shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class SampleDraws:
    """Per-sample draws of a micro-batch (tiny: every sequence rank makes all of them)."""
    t: torch.Tensor     # (B,) shifted timesteps
    drop: torch.Tensor  # (B,) bool caption dropped
    cond: torch.Tensor  # (B, T') bool token frames given clean

    def frame_t(self) -> torch.Tensor:
        """(B, T') noising time of each token frame: 0 on conditioning frames."""
        return torch.where(self.cond, 0.0, self.t[:, None])


def draw_samples(ids: torch.Tensor, step: int, seed: int, cfg: DiffusionConfig,
                 grid: tuple[int, int, int]) -> SampleDraws:
    """t, caption dropout and conditioning mask of each sample, from (seed, sample id, step)."""
    b, token_frames = len(ids), grid[0]
    probs = mask_probabilities(cfg)
    t = torch.empty(b)
    drop = torch.zeros(b, dtype=torch.bool)
    cond = torch.zeros(b, token_frames, dtype=torch.bool)
    for i, sample_id in enumerate(ids.tolist()):
        g = sample_generator(seed, sample_id, step)
        t[i] = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn((), generator=g))
        uniforms = torch.rand(2, generator=g)
        drop[i] = uniforms[0] < cfg.caption_dropout
        cond[i] = draw_frame_mask(float(uniforms[1]), g, token_frames, probs)
    return SampleDraws(shift_timesteps(t, resolution_shift(math.prod(grid), cfg)), drop, cond)


def frame_noise(ids: torch.Tensor, step: int, seed: int, frame_shape: tuple[int, ...], frames: range) -> torch.Tensor:
    """fp32 noise (B, C, len(frames)*pt, H, W) of token frames `frames`; frame_shape = (C, pt, H, W)."""
    noise = torch.empty(len(ids), frame_shape[0], len(frames) * frame_shape[1], *frame_shape[2:])
    for i, sample_id in enumerate(ids.tolist()):
        for k, frame in enumerate(frames):
            rows = slice(k * frame_shape[1], (k + 1) * frame_shape[1])
            noise[i, :, rows] = torch.randn(frame_shape, generator=frame_generator(seed, sample_id, step, frame))
    return noise


def clip_grid(x0: torch.Tensor, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    _, _, frames, h, w = x0.shape
    return frames // patch[0], h // patch[1], w // patch[2]


@dataclass
class NoisedBatch:
    x_t: torch.Tensor            # (B, C, T, H, W) model input
    target: torch.Tensor         # (B, C, T, H, W) velocity eps - x0
    t_tokens: torch.Tensor       # (B,) or per-token (B, N) timesteps fed to the model
    loss_mask: torch.Tensor      # (B, 1, T, 1, 1) 1 where the loss counts (not conditioning frames)
    drop_text: torch.Tensor      # (B,) bool


def noise_batch(x0: torch.Tensor, ids: torch.Tensor, step: int, seed: int, cfg: DiffusionConfig,
                patch: tuple[int, int, int]) -> NoisedBatch:
    """Draw per-sample t, noise, caption dropout and conditioning mask; build x_t and the target
    of whole clips (training noises each rank's span with noise_span, the same values).

    Conditioning frames (megasora/diffusion/masks.py) are given clean with t = 0 on their
    tokens and are left out of the loss.
    """
    b, c, frames, h, w = x0.shape
    pt, ph, pw = patch
    grid = clip_grid(x0, patch)
    draws = draw_samples(ids, step, seed, cfg, grid)
    noise = frame_noise(ids, step, seed, (c, pt, h, w), range(grid[0])).to(device=x0.device, dtype=x0.dtype)
    t_frames = latent_frame_mask(draws.cond, pt)  # (B, T) per latent frame
    t_frames = torch.where(t_frames, 0.0, draws.t[:, None])
    t_bcast = t_frames[:, None, :, None, None].to(device=x0.device, dtype=x0.dtype)  # (B, 1, T, 1, 1)
    x_t = (1 - t_bcast) * x0 + t_bcast * noise
    loss_mask = (t_bcast > 0).to(x0.dtype)
    t_model = per_token_timesteps(draws.t, draws.cond, grid[1] * grid[2]) if draws.cond.any() else draws.t
    return NoisedBatch(x_t, noise - x0, t_model.to(x0.device), loss_mask, draws.drop.to(x0.device))


@dataclass
class NoisedSpan:
    """One sequence rank's span of a noised micro-batch, as patch tokens (B, n, E = C*pt*ph*pw)."""
    x_t: torch.Tensor          # (B, n, E) model input
    target: torch.Tensor       # (B, n, E) velocity eps - x0
    t_tokens: torch.Tensor     # (B,) or per-token (B, n) timesteps fed to the model
    loss_mask: torch.Tensor    # (B, n, 1) 1 where the loss counts (not conditioning frames, not padding)
    drop_text: torch.Tensor    # (B,) bool
    loss_elements: torch.Tensor  # (B,) elements of each WHOLE sample (all spans) its loss averages over


def noise_span(rows: torch.Tensor, ids: torch.Tensor, step: int, seed: int, cfg: DiffusionConfig,
               patch: tuple[int, int, int], span: TokenSpan) -> NoisedSpan:
    """noise_batch for the tokens of `span` only, from its latent rows (span.latent_rows(x0)).

    Noise is drawn per token frame (frame_generator) for the span's frames alone; timesteps,
    dropout and masks per sample (draw_samples: every rank draws them, they are tiny).
    The values equal noise_batch's at the same tokens, whatever the span.
    """
    b, c, _, h, w = rows.shape
    pt = patch[0]
    draws = draw_samples(ids, step, seed, cfg, span.grid)
    frames = range(span.first_frame, span.end_frame)
    noise = frame_noise(ids, step, seed, (c, pt, h, w), frames).to(device=rows.device, dtype=rows.dtype)
    x0, noise = span.patches(rows, patch), span.patches(noise, patch)  # (B, n, E)
    positions = span.positions()
    frame_of = (positions // span.frame_tokens).clamp(max=span.grid[0] - 1)  # padding: any real frame
    t_tok = draws.frame_t()[:, frame_of]  # (B, n)
    real = positions < span.num_tokens
    t_bcast = t_tok[..., None].to(device=rows.device, dtype=rows.dtype)  # (B, n, 1)
    x_t = (1 - t_bcast) * x0 + t_bcast * noise
    loss_mask = ((~draws.cond[:, frame_of]) & real)[..., None].to(device=rows.device, dtype=rows.dtype)
    elements = (~draws.cond).sum(dim=1) * span.frame_tokens * c * math.prod(patch)  # (B,)
    t_model = t_tok if draws.cond.any() else draws.t
    return NoisedSpan(x_t, noise - x0, t_model.to(rows.device), loss_mask, draws.drop.to(rows.device),
                      elements.to(device=rows.device, dtype=torch.float32))


def span_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, elements: torch.Tensor) -> torch.Tensor:
    """This span's part of the micro-batch's masked MSE: each sample's squared errors over ALL of
    its `elements` (B,), averaged over the samples.

    Linear in the span, so the sequence ranks' parts sum to the whole. Per sample, not pooled over
    the micro-batch: conditioning frames make samples' element counts differ, and a pooled mean
    would change with how samples fall into micro-batches (dp ranks, accumulation steps), so dp2
    would not equal one process.
    """
    per_sample = ((pred.float() - target.float()).pow(2) * mask).flatten(1).sum(dim=1)  # (B,)
    return (per_sample / elements.clamp_min(1)).mean()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the elements where mask is 1 (mask broadcasts over pred)."""
    err = (pred.float() - target.float()).pow(2) * mask
    denom = mask.expand_as(pred).sum().clamp_min(1)
    return err.sum() / denom
