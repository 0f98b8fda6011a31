"""Self- and cross-attention of the DiT block.

The score computation is a swappable callable (`AttentionFn`), so parallelize() can
replace it with Ulysses / ring attention without touching these modules. Local head count
is inferred from projection widths, so tensor-parallel linears shrink it transparently.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megasora import kernels

# (q, k, v, key_padding_mask) -> out; q: (B, H, Nq, Dh), k/v: (B, H, Nk, Dh),
# key_padding_mask: (B, Nk) bool, True = real key; out: (B, H, Nq, Dh)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full attention on one device via SDPA (flash / memory-efficient kernels when available)."""
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.normalize(x, self.weight, None, self.eps, "rms")


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, -1, head_dim)  # (B, N, H, Dh)


class AttentionProjections(nn.Module):
    """q/k/v/out projections and per-head QK-norm, shared by self- and cross-attention."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.head_dim = hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()


class SelfAttention(AttentionProjections):
    """Full spacetime self-attention with QK-norm and 3-D RoPE."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__(hidden, heads, qk_norm)
        self.attention: AttentionFn = local_attention

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(split_heads(self.q(x), self.head_dim))  # (B, N, H, Dh)
        k = self.k_norm(split_heads(self.k(x), self.head_dim))
        v = split_heads(self.v(x), self.head_dim)
        q = kernels.apply_rope(q, *rope)
        k = kernels.apply_rope(k, *rope)
        out = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_padding_mask)
        return self.out(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, D)


class CrossAttention(AttentionProjections):
    """Video tokens attend to text tokens; padded text tokens are masked out."""

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(split_heads(self.q(x), self.head_dim)).transpose(1, 2)  # (B, H, N, Dh)
        k = self.k_norm(split_heads(self.k(text), self.head_dim)).transpose(1, 2)  # (B, H, L, Dh)
        v = split_heads(self.v(text), self.head_dim).transpose(1, 2)
        out = local_attention(q, k, v, text_mask)  # (B, H, N, Dh)
        return self.out(out.transpose(1, 2).reshape(b, n, -1))
