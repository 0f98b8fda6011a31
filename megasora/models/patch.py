"""Spacetime patches: latents (B, C, T, H, W) <-> tokens (B, N, C*pt*ph*pw).

Token order is t-major, then h, then w, so a token's (t, h, w) grid index is recoverable
from its flat position — RoPE and the sequence-parallel split both rely on this order.
"""
from __future__ import annotations

import torch
from torch import nn


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T/pt * H/ph * W/pw, C*pt*ph*pw)."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent size (T,H,W)=({t},{h},{w}) is not divisible by patch {patch}")
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', H', W', C, pt, ph, pw)
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int],
               channels: int) -> torch.Tensor:
    """Exact inverse of `patchify`: (B, N, C*pt*ph*pw) -> (B, C, T, H, W)."""
    b = tokens.shape[0]
    gt, gh, gw = grid
    pt, ph, pw = patch
    x = tokens.reshape(b, gt, gh, gw, channels, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, T', pt, H', ph, W', pw)
    return x.reshape(b, channels, gt * pt, gh * ph, gw * pw)


def patch_grid(latent_shape: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """(T, H, W) of the latent -> (T', H', W') token grid."""
    return tuple(s // p for s, p in zip(latent_shape, patch))  # type: ignore[return-value]


class PatchEmbed3D(nn.Module):
    """Linear projection of flattened 3-D patches (equivalent to a strided Conv3d, cheaper to shard)."""

    def __init__(self, in_channels: int, hidden: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(in_channels * patch[0] * patch[1] * patch[2], hidden)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(latents, self.patch))  # (B, N, D)
