"""Apply the mesh's parallelism to a plain single-device DiT.

Build the model identically (same seed) on every rank, then call parallelize(): weights are
sliced from the full ones, so parallel init == single-process init. The trainer builds it on the
meta device and materializes only this rank's slices afterwards (parallel/materialize.py). Afterwards wrap with
`deepspeed.initialize(model=..., mpu=MeshMPU(mesh), ...)`, which averages gradients over dp
and sums them over sp (the reasoning is in docs/parallelism.md).
"""
from __future__ import annotations

from typing import cast

from megasora.config import AttentionKernel, LoRAConfig, ParallelConfig, TrainConfig
from megasora.models.dit import DiT, DiTBlock
from megasora.parallel.block_attention import BlockAttention
from megasora.parallel.lora import apply_lora
from megasora.parallel.mesh import Mesh, ParallelLayout, build_mesh
from megasora.parallel.sequence import SequenceShard, sequence_attention
from megasora.parallel.tensor import apply_tensor_parallel


def parallelize(model: DiT, mesh: Mesh, attention_backend: AttentionKernel = "auto",
                lora: LoRAConfig | None = None) -> DiT:
    """tp -> LoRA -> sequence-parallel attention -> sequence hook, in place; returns the model.

    `mesh` was built from a layout checked against this model (init_parallel, or build_mesh of
    mesh.validate_config_layout). pp > 1: the whole model is still split over tp/ulysses/ring;
    the caller then keeps this rank's stage of it (megasora/parallel/pipeline.py: build_stage).
    """
    # 1. Tensor parallel first: it replaces linears (slicing the full weights) and registers
    #    the tp gradient hooks on every parameter that remains replicated.
    if mesh.size("tp") > 1:
        apply_tensor_parallel(model, mesh)
    # 1b. LoRA adapters (lora.rank > 0) on the sliced linears: each follows its linear's tp split.
    if lora is not None and lora.rank > 0:
        apply_lora(model, lora, mesh)
    # 2. Self-attention function: ulysses, ring or both (USP) over the sp sub-mesh. It sees
    #    this rank's heads after tp, so heads are split tp first, ulysses second.
    #    Without sp, a chosen kernel (model.attention_kernel) replaces torch's SDPA dispatch.
    if mesh.size("sp") > 1 or attention_backend != "auto":
        attention = (sequence_attention(mesh, attention_backend) if mesh.size("sp") > 1
                     else BlockAttention(attention_backend))
        for block in model.blocks:
            cast(DiTBlock, block).attn.attention = attention
    # 3. Sequence hook last: it shards tokens over tp x sp after patch embedding and gathers
    #    the final layer's output; needed whenever anything splits the sequence.
    if mesh.size("tpsp") > 1:
        model.sequence = SequenceShard(mesh)
    return model


def init_parallel(model: DiT, parallel: ParallelConfig, world_size: int, train: TrainConfig,
                  attention_backend: AttentionKernel = "auto") -> Mesh:
    """Check the layout against the model BEFORE creating any group, build the mesh, parallelize.

    Needs the default process group; returns the mesh (dp rank/size/group and MeshMPU come from it).
    `train` gives the ZeRO stage, pipeline micro-batches and offloading the layout must allow.
    """
    layout = ParallelLayout.checked(parallel, model.arch, world_size, zero_stage=train.zero_stage,
                                    grad_accum=train.grad_accum, offload_optimizer=train.offload_optimizer)
    mesh = build_mesh(layout)
    parallelize(model, mesh, attention_backend, train.lora)
    return mesh
