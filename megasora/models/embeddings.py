"""Conditioning embeddings: diffusion timestep and 3-D rotary positions."""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t (...) in [0, 1] -> (..., dim). t is scaled by 1000 so the frequencies resolve small steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t (B,) or per-token (B, N) -> (B, 1, D) or (B, N, D)."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 1:
            t = t[:, None]
        weight_dtype = self.mlp[0].weight.dtype
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(weight_dtype))


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split the head dim's rotation pairs across (t, h, w); h and w get equal shares."""
    pairs = head_dim // 2
    spatial = (pairs * 3 // 8)  # t gets ~1/4 of pairs, h and w ~3/8 each (spatial grids are larger)
    return pairs - 2 * spatial, spatial, spatial


def rope_3d(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
            device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (N, head_dim/2), N = T'*H'*W' in patchify's t-major order.

    Each rotation pair belongs to one axis and rotates by position_on_that_axis * freq, so
    q·k depends only on the (dt, dh, dw) offset between tokens, for any grid size.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    gt, gh, gw = grid
    pos = torch.stack(torch.meshgrid(
        torch.arange(gt, device=device), torch.arange(gh, device=device), torch.arange(gw, device=device),
        indexing="ij"), dim=-1).reshape(-1, 3).double()  # (N, 3)
    angles = []
    for axis, n_pairs in enumerate(rope_axis_dims(head_dim)):
        freqs = theta ** (-torch.arange(n_pairs, dtype=torch.float64, device=device) / max(n_pairs, 1))
        angles.append(pos[:, axis:axis + 1] * freqs)  # (N, n_pairs)
    angle = torch.cat(angles, dim=-1)  # (N, head_dim/2)
    return torch.cos(angle).float(), torch.sin(angle).float()
