"""Spacetime patches: latents (B, C, T, H, W) <-> tokens (B, N, C*pt*ph*pw).

Token order is t-major, then h, then w, so a token's (t, h, w) grid index is recoverable
from its flat position — RoPE and the sequence-parallel split both rely on this order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
        return self.project(patchify(latents, self.patch))  # (B, N, D)

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """Already patchified tokens (B, n, C*pt*ph*pw) -> (B, n, D): a sequence rank's span only."""
        return self.proj(patches)


@dataclass(frozen=True)
class TokenSpan:
    """Tokens [lo, hi) of a clip's t-major token sequence, padded to `padded` tokens: what one
    sequence-parallel rank holds (the whole clip on one process).

    Positions >= num_tokens are padding (the last ranks' when num_tokens is not divisible by
    the sequence-parallel degree). The span's real tokens lie in token frames
    [first_frame, end_frame), i.e. latent frames [first_frame*pt, end_frame*pt): slicing those
    rows and patchifying them costs at most two partial frames beyond the span's own tokens.
    """
    grid: tuple[int, int, int]  # (T', H', W')
    lo: int
    hi: int
    padded: int

    @staticmethod
    def whole(grid: tuple[int, int, int]) -> TokenSpan:
        n = math.prod(grid)
        return TokenSpan(grid, 0, n, n)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def length(self) -> int:
        return self.hi - self.lo

    @property
    def real_hi(self) -> int:
        return max(min(self.hi, self.num_tokens), self.lo)

    @property
    def frame_tokens(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def first_frame(self) -> int:
        return self.lo // self.frame_tokens

    @property
    def end_frame(self) -> int:
        return max(-(-self.real_hi // self.frame_tokens), self.first_frame)

    def positions(self, device: torch.device | None = None) -> torch.Tensor:
        """(n,) global token positions of the span (padding included)."""
        return torch.arange(self.lo, self.hi, device=device)

    def latent_frames(self, frames: int, pt: int) -> tuple[int, int]:
        """[start, end) of the span's latent frames in a clip of `frames` latent frames (empty for a
        span of padding only)."""
        return min(self.first_frame * pt, frames), min(self.end_frame * pt, frames)

    def latent_rows(self, latents: torch.Tensor, pt: int) -> torch.Tensor:
        """(..., C, T, H, W) -> (..., C, T_span, H, W): the latent frames of the span."""
        start, end = self.latent_frames(latents.shape[-3], pt)
        return latents[..., start:end, :, :]

    def take(self, tokens: torch.Tensor, first_token: int = 0) -> torch.Tensor:
        """(B, M, ...) tokens starting at global position `first_token` -> (B, n, ...) of the span,
        zero rows for padding."""
        local = tokens[:, self.lo - first_token:self.real_hi - first_token]
        pad = self.length - local.shape[1]
        if not pad:
            return local
        return torch.cat([local, local.new_zeros(local.shape[0], pad, *local.shape[2:])], dim=1)

    def patches(self, rows: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
        """latent_rows' output (B, C, T_rows, H, W) -> the span's patch tokens (B, n, C*pt*ph*pw)."""
        return self.take(patchify(rows, patch), self.first_frame * self.frame_tokens)
