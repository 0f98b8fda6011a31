"""Differentiable collectives on explicit process groups.

Each op is an autograd.Function whose backward is the adjoint collective, so parallel
regions compose like ordinary layers. Groups are always passed in; nothing here reads
global state. Sequence ops work on dim 1 of (B, N, ...) tensors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_gather_dim(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((world * moved.shape[0],) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, moved, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_dim(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"reduce-scatter: dim {dim} of size {x.shape[dim]} is not divisible by {world} ranks")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // world,) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, moved, group=group)
    return out.movedim(0, dim)


def _local_chunk(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


class _GatherSeqReduceScatterGrad(torch.autograd.Function):
    """Megatron sequence-parallel entry: all-gather along seq forward, reduce-scatter backward.

    The backward sums because every rank's column-parallel branch contributes a partial
    gradient (its own heads / MLP columns) to every gathered token.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_dim(x, group, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_dim(grad, ctx.group, 1), None


class _ReduceScatterSeqGatherGrad(torch.autograd.Function):
    """Megatron sequence-parallel exit: reduce-scatter along seq forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_dim(x, group, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_dim(grad, ctx.group, 1), None


class _GatherSeqSliceGrad(torch.autograd.Function):
    """All-gather along seq forward; backward keeps this rank's slice of the gradient.

    Used where every rank of the group then computes the *same* function of the gathered
    tensor (the loss on the full output): each rank's upstream gradient is already the
    full one, so summing would count it group-size times.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_dim(x, group, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _local_chunk(grad, ctx.group, 1), None


class _AllToAll(torch.autograd.Function):
    """Split `scatter_dim` across ranks, concatenate received chunks along `gather_dim`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return all_to_all_raw(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_to_all_raw(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all_raw(x: torch.Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Non-differentiable all-to-all: chunk i of `scatter_dim` goes to rank i."""
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(f"all-to-all: dim {scatter_dim} of size {x.shape[scatter_dim]} "
                         f"is not divisible by {world} ranks")
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()  # (P, ...chunk)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def gather_seq_for_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(B, N/P, ...) -> (B, N, ...); gradient reduce-scattered."""
    return _GatherSeqReduceScatterGrad.apply(x, group)


def reduce_scatter_seq_for_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(B, N, ...) partial sums -> (B, N/P, ...) summed; gradient all-gathered."""
    return _ReduceScatterSeqGatherGrad.apply(x, group)


def gather_seq_replicated_loss(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(B, N/P, ...) -> (B, N, ...); gradient sliced (the loss is replicated on the group)."""
    return _GatherSeqSliceGrad.apply(x, group)


def all_to_all(x: torch.Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def all_gather_no_grad(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """For masks and other non-differentiable metadata."""
    return _all_gather_dim(x, group, dim)
