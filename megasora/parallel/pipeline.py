"""Pipeline stages of the DiT: which blocks each stage owns, and what travels between stages.

A stage is the (already tp/sp-parallelized) DiT with every module it does not own removed:

    stage 0:      patch_embed, t_embed, caption, blocks[0:b1]
    stage s:      blocks[b_s:b_{s+1}]
    stage p-1:    blocks[b_{p-1}:depth], final (+ the loss, computed by the caller)

Blocks keep their global index (`blocks.7.attn.q.weight` on whichever stage owns block 7),
so the union of the stages' state dicts is exactly the single-process DiT's state dict.

What crosses a stage boundary (docs/pipeline.md explains the choice): only tensors that
need a gradient, packed into ONE (B, n + c + L, D) message per micro-batch —

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

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megasora.models.dit import DiT, TokenState, conditioning, rope_tables
from megasora.models.patch import patch_grid, unpatchify
from megasora.parallel.mesh import Mesh

RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (N, Dh/2)


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


def dropped_text_mask(text_mask: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """The text mask CaptionProjection produces: a dropped caption is one null token, then padding."""
    if drop is None:
        return text_mask
    null_mask = torch.zeros_like(text_mask)
    null_mask[:, 0] = True
    return torch.where(drop[:, None], null_mask, text_mask)


class DiTStage(nn.Module):
    """One pipeline stage of a DiT (see the module docstring for what it owns and exchanges).

    forward(latents, t, text, text_mask, drop_text, received) is the DiT's forward cut at the
    stage boundaries: stage 0 ignores `received` and embeds the inputs; later stages unpack
    `received`; the last stage returns the predicted velocity (B, C, T, H, W), the others the
    packed message for the next stage.
    """

    def __init__(self, model: DiT, stage: int, stages: int, first_block: int, end_block: int) -> None:
        super().__init__()
        self.arch = model.arch
        self.stage, self.stages = stage, stages
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        if self.is_first:
            self.patch_embed, self.t_embed, self.caption = model.patch_embed, model.t_embed, model.caption
        # ModuleDict keyed by the global index: parameter names match the full DiT's.
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(first_block, end_block)})
        if self.is_last:
            self.final = model.final
        self.sequence = model.sequence

    def _geometry(self, latents: torch.Tensor, t: torch.Tensor) -> tuple[tuple[int, int, int], RopeTables, TokenState]:
        """Token grid, full RoPE tables and this rank's sharded TokenState layout, without any embedding.

        The placeholder state has feature width 1: the sequence hook slices it exactly as it
        slices the real activations, which yields the local RoPE rows, padding mask and sizes.
        """
        grid = patch_grid(tuple(latents.shape[2:]), self.arch.patch)
        b, n = latents.shape[0], math.prod(grid)
        rope = rope_tables(self.arch, grid, latents.device)
        cond_tokens = 1 if t.dim() == 1 else n
        probe = TokenState(x=latents.new_zeros(b, n, 1), cond=latents.new_zeros(b, cond_tokens, 1),
                           rope=rope, key_padding_mask=None)
        return grid, rope, self.sequence.shard(probe)

    def message_shape(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> tuple[int, int, int]:
        """Shape (B, n + c + L, D) of the activation message entering/leaving a stage for this micro-batch."""
        _, _, local = self._geometry(latents, t)
        b, n, _ = local.x.shape
        return b, n + local.cond.shape[1] + text.shape[1], self.arch.hidden

    def forward(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                drop_text: torch.Tensor | None, received: torch.Tensor | None = None) -> torch.Tensor:
        grid, rope, local = self._geometry(latents, t)
        if self.is_first:
            text_tokens, text_mask, pooled = self.caption(text, text_mask, drop_text)
            state = self.sequence.shard(TokenState(x=self.patch_embed(latents),
                                                   cond=conditioning(self.t_embed(t), pooled),
                                                   rope=rope, key_padding_mask=None))
        else:
            n, c = local.x.shape[1], local.cond.shape[1]
            x, cond, text_tokens = received.split([n, c, received.shape[1] - n - c], dim=1)
            state = TokenState(x=x, cond=cond, rope=local.rope, key_padding_mask=local.key_padding_mask)
            text_mask = dropped_text_mask(text_mask, drop_text)
        for block in self.blocks.values():
            state.x = block(state, text_tokens, text_mask)
        if not self.is_last:
            return torch.cat([state.x, state.cond, text_tokens], dim=1)  # (B, n + c + L, D)
        out = self.sequence.gather(self.final(state.x, state.cond))  # (B, N, pt*ph*pw*C)
        return unpatchify(out, grid, self.arch.patch, self.arch.in_channels)


def build_stage(model: DiT, stage: int, stages: int, boundaries: list[int] | None = None) -> DiTStage:
    """Keep stage `stage` of `model` (call after parallelize(), which shards the whole model)."""
    first, end = stage_ranges(model, stages, boundaries)[stage]
    return DiTStage(model, stage, stages, first, end)


def gather_stages(local: dict[str, torch.Tensor], mesh: Mesh) -> dict[str, torch.Tensor]:
    """Union of every stage's state dict (names are the full DiT's), on every rank of the pp group.

    Pass tp-unsharded tensors (parallel/tensor.py: full_state_dict) to get the whole model.
    """
    parts: list[Any] = [None] * mesh.size("pp")
    dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in local.items()}, group=mesh.group("pp"))
    return {name: tensor for part in parts for name, tensor in part.items()}
