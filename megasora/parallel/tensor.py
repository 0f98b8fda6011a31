"""Megatron-style tensor parallelism with sequence-parallel regions, applied to a plain DiT.

Within a block the residual stream is sequence-sharded over tp (B, N/tp, D); each of the
three sublayers (cross-attention, self-attention, MLP) is one tensor-parallel region:

    x (B, N/tp, D) --all-gather(seq)--> (B, N, D) --column-parallel q/k/v or fc1--> local heads/columns
      --> attention / GELU --> row-parallel out or fc2 (partial sums) --reduce-scatter(seq)--> (B, N/tp, D) + bias

The all-gather is a forward pre-hook on the sublayer (one gather shared by q, k and v);
its backward is a reduce-scatter that sums every rank's partial input gradient. Text K/V
in cross-attention read the replicated text tokens directly: no communication.

adaLN (each block's and the final layer's SiLU + Linear(D, k*D), 6 D^2 per block) is
column-parallel too: rank r holds rows [r, r+1) * kD/tp of the weight, the contiguous slice,
so a checkpoint's tp shards concatenate along dim 0 back into the single-process weight and
the shift/scale/gate chunk order survives any reshard. Every rank needs all k*D features
for ITS tokens, so ModulationLinear runs

    silu(cond) (B, c, D) --all-gather(seq)--> (B, tp*c, D) --its kD/tp columns--> (B, tp*c, kD/tp)
      --all-to-all (tokens out, features in)--> (B, c, kD) for this rank's c tokens

c is 1 for a per-sample timestep (the gathered rows are tp copies: a few KiB) or the rank's
residual chunk N/(tp*sp) for per-token timesteps (conditioning masks). One path for both:
at one token per rank the two have the same shape, and this path is exact for either. Per
block it moves B*c*(tp + 6)*D elements forward (as many backward): a few KiB per sample,
or for per-token cond B*(N/sp)*(1 + 6/tp)*D, less than gathering the block's weight (6D^2)
while B*N/sp < 6*tp*D/(tp + 6). (Handing each rank cond at attention granularity, N/sp
rows like the RoPE tables, would drop the per-block gather: the sequence hook's change.)

Gradients. A column/row-parallel weight shard sees all tokens of its sequence chunk, so its
gradient is complete. Every other parameter (norms, qk-norm, embeddings, row biases, the
final linear) is replicated but each tp rank only back-propagates its own tokens or heads
through it, so its gradient is a partial sum: a hook all-reduces (sums) it over tp before it
reaches .grad, i.e. before DeepSpeed's own reduction hooks run.

The Wan family (models/wan.py) has the same linears under the same names, so TP_PLAN splits
them unchanged; it has no adaLN linear (a per-block table added to one shared time
projection, replicated like the embeddings) and its qk-norm spans all heads: a (D,) weight
applied before the head split, so under tp the per-token sum of squares is all-reduced
(TensorParallelRMSNorm) and the weight sliced like the q/k columns it scales.
"""
from __future__ import annotations

from functools import partial
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megasora.models.dit import DiT
from megasora.models.wan import HeadsRMSNorm
from megasora.parallel.comm import all_to_all, gather_seq_for_tp, reduce_scatter_seq_for_tp
from megasora.parallel.mesh import Mesh


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int) -> None:
    """Megatron/DeepSpeed attribute names: grad-norm code counts these on every tp rank."""
    # DeepSpeed reads these duck-typed attributes, which nn.Parameter does not declare
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    param.model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = partition_dim  # type: ignore[attr-defined]


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


class ModulationLinear(ColumnParallelLinear):
    """adaLN's linear, output features split over tp: silu(cond) (B, c, D) -> (B, c, k*D) for this rank's tokens.

    See the module docstring: gather cond over tp, compute this rank's kD/tp features of
    every rank's tokens, all-to-all each rank's tokens back with all features (rank order =
    feature order). Backward: the all-to-all's inverse, then a reduce-scatter that sums
    every rank's partial gradient of this rank's cond rows.
    """

    def __init__(self, linear: nn.Linear, tp_rank: int, tp_size: int, group: ProcessGroup) -> None:
        super().__init__(linear, tp_rank, tp_size)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gathered = gather_seq_for_tp(x, self.group)                         # (B, tp*c, D)
        local = super().forward(gathered)                                   # (B, tp*c, kD/tp)
        return all_to_all(local, self.group, scatter_dim=1, gather_dim=2)  # (B, c, kD)


