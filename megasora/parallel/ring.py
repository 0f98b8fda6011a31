"""Ring attention (non-causal) over a process group: K/V blocks travel, queries stay.

Each of the P ranks holds one contiguous chunk of the sequence, N/P tokens, for all of its
heads. Forward: P steps; at each step the rank starts sending its current K/V block to the
next rank and receiving the previous rank's (batch_isend_irecv, issued BEFORE computing, so
the transfer overlaps the block's attention), computes attention of its queries against the
current block with a kernel that returns the log-sum-exp, and merges the partial result into
an fp32 accumulator with the stable LSE merge. Backward: a second ring pass; K/V travel again
together with fp32 dK/dV accumulators, each block's gradients computed from the global
output and LSE (see block_attention.py); after P hops each dK/dV is back at its owner.

Peak memory is O(N/P): one local chunk of Q/K/V/out plus one in-flight K/V block; the N x N
score matrix never exists (each block kernel is itself flash-style).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megasora import kernels
from megasora.parallel.block_attention import block_backward, block_forward, key_padding_bias
from megasora.parallel.p2p import Exchange, exchange

# K/V and dK/dV hops can be in flight together: gloo tells them apart by tag, NCCL (which ignores
# tags) by issue order, which is the same on every rank of the ring
KV_TAG, DKV_TAG = 0, 8


def ring_exchange(tensors: list[torch.Tensor], group: ProcessGroup, tag: int
                  ) -> tuple[list[torch.Tensor], Exchange]:
    """Start sending `tensors` to the next rank of the ring and receiving the previous rank's,
    as one exchange: every rank sends and receives in the same call, so no order of the ranks
    can leave two of them waiting on each other (megasora/parallel/p2p.py)."""
    ranks = dist.get_process_group_ranks(group)
    me = dist.get_rank(group)
    nxt, prv = ranks[(me + 1) % len(ranks)], ranks[(me - 1) % len(ranks)]
    recv = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
    return recv, exchange([(t, nxt) for t in tensors], [(r, prv) for r in recv], group, tag)


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, group: ProcessGroup, backend: str):
        world = dist.get_world_size(group)
        blocks = [k, v] if bias is None else [k, v, bias]  # what travels: (B, H, n, D) x2, (B, n)
        out: Optional[torch.Tensor] = None  # fp32 (B, H, n, D) merged over the blocks so far, and its LSE
        lse: Optional[torch.Tensor] = None
        for step in range(world):
            if step + 1 < world:
                incoming, hop = ring_exchange(blocks, group, KV_TAG)  # overlap with this block
            b_cur = blocks[2] if bias is not None else None
            blk_out, blk_lse = block_forward(q, blocks[0], blocks[1], b_cur, backend)  # (B, H, n, D), (B, H, n)
            if out is None or lse is None:
                out, lse = blk_out.float(), blk_lse
            else:
                out, lse = kernels.merge_attention_partials(out, lse, blk_out, blk_lse)
            if step + 1 < world:
                hop.wait()
                blocks = incoming
        assert out is not None  # world >= 1 blocks
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.group, ctx.backend = group, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, out, lse = ctx.saved_tensors
        group, world = ctx.group, dist.get_world_size(ctx.group)
        blocks = [k, v] if bias is None else [k, v, bias]
        dq = torch.zeros_like(q, dtype=torch.float32)
        dkv: Optional[list[torch.Tensor]] = None  # fp32 dK, dV of the block in hand, from the ranks it visited
        dkv_hop = Exchange()
        for step in range(world):
            if step + 1 < world:
                incoming, kv_hop = ring_exchange(blocks, group, KV_TAG)
            b_cur = blocks[2] if bias is not None else None
            dq_b, dk_b, dv_b = block_backward(dout, q, blocks[0], blocks[1], b_cur, out, lse, ctx.backend)
            dq += dq_b.float()
            dk_acc, dv_acc = dk_b.float(), dv_b.float()
            if dkv is not None:  # accumulators of this block from the ranks it visited before
                dkv_hop.wait()
                dk_acc += dkv[0]
                dv_acc += dkv[1]
            if world > 1:  # pass them on; after the last step they arrive home
                dkv, dkv_hop = ring_exchange([dk_acc, dv_acc], group, DKV_TAG)
            else:
                dkv = [dk_acc, dv_acc]
            if step + 1 < world:
                kv_hop.wait()
                blocks = incoming
        dkv_hop.wait()
        assert dkv is not None  # world >= 1 blocks
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


class RingAttention:
    """AttentionFn over a ring group: q, k, v (B, H, N/P, Dh) sequence-sharded, contiguous chunks
    in group-rank order; key_padding_mask (B, N/P) bool for the local keys."""

    def __init__(self, group: ProcessGroup, backend: str = "auto") -> None:
        self.group = group
        self.backend = backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        bias = key_padding_bias(key_padding_mask, q.dtype)  # (B, N/P) travels with its K/V block
        return _RingAttentionFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias,
                                      self.group, self.backend)
