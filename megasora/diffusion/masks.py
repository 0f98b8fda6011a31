"""Conditioning masks: which token frames of a clip are given clean (t = 0) instead of noised.

One mechanism serves every prompting mode of the Sora report. Training draws a mask per
sample (from the same (seed, sample id, step) generator as its timestep, flow.draw_samples);
sampling (megasora/diffusion/modes.py) builds the mask its mode needs:

    first_frame  image-to-video               last_frame  what led up to an image
    first_last   connect two clips / loop     head (k)    extend forwards
    tail (k)     extend backwards             random      any frames known (interpolation)

Masks live on TOKEN frames (T' = T / pt): a patch spans pt latent frames and all its
tokens share one timestep, so a frame is conditioned only as a whole patch row. A
conditioned frame is left out of the loss; at least one frame always stays noised.
"""
from __future__ import annotations

import dataclasses

import torch

from megasora.config import DiffusionConfig

MASK_KINDS = ("first_frame", "last_frame", "first_last", "head", "tail", "random")


def mask_probabilities(cfg: DiffusionConfig) -> dict[str, float]:
    """Probability of each kind; `none` takes the remainder. cond_frames_prob is first_frame's old name."""
    probs = dataclasses.asdict(cfg.cond_masks)
    probs["first_frame"] += cfg.cond_frames_prob  # config validation allows at most one of the two
    return {kind: probs[kind] for kind in MASK_KINDS}


def frame_mask(kind: str, token_frames: int, k: int = 1) -> torch.Tensor:
    """(T',) bool, True = clean conditioning frame, for a deterministic kind (`random` is drawn)."""
    mask = torch.zeros(token_frames, dtype=torch.bool)
    if kind == "first_frame":
        mask[0] = True
    elif kind == "last_frame":
        mask[-1] = True
    elif kind == "first_last":
        mask[0] = mask[-1] = True
    elif kind == "head":
        mask[:k] = True
    elif kind == "tail":
        mask[token_frames - k:] = True
    elif kind != "none":
        raise ValueError(f"unknown conditioning mask {kind!r}; one of none, {', '.join(MASK_KINDS)}")
    return mask


def pick_kind(u: float, probs: dict[str, float]) -> str:
    """The kind whose slice of [0, 1) holds u (kinds in MASK_KINDS order, `none` last)."""
    edge = 0.0
    for kind, p in probs.items():
        edge += p
        if u < edge:
            return kind
    return "none"


def draw_frame_mask(u: float, generator: torch.Generator, token_frames: int,
                    probs: dict[str, float]) -> torch.Tensor:
    """One sample's (T',) mask: the kind from the uniform u, its k / frames from `generator`.

    Clips of one token frame are never conditioned (nothing would be left to learn).
    """
    kind = pick_kind(u, probs) if token_frames > 1 else "none"
    if kind in ("head", "tail"):
        k = int(torch.randint(1, token_frames, (), generator=generator))
        return frame_mask(kind, token_frames, k)
    if kind == "random":
        mask = torch.rand(token_frames, generator=generator) < 0.5
        if mask.all() or not mask.any():  # keep one frame to generate and one given
            mask[int(torch.randint(0, token_frames, (), generator=generator))] = not mask.all()
        return mask
    return frame_mask(kind, token_frames)


def latent_frame_mask(token_mask: torch.Tensor, pt: int) -> torch.Tensor:
    """(..., T') token-frame mask -> (..., T) latent-frame mask."""
    return token_mask.repeat_interleave(pt, dim=-1)


def per_token_timesteps(t: torch.Tensor, token_mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """t (B,) and mask (B, T') -> (B, N) timesteps, 0 on conditioning frames (token order is t-major)."""
    t_frames = torch.where(token_mask, torch.zeros_like(t)[:, None], t[:, None])  # (B, T')
    return t_frames.repeat_interleave(tokens_per_frame, dim=1)
