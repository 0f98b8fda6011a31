"""Conditioning embeddings: diffusion timestep and 3-D rotary positions."""
from __future__ import annotations

import math

import torch
from torch import nn

from megasora.config import ROPE_LAYOUTS


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
        weight_dtype = next(self.mlp.parameters()).dtype
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(weight_dtype))


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split the head dim's rotation pairs across (t, h, w); h and w get equal shares."""
    pairs = head_dim // 2
    spatial = (pairs * 3 // 8)  # t gets ~1/4 of pairs, h and w ~3/8 each (spatial grids are larger)
    return pairs - 2 * spatial, spatial, spatial


def wan_rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan 2.1's split (diffusers WanRotaryPosEmbed): h and w get head_dim // 6 pairs each, t the rest
    (22 / 21 / 21 pairs at head dim 128)."""
    spatial = head_dim // 6
    return head_dim // 2 - 2 * spatial, spatial, spatial


# The mixed layout's pair directions over (t, h, w): the three axes, then both diagonals of each
# pair of axes. t±h and t±w are motion by one token per frame along h or w.
MIXED_DIRECTIONS = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, -1, 0), (1, 0, 1), (1, 0, -1),
                    (0, 1, 1), (0, 1, -1))


def rope_frequencies(head_dim: int, theta: float = 10000.0, layout: str = "axial") -> torch.Tensor:
    """(head_dim/2, 3) float64: the angular frequency of each rotation pair along (t, h, w).

    axial: each pair turns along one axis (rope_axis_dims' split, frequencies theta^(-i/n)
    within an axis; `wan` is axial with wan_rope_axis_dims' split). A head's score is then a sum of per-axis terms, so its attention weights
    are a product of per-axis factors; such a product cannot prefer "one frame later, one token
    left" over "one frame later, one token right" while also preferring "one frame earlier, one
    token right" (the sums of the two pairs are equal), so no head can follow a moving object
    both ways in time. mixed: pair i turns along MIXED_DIRECTIONS[i % 9], rung i // 9 of a ladder
    of frequencies theta^(-rung/rungs), so pairs on the diagonals make scores depend on t and
    space jointly (docs/prompt_following.md).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"RoPE layout {layout!r} is not one of {ROPE_LAYOUTS}")
    if layout == "mixed":
        pairs, n_dirs = head_dim // 2, len(MIXED_DIRECTIONS)
        rung = torch.arange(pairs, dtype=torch.float64) // n_dirs  # every direction gets the same ladder
        magnitude = theta ** (-rung / math.ceil(pairs / n_dirs))
        directions = torch.tensor([MIXED_DIRECTIONS[i % n_dirs] for i in range(pairs)], dtype=torch.float64)
        return directions * magnitude[:, None]
    freqs, start = torch.zeros(head_dim // 2, 3, dtype=torch.float64), 0
    split = wan_rope_axis_dims(head_dim) if layout == "wan" else rope_axis_dims(head_dim)
    for axis, n_pairs in enumerate(split):
        freqs[start:start + n_pairs, axis] = theta ** (-torch.arange(n_pairs, dtype=torch.float64) / max(n_pairs, 1))
        start += n_pairs
    return freqs


def rope_3d(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
            device: torch.device | None = None, layout: str = "axial") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (N, head_dim/2), N = T'*H'*W' in patchify's t-major order (rope_at every position)."""
    n = grid[0] * grid[1] * grid[2]
    return rope_at(torch.arange(n, device=device), grid, head_dim, theta, layout)


def rope_at(positions: torch.Tensor, grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
            layout: str = "axial") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, head_dim/2) fp32 for flat t-major token `positions` (n,) of a `grid` clip.

    Pair i rotates by (its frequency vector, rope_frequencies) . (t, h, w), so q·k depends
    only on the (dt, dh, dw) offset between tokens, for any grid size. Built for the given
    positions only (a sequence-parallel rank's), in fp32, one elementwise sum per axis so a
    position's row is the same bits whichever rows are built with it; positions past the grid
    (sequence padding) get finite rows that the key-padding mask ignores.
    """
    _, gh, gw = grid
    freqs = rope_frequencies(head_dim, theta, layout).to(device=positions.device, dtype=torch.float32)  # (Dh/2, 3)
    t, h, w = (positions // (gh * gw)).float(), (positions // gw % gh).float(), (positions % gw).float()
    angle = t[:, None] * freqs[:, 0] + h[:, None] * freqs[:, 1] + w[:, None] * freqs[:, 2]  # (n, Dh/2)
    return torch.cos(angle), torch.sin(angle)
