"""Wan family through the parallel stack (parallel/tensor.py, parallelize.py, pipeline.py) against one process.

The qk-norm first: Wan normalises q and k over all heads together (a (D,) weight before the
head split), so under tp, where a rank holds D/tp columns, the mean square is all-reduced
over tp. Compared with torch.nn.RMSNorm (diffusers' WanAttention's norm) on the whole width.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megasora.parallel.tensor import TensorParallelRMSNorm, is_tensor_parallel

from parallel_utils import run_distributed

TP = 2


def _norm_inputs() -> tuple[nn.RMSNorm, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    norm = nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(24, generator=g))
    # columns scaled unequally, so one rank's mean square alone is far from the whole width's
    x = torch.randn(2, 5, 24, generator=g) * torch.linspace(0.2, 3.0, 24)
    return norm, x, torch.randn(2, 5, 24, generator=g)


def _qk_norm_worker(rank: int, world: int) -> dict:
    norm, x, dout = _norm_inputs()
    x.requires_grad_(True)
    (norm(x) * dout).sum().backward()
    cols = slice(rank * 24 // world, (rank + 1) * 24 // world)
    sharded = TensorParallelRMSNorm(norm, rank, world, dist.group.WORLD)
    local = x.detach()[..., cols].clone().requires_grad_(True)
    out = sharded(local)
    (out * dout[..., cols]).sum().backward()  # this rank's part of the loss: the sum over ranks is the whole
    return {"out": (out.detach(), norm(x).detach()[..., cols]), "x_grad": (local.grad, x.grad[..., cols]),
            "w_grad": (sharded.weight.grad, norm.weight.grad[cols]), "marked": is_tensor_parallel(sharded.weight)}


def test_tp_qk_norm_equals_whole_width_rms_norm():
    for run in run_distributed(_qk_norm_worker, TP):
        assert run["marked"], "the weight slice is tp-split (its gradient is complete: no tp sum hook)"
        for key in ("out", "x_grad", "w_grad"):
            value, ref = run[key]
            assert torch.allclose(value, ref, atol=1e-5, rtol=1e-5), (key, (value - ref).abs().max())
