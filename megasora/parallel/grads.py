"""Data/sequence-parallel gradient reduction, for training paths that do not use DeepSpeed.

It reproduces exactly what DeepSpeed does with a MeshMPU (see MeshMPU's docstring): sum
over the dp x sp group, divide by dp. Sequence-parallel ranks hold partial gradients (each
back-propagates only its own tokens) and must be summed; dp ranks hold gradients of
different samples and are averaged, matching a single process on the global batch.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from megasora.parallel.mesh import Mesh


def reduce_data_parallel_grads(model: nn.Module, mesh: Mesh) -> None:
    group, dp = mesh.group("dpsp"), mesh.size("dp")
    if mesh.size("dpsp") == 1:
        return
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
            param.grad.div_(dp)
