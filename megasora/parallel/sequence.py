"""Sharding one sample's token sequence: the DiT's `sequence` hook and the SP attention choice.

Tokens are split over the `tpsp` group (ring outer, ulysses, tp inner; see mesh.py): after
patch embedding each rank keeps chunk c = rank-in-tpsp of the sequence padded to a multiple
of tp*ulysses*ring. Two granularities matter:

- the residual stream (x, per-token cond) lives at N/(tp*sp) tokens per rank: norms, adaLN,
  residuals and the final layer run there (Megatron's sequence-parallel regions);
- self-attention runs at N/sp tokens per rank (tp all-gathers its chunks before q/k/v), so
  RoPE rows and the key-padding mask are handed out at that granularity, for the GLOBAL
  positions of the rank's tokens.

Padding tokens are masked as keys and dropped by `gather`, so the loss never sees them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megasora.models.attention import AttentionFn, local_attention
from megasora.models.dit import TokenState
from megasora.parallel.comm import gather_seq_replicated_loss
from megasora.parallel.mesh import Mesh
from megasora.parallel.ring import RingAttention
from megasora.parallel.ulysses import UlyssesAttention


def _pad_tokens(t: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, pad)) if pad else t  # (B, N, D) -> (B, N + pad, D)


class SequenceShard:
    """SequenceHook for tp*sp > 1. Keeps the unpadded length of the current forward for gather."""

    def __init__(self, mesh: Mesh) -> None:
        self.group = mesh.communicating_group("tpsp")
        self.shards = mesh.size("tpsp")
        self.index = mesh.rank_in("tpsp")
        self.tp = mesh.size("tp")
        self.num_tokens = 0

    def shard(self, state: TokenState) -> TokenState:
        b, n, _ = state.x.shape
        pad = (-n) % self.shards
        self.num_tokens = n
        local = (n + pad) // self.shards
        lo, hi = self.index * local, (self.index + 1) * local  # residual-stream chunk
        attn_lo = (self.index // self.tp) * local * self.tp     # attention chunk: tp ranks merged
        attn_hi = attn_lo + local * self.tp
        x = _pad_tokens(state.x, pad)[:, lo:hi]  # (B, N/(tp*sp), D); slicing backward zero-fills
        cond = state.cond if state.cond.shape[1] == 1 else _pad_tokens(state.cond, pad)[:, lo:hi]
        cos, sin = (F.pad(r, (0, 0, 0, pad))[attn_lo:attn_hi] for r in state.rope)  # (N/sp, Dh/2)
        mask = None
        if pad:
            positions = torch.arange(attn_lo, attn_hi, device=x.device)
            mask = (positions < n).expand(b, -1)  # (B, N/sp) True = real token
        return TokenState(x=x, cond=cond, rope=(cos, sin), key_padding_mask=mask)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N/(tp*sp), E) -> (B, N, E) on every rank; backward keeps the local slice."""
        full = gather_seq_replicated_loss(tokens, self.group)  # (B, N + pad, E)
        return full[:, :self.num_tokens]


def sequence_attention(mesh: Mesh, backend: str = "auto") -> AttentionFn:
    """The self-attention function for the mesh's (ulysses, ring) sub-mesh: USP when both > 1."""
    inner: AttentionFn = local_attention
    if mesh.size("ring") > 1:
        inner = RingAttention(mesh.communicating_group("ring"), backend)
    if mesh.size("ulysses") > 1:
        inner = UlyssesAttention(mesh.communicating_group("ulysses"), inner)
    return inner
