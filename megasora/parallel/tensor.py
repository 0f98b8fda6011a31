"""Megatron-style tensor parallelism with sequence-parallel regions, applied to a plain DiT.

Within a block the residual stream is sequence-sharded over tp (B, N/tp, D); each of the
three sublayers (cross-attention, self-attention, MLP) is one tensor-parallel region:

    x (B, N/tp, D) --all-gather(seq)--> (B, N, D) --column-parallel q/k/v or fc1--> local heads/columns
      --> attention / GELU --> row-parallel out or fc2 (partial sums) --reduce-scatter(seq)--> (B, N/tp, D) + bias

The all-gather is a forward pre-hook on the sublayer (one gather shared by q, k and v);
its backward is a reduce-scatter that sums every rank's partial input gradient. Text K/V
in cross-attention read the replicated text tokens directly: no communication.

Gradients. A column/row-parallel weight shard sees all tokens of its sequence chunk, so its
gradient is complete. Every other parameter (norms, qk-norm, adaLN, embeddings, row biases,
final layer) is replicated but each tp rank only back-propagates its own tokens or heads
through it, so its gradient is a partial sum: a hook all-reduces (sums) it over tp before it
reaches .grad, i.e. before DeepSpeed's own reduction hooks run.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megasora.models.dit import DiT
from megasora.parallel.comm import gather_seq_for_tp, reduce_scatter_seq_for_tp
from megasora.parallel.mesh import Mesh


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int) -> None:
    """Megatron/DeepSpeed attribute names: grad-norm code counts these on every tp rank."""
    param.tensor_model_parallel = True
    param.model_parallel = True
    param.partition_dim = partition_dim


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


class ColumnParallelLinear(nn.Module):
    """Output features split over tp: (B, N, in) -> (B, N, out/tp). Input must be the full sequence chunk."""

    def __init__(self, linear: nn.Linear, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        rows = slice(tp_rank * linear.out_features // tp_size, (tp_rank + 1) * linear.out_features // tp_size)
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone())
        self.bias = nn.Parameter(linear.bias.detach()[rows].clone()) if linear.bias is not None else None
        mark_tensor_parallel(self.weight, 0)
        if self.bias is not None:
            mark_tensor_parallel(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split over tp: (B, N, in/tp) -> partial sums, reduce-scattered to (B, N/tp, out)."""

    def __init__(self, linear: nn.Linear, tp_rank: int, tp_size: int, group: ProcessGroup) -> None:
        super().__init__()
        cols = slice(tp_rank * linear.in_features // tp_size, (tp_rank + 1) * linear.in_features // tp_size)
        self.group = group
        self.weight = nn.Parameter(linear.weight.detach()[:, cols].clone())
        # The bias is added once, after the reduction: replicated, partial gradient (summed by hook).
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        mark_tensor_parallel(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_scatter_seq_for_tp(F.linear(x, self.weight), self.group)  # (B, N/tp, out)
        return out if self.bias is None else out + self.bias


def _gather_first_arg(group: ProcessGroup, module: nn.Module, args: tuple) -> tuple:
    return (gather_seq_for_tp(args[0], group),) + tuple(args[1:])  # (B, N/tp, D) -> (B, N, D)


def _sum_over_tp(group: ProcessGroup, grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def _split_sublayer(module: nn.Module, column: list[str], row: list[str], mesh: Mesh) -> None:
    rank, size, group = mesh.rank_in("tp"), mesh.size("tp"), mesh.group("tp")
    for name in column:
        setattr(module, name, ColumnParallelLinear(getattr(module, name), rank, size))
    for name in row:
        setattr(module, name, RowParallelLinear(getattr(module, name), rank, size, group))
    module.register_forward_pre_hook(partial(_gather_first_arg, group))


# Sublayer of each block -> (column-parallel linears, row-parallel linears).
TP_PLAN: dict[str, tuple[list[str], list[str]]] = {
    "cross_attn": (["q", "k", "v"], ["out"]),
    "attn": (["q", "k", "v"], ["out"]),
    "mlp": (["fc1"], ["fc2"]),
}


def tp_partition_dims(model: DiT) -> dict[str, int]:
    """Parameter name -> the dim tensor parallel splits it along, for ANY tp degree (1 included).

    Checkpoints record this so one saved at tp=1 can be resharded to tp=2 and back; the
    row-parallel bias is absent because it is replicated.
    """
    dims = {}
    if not hasattr(model, "blocks"):  # not a DiT (e.g. the VideoVAE of train-vae): nothing is tp-split
        return dims
    for i, _ in model.blocks.named_children():  # the global block index, also on a pipeline stage
        for sublayer, (column, row) in TP_PLAN.items():
            for name in column:
                dims[f"blocks.{i}.{sublayer}.{name}.weight"] = 0
                dims[f"blocks.{i}.{sublayer}.{name}.bias"] = 0
            for name in row:
                dims[f"blocks.{i}.{sublayer}.{name}.weight"] = 1
    return dims


def apply_tensor_parallel(model: DiT, mesh: Mesh) -> DiT:
    """Shard every block's attention heads and MLP columns over mesh 'tp' (in place)."""
    for block in model.blocks:
        for sublayer, (column, row) in TP_PLAN.items():
            _split_sublayer(getattr(block, sublayer), column, row, mesh)
    group = mesh.group("tp")
    for param in model.parameters():
        if not is_tensor_parallel(param):
            param.register_hook(partial(_sum_over_tp, group))
    return model


def full_state_dict(model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """Unsharded parameters on every rank: tensor-parallel shards all-gathered along their split dim."""
    group, size = mesh.group("tp"), mesh.size("tp")
    out = {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if is_tensor_parallel(param) and size > 1:
            parts = [torch.empty_like(tensor) for _ in range(size)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            tensor = torch.cat(parts, dim=param.partition_dim)
        out[name] = tensor.clone()
    return out
