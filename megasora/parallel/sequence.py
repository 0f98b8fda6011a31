"""Sharding one sample's token sequence: the DiT's `sequence` hook and the SP attention choice.

Tokens are split over the `tpsp` group (ring outer, ulysses, tp inner; see mesh.py): each
rank holds chunk c = rank-in-tpsp of the sequence padded to a multiple of tp*ulysses*ring,
and never the rest. Its span is known from the clip's token grid alone, so the trainer
hands each rank only its span's latents (sliced before noising) and the model patch-embeds,
conditions and builds RoPE rows for those tokens only. Two granularities matter:

- the residual stream (x, per-token cond) lives at N/(tp*sp) tokens per rank: patch
  embedding, norms, adaLN, residuals, the final layer and the loss run there (Megatron's
  sequence-parallel regions);
- self-attention runs at N/sp tokens per rank (tp all-gathers its chunks before q/k/v), so
  RoPE rows and the key-padding mask are built at that granularity, for the GLOBAL
  positions of the rank's tokens.

Padding tokens are masked as keys and carry no loss (train/objective.py); `gather` (only for
whole-clip outputs: sampling) drops them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megasora.errors import DataError
from megasora.models.attention import AttentionFn, local_attention
from megasora.models.patch import TokenSpan
from megasora.parallel.comm import gather_seq_replicated_loss
from megasora.parallel.mesh import Mesh
from megasora.parallel.ring import RingAttention
from megasora.parallel.ulysses import UlyssesAttention


def sequence_span(grid: tuple[int, int, int], shards: int, index: int, merged: int = 1) -> TokenSpan:
    """Chunk `index` // merged .. of `shards` equal chunks of the padded sequence, `merged`
    consecutive chunks together (tp ranks' chunks form one attention chunk)."""
    n = grid[0] * grid[1] * grid[2]
    if n < shards:
        raise DataError(f"a clip of {n} tokens (grid {grid}) cannot be split over {shards} sequence ranks "
                        f"(parallel.tp*ulysses*ring)", f"use parallel.tp*ulysses*ring <= {n} or longer / larger clips")
    local = -(-n // shards)
    lo = (index // merged) * merged * local
    return TokenSpan(grid, lo, lo + merged * local, local * shards)


class _SumIdentityGrad(torch.autograd.Function):
    """All-reduce (sum) forward; backward passes the gradient through unchanged.

    Each rank's term depends directly only on its own tokens, and the full loss is the sum of
    the terms: d loss / d term_r = 1 on every rank, and summing the ranks' parameter gradients
    (what MeshMPU has DeepSpeed do over sp) gives the gradient of the whole loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class SequenceShard:
    """SequenceHook for tp*sp > 1: this rank's spans of a clip, the whole-clip gather, the loss sum."""

    def __init__(self, mesh: Mesh) -> None:
        self.group = mesh.communicating_group("tpsp")
        self.shards = mesh.size("tpsp")
        self.index = mesh.rank_in("tpsp")
        self.tp = mesh.size("tp")

    def span(self, grid: tuple[int, int, int]) -> TokenSpan:
        return sequence_span(grid, self.shards, self.index)  # (N + pad)/(tp*sp) tokens

    def attention_span(self, grid: tuple[int, int, int]) -> TokenSpan:
        return sequence_span(grid, self.shards, self.index, merged=self.tp)  # (N + pad)/sp tokens

    def gather(self, tokens: torch.Tensor, span: TokenSpan) -> torch.Tensor:
        """(B, n, E) -> (B, N, E) on every rank; backward keeps the local slice."""
        full = gather_seq_replicated_loss(tokens, self.group)  # (B, N + pad, E)
        return full[:, :span.num_tokens]

    def sum(self, local: torch.Tensor) -> torch.Tensor:
        return _SumIdentityGrad.apply(local, self.group)


def sequence_attention(mesh: Mesh, backend: str = "auto") -> AttentionFn:
    """The self-attention function for the mesh's (ulysses, ring) sub-mesh: USP when both > 1."""
    inner: AttentionFn = local_attention
    if mesh.size("ring") > 1:
        inner = RingAttention(mesh.communicating_group("ring"), backend)
    if mesh.size("ulysses") > 1:
        inner = UlyssesAttention(mesh.communicating_group("ulysses"), inner)
    return inner
