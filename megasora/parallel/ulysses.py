"""Ulysses sequence parallelism: all-to-all from sequence-sharded to head-sharded and back.

Before attention every rank holds all (local) heads of N/U tokens; one all-to-all gives it
H/U heads of all N tokens (of its ring chunk, under USP), attention runs on full sequences,
and a second all-to-all restores the sequence sharding. Per layer and rank that moves q, k, v
and out: 4 * B * N * (H*Dh) / U elements, of which (U-1)/U leave the rank.
"""
from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from megasora.models.attention import AttentionFn
from megasora.parallel.comm import all_gather_no_grad, all_to_all


class UlyssesAttention:
    """AttentionFn: q, k, v (B, H, N/U, Dh) -> (B, H, N/U, Dh); `inner` sees (B, H/U, N, Dh)."""

    def __init__(self, group: ProcessGroup, inner: AttentionFn) -> None:
        self.group = group
        self.inner = inner

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        qkv = torch.stack([q, k, v])  # (3, B, H, N/U, Dh)
        qkv = all_to_all(qkv, self.group, scatter_dim=2, gather_dim=3)  # (3, B, H/U, N, Dh)
        mask = None
        if key_padding_mask is not None:  # (B, N/U) -> (B, N), bools travel as uint8
            mask = all_gather_no_grad(key_padding_mask.to(torch.uint8), self.group, dim=1).bool()
        out = self.inner(qkv[0], qkv[1], qkv[2], mask)  # (B, H/U, N, Dh)
        return all_to_all(out, self.group, scatter_dim=2, gather_dim=1)  # (B, H, N/U, Dh)