class _SumOverTp(torch.autograd.Function):
    """All-reduce (sum) forward AND backward: every rank then uses the sum with its OWN tensors.

    Megatron's reduce-from-model-parallel region has an identity backward because the code after
    it is replicated; here each rank scales its own columns by the sum, so each rank's gradient
    of it is a partial one and the true gradient is their sum.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class TensorParallelRMSNorm(nn.Module):
    """RMS norm over the WHOLE width D of q (or k) when this rank holds D/tp of its columns.

    Wan's qk-norm normalises all heads together (a (D,) weight, before the head split), so the
    mean square needs every rank's columns: each rank sums its columns' squares in fp32, the
    (B, N, 1) sums are all-reduced over tp (differentiably, _SumOverTp) and divided by the
    full D. The tensor reduced is x's own (device) tensor, as NCCL requires, and a few bytes
    per token. The weight is this rank's contiguous D/tp slice (the column-parallel q/k rows
    it scales), so its gradient is complete here: tp-marked along dim 0, no tp hook.
    Ulysses and ring need nothing: the norm runs before their all-to-all, on whole tokens.
    """

    def __init__(self, norm: nn.Module, tp_rank: int, tp_size: int, group: ProcessGroup) -> None:
        super().__init__()
        weight = cast(torch.Tensor, norm.weight)
        width = weight.shape[0]
        cols = slice(tp_rank * width // tp_size, (tp_rank + 1) * width // tp_size)
        self.group, self.width = group, width
        # torch.nn.RMSNorm's eps=None means the dtype's machine epsilon
        self.eps = cast(float | None, getattr(norm, "eps", None))
        self.weight = nn.Parameter(weight.detach()[cols].clone())
        mark_tensor_parallel(self.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()                                                      # (B, N, D/tp)
        squares = _SumOverTp.apply(x32.pow(2).sum(-1, keepdim=True), self.group)  # (B, N, 1) over all D
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return (x32 * torch.rsqrt(squares / self.width + eps) * self.weight.float()).to(x.dtype)


def _gather_first_arg(group: ProcessGroup, module: nn.Module, args: tuple) -> tuple:
    return (gather_seq_for_tp(args[0], group),) + tuple(args[1:])  # (B, N/tp, D) -> (B, N, D)


def _sum_over_tp(group: ProcessGroup, grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def _split_sublayer(module: nn.Module, column: list[str], row: list[str], mesh: Mesh) -> None:
    rank, size, group = mesh.rank_in("tp"), mesh.size("tp"), mesh.communicating_group("tp")
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
MODULATION_LINEAR = 1  # adaLN = Sequential(SiLU, Linear): the index of its Linear


def _modulations(model: DiT) -> dict[str, nn.Sequential]:
    """Name -> adaLN (SiLU, Linear) of every block this model (or pipeline stage) holds, and the final layer's.

    The Wan family has none: its blocks add a (1, 6, D) table to one shared time projection
    (t_embed.modulation, replicated like the rest of the embeddings)."""
    found = {f"blocks.{i}.adaln": block.adaln for i, block in model.blocks.named_children() if hasattr(block, "adaln")}
    if hasattr(model, "final") and hasattr(model.final, "adaln"):  # a pipeline stage holds final only if last
        found["final.adaln"] = model.final.adaln
    return cast(dict[str, nn.Sequential], found)


def _qk_norms(model: DiT) -> dict[str, nn.Module]:
    """Name -> every all-heads qk-norm ((D,) weight: the Wan family's) of the blocks this model holds,
    before (HeadsRMSNorm) or after (TensorParallelRMSNorm) tensor parallelism. The DiT's per-head
    norm ((Dh,) weight) sees whole heads on every rank and is not among them."""
    found: dict[str, nn.Module] = {}
    for i, block in model.blocks.named_children():
        for sublayer in ("attn", "cross_attn"):
            for norm in ("q_norm", "k_norm"):
                module = getattr(getattr(block, sublayer), norm)
                if isinstance(module, (HeadsRMSNorm, TensorParallelRMSNorm)):
                    found[f"blocks.{i}.{sublayer}.{norm}"] = module
    return found


def tp_partition_dims(model: nn.Module) -> dict[str, int]:
    """Parameter name -> the dim tensor parallel splits it along, for ANY tp degree (1 included).

    Checkpoints record this so one saved at tp=1 can be resharded to tp=2 and back; the
    row-parallel bias is absent because it is replicated.
    """
    dims: dict[str, int] = {}
    if not isinstance(model, DiT):  # e.g. the VideoVAE of train-vae: nothing is tp-split
        return dims
    for i, _ in model.blocks.named_children():  # the global block index, also on a pipeline stage
        for sublayer, (column, row) in TP_PLAN.items():
            for name in column:
                dims[f"blocks.{i}.{sublayer}.{name}.weight"] = 0
                dims[f"blocks.{i}.{sublayer}.{name}.bias"] = 0
            for name in row:
                dims[f"blocks.{i}.{sublayer}.{name}.weight"] = 1
    for name in _modulations(model):  # column-parallel: the Linear after the SiLU
        dims[f"{name}.{MODULATION_LINEAR}.weight"] = 0
        dims[f"{name}.{MODULATION_LINEAR}.bias"] = 0
    for name in _qk_norms(model):  # the weight slice of the q/k columns the rank holds
        dims[f"{name}.weight"] = 0
    return dims


def apply_tensor_parallel(model: DiT, mesh: Mesh) -> DiT:
    """Shard every block's attention heads, MLP columns and adaLN outputs over mesh 'tp' (in place)."""
    for block in model.blocks:
        for sublayer, (column, row) in TP_PLAN.items():
            _split_sublayer(getattr(block, sublayer), column, row, mesh)
    rank, size, group = mesh.rank_in("tp"), mesh.size("tp"), mesh.communicating_group("tp")
    for adaln in _modulations(model).values():
        linear = cast(nn.Linear, adaln[MODULATION_LINEAR])
        adaln[MODULATION_LINEAR] = ModulationLinear(linear, rank, size, group)
    for name, norm in _qk_norms(model).items():  # after q/k became column-parallel: the same columns
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, TensorParallelRMSNorm(norm, rank, size, group))
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
            tensor = torch.cat(parts, dim=param.partition_dim)  # type: ignore[attr-defined]
        out[name] = tensor.clone()
    return out
