"""Apply the mesh's parallelism to a plain single-device DiT.

Build the model identically (same seed) on every rank, then call parallelize(): weights are
sliced from the full ones, so parallel init == single-process init. Afterwards wrap with
`deepspeed.initialize(model=..., mpu=MeshMPU(mesh), ...)`, which averages gradients over dp
and sums them over sp (the reasoning is in docs/parallelism.md).
"""
from __future__ import annotations

from typing import Any

from megasora.models.dit import DiT
from megasora.parallel.mesh import LayoutError, Mesh, ParallelLayout, build_mesh
from megasora.parallel.sequence import SequenceShard, sequence_attention
from megasora.parallel.tensor import apply_tensor_parallel


def check_layout_matches(mesh: Mesh, parallel: Any, model: DiT) -> None:
    layout = mesh.layout
    for key in ("tp", "ulysses", "ring", "pp"):
        if getattr(parallel, key) != layout.size(key):
            raise LayoutError(f"parallel.{key}={getattr(parallel, key)} but the mesh was built with "
                              f"{key}={layout.size(key)}; build the mesh from the same config")
    arch = model.arch
    layout.validate(layout.world_size, heads=arch.heads, hidden=arch.hidden,
                    mlp_hidden=model.blocks[0].mlp.fc1.out_features, depth=arch.depth)
    # pp > 1: parallelize() still applies tp/ulysses/ring to the whole model; the caller then
    # keeps this rank's stage of it (megasora/parallel/pipeline.py: build_stage).


def parallelize(model: DiT, mesh: Mesh, parallel: Any, attention_backend: str = "auto") -> DiT:
    """tp -> sequence-parallel attention -> sequence hook, in place; returns the model.

    `parallel` is a config.ParallelConfig (tp, ulysses, ring, pp) matching `mesh`.
    """
    check_layout_matches(mesh, parallel, model)
    # 1. Tensor parallel first: it replaces linears (slicing the full weights) and registers
    #    the tp gradient hooks on every parameter that remains replicated.
    if mesh.size("tp") > 1:
        apply_tensor_parallel(model, mesh)
    # 2. Self-attention function: ulysses, ring or both (USP) over the sp sub-mesh. It sees
    #    this rank's heads after tp, so heads are split tp first, ulysses second.
    if mesh.size("sp") > 1:
        attention = sequence_attention(mesh, attention_backend)
        for block in model.blocks:
            block.attn.attention = attention
    # 3. Sequence hook last: it shards tokens over tp x sp after patch embedding and gathers
    #    the final layer's output; needed whenever anything splits the sequence.
    if mesh.size("tpsp") > 1:
        model.sequence = SequenceShard(mesh)
    return model


def init_parallel(model: DiT, parallel: Any, world_size: int, zero_stage: int = 0,
                  attention_backend: str = "auto") -> Mesh:
    """Validate the layout against the model BEFORE creating any group, build the mesh, parallelize.

    Needs the default process group; returns the mesh (dp rank/size/group and MeshMPU come from it).
    """
    layout = ParallelLayout.from_config(parallel, world_size)
    arch = model.arch
    layout.validate(world_size, heads=arch.heads, hidden=arch.hidden,
                    mlp_hidden=model.blocks[0].mlp.fc1.out_features, depth=arch.depth)
    layout.validate_zero_stage(zero_stage)
    mesh = build_mesh(layout)
    parallelize(model, mesh, parallel, attention_backend)
    return mesh
