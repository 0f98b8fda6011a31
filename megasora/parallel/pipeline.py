"""Pipeline stages of the DiT: which blocks each stage owns, and what travels between stages.

A stage is the (already tp/sp-parallelized) DiT with every module it does not own removed,
and it runs DiT.forward, which embeds the inputs only on the first and runs the final layer
only on the last stage:

    stage 0:      patch_embed, t_embed, caption, blocks[0:b1]
    stage s:      blocks[b_s:b_{s+1}]
    stage p-1:    blocks[b_{p-1}:depth], final (+ the loss, computed by the caller)

Blocks keep their global index (`blocks.7.attn.q.weight` on whichever stage owns block 7),
so the union of the stages' state dicts is exactly the single-process DiT's state dict.

What crosses a stage boundary (docs/pipeline.md explains the choice): only tensors that
need a gradient, packed into ONE (B, n + c + L, D) message per micro-batch (models/dit.py:
pack_message) —

    x      (B, n, D)  residual stream, this rank's tp/sp chunk of the sequence
    cond   (B, c, D)  timestep (+ pooled caption) embedding, c = 1 (per sample) or n (per token)
    text   (B, L, D)  projected caption tokens

cond and text are outputs of stage 0's parameters (t_embed, caption) used by every block,
so their gradients must flow back to stage 0: they travel, as activations. Everything
without a gradient — RoPE cos/sin, the key-padding mask, the text mask after caption
dropout, the token grid — is a deterministic function of the micro-batch, which every
stage holds (the data stream gives all ranks of a pp group the same samples), so each
stage recomputes it instead of receiving it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megasora.models.dit import DiT
from megasora.models.wan import WanModel
from megasora.parallel.mesh import Mesh


def balanced_boundaries(costs: list[int], stages: int) -> list[int]:
    """Split len(costs) blocks into `stages` contiguous non-empty runs minimising the largest run cost.

    Returns the first block index of stages 1..stages-1. Among splits with the same largest
    cost, later stages are filled first: under 1F1B stage s keeps up to (stages - s)
    micro-batches of activations alive, so the early stages are the ones short of memory.
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} blocks into {stages} non-empty stages")

    def fill_from_end(cap: int) -> list[int] | None:
        starts, end = [], n
        for stage in range(stages - 1, 0, -1):
            start, load = end, 0
            # take blocks while they fit, leaving at least one block for each earlier stage
            while start - 1 >= stage and load + costs[start - 1] <= cap:
                start -= 1
                load += costs[start]
            if start == end:
                return None
            starts.append(start)
            end = start
        return sorted(starts) if sum(costs[:end]) <= cap else None

    lo, hi = max(costs), sum(costs)
    while lo < hi:  # smallest feasible bottleneck
        mid = (lo + hi) // 2
        if fill_from_end(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    result = fill_from_end(lo)
    assert result is not None
    return result


def stage_ranges(model: DiT, stages: int, boundaries: list[int] | None = None) -> list[tuple[int, int]]:
    """[(first block, end block)) per stage, from explicit boundaries or balanced by parameter count."""
    depth = len(model.blocks)
    if not boundaries:
        costs = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
        boundaries = balanced_boundaries(costs, stages)
    if len(boundaries) != stages - 1 or not all(a < b for a, b in zip([0] + boundaries, boundaries + [depth])):
        raise ValueError(f"parallel.pp_boundaries={boundaries} must be {stages - 1} strictly increasing block "
                         f"indices in (0, {depth})")
    edges = [0] + list(boundaries) + [depth]
    return list(zip(edges[:-1], edges[1:]))


class StageBlocks(nn.ModuleDict):
    """A stage's blocks under their global index: named `blocks.7...` and looked up as `blocks[7]`,
    like the full DiT's ModuleList."""

    def __getitem__(self, index: int | str) -> nn.Module:
        return super().__getitem__(str(index))


class DiTStage(DiT):
    """One pipeline stage of a DiT (see the module docstring for what it owns and exchanges).

    Its forward is DiT.forward over the blocks it holds: forward(latents, t, text, text_mask,
    drop_text, received) embeds the inputs on stage 0 and unpacks `received` on later stages;
    the last stage returns the predicted velocity (B, C, T, H, W), the others the packed
    message for the next stage (shape: message_shape(latents, t, text)).
    """

    def __init__(self, model: DiT, stage: int, stages: int, first_block: int, end_block: int) -> None:
        nn.Module.__init__(self)  # adopts the parallelized model's modules; DiT.__init__ would build new ones
        self.arch = model.arch
        self.stage, self.stages = stage, stages
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        if self.is_first:
            self.patch_embed, self.t_embed, self.caption = model.patch_embed, model.t_embed, model.caption
        # The DiT's blocks are a ModuleList; a stage's are keyed by global index, looked up the same way.
        held = {str(i): model.blocks[i] for i in range(first_block, end_block)}
        self.blocks = StageBlocks(held)  # type: ignore[assignment]
        if self.is_last:
            self.final = model.final
        self.sequence = model.sequence


class WanStage(DiTStage, WanModel):
    """One pipeline stage of a WanModel: DiTStage's modules, WanModel's message (x, the (B, c, 7D)
    cond as 7c rows, the text_len text tokens) and output head, by inheritance (no forward of its own)."""


def build_stage(model: DiT, stage: int, stages: int, boundaries: list[int] | None = None) -> DiTStage:
    """Keep stage `stage` of `model` (call after parallelize(), which shards the whole model)."""
    first, end = stage_ranges(model, stages, boundaries)[stage]
    kind = WanStage if isinstance(model, WanModel) else DiTStage
    return kind(model, stage, stages, first, end)


def gather_stages(local: dict[str, torch.Tensor], mesh: Mesh) -> dict[str, torch.Tensor]:
    """Union of every stage's state dict (names are the full DiT's), on every rank of the pp group
    (for tests and inspection: checkpoints and previews never gather the model).

    Pass tp-unsharded tensors (parallel/tensor.py: full_state_dict) to get the whole model. Only
    names, shapes and dtypes travel as Python objects; each stage broadcasts its tensors in turn.
    """
    group, ranks = mesh.group("pp"), mesh.ranks["pp"]
    specs: list[Any] = [None] * len(ranks)
    dist.all_gather_object(specs, [(name, tuple(t.shape), t.dtype) for name, t in local.items()], group=group)
    device = next(iter(local.values())).device
    whole = {}
    for src, spec in zip(ranks, specs):
        for name, shape, dtype in spec:
            mine = src == mesh.rank
            tensor = local[name].detach().contiguous() if mine else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(tensor, src, group=group)
            whole[name] = tensor.clone() if mine else tensor
    return whole
