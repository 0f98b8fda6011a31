"""Step time of one layout: compute / (peak x efficiency) + the communication each axis exposes
+ the pipeline bubble. Plain functions; communication bytes come from plan/communication.py.

Per pipeline stage and micro-batch (b samples of N tokens, the rank's share 1/(tp*sp)):

    compute   = 3 x forward FLOPs (models/flops.py) / (peak x efficiency); LoRA: forward + the frozen
                base's input gradients (flops.py frozen_backward_flops) + 3 x the adapters' forward
    recompute = what activation checkpointing re-runs (full: the whole block forward,
                selective: all but the self-attention products) / (peak x efficiency)

Communication per step and axis = sum over kinds of bus_factor x bytes / (link x link_efficiency)
(communication.py's convention), on the link the axis runs on: an axis group is inside a node
when the product of the sizes of every axis up to and including it in the rank order
tp -> ulysses -> ring -> dp -> pp is <= GPUs per node, otherwise on the network. What is exposed:

    tp, ulysses   all of it: the all-gathers / reduce-scatters / all-to-alls sit between matmuls
    ring          what the attention of the other ring blocks does not hide: max(0, ring - attention)
    dp (+sp)      all of it: our DeepSpeed config reduces in the backward hooks (overlap_comm off
                  at ZeRO 1/2) and gathers updated weights after the step
    pp            the 1F1B point-to-point sends, blocking

Pipeline: step = (grad_accum + pp - 1) x per-micro-batch stage time, the bubble being the
(pp - 1) extra slots.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megasora.hardware import Hardware
from megasora.models.flops import (
    block_forward_flops,
    dit_train_flops,
    embed_forward_flops,
    frozen_backward_flops,
    lora_forward_flops,
)
from megasora.parallel.mesh import AXES
from megasora.plan.communication import bus_factor, comm_volume, stage_checkpointed_blocks
from megasora.plan.memory import stage_block_counts
from megasora.plan.workload import Layout, Workload


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step on the slowest pipeline stage."""
    compute_s: float                 # model FLOPs, all micro-batches
    recompute_s: float               # activation-checkpointing re-runs
    comm_s: dict[str, float] = field(default_factory=dict)  # exposed seconds per axis name
    bubble_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.compute_s + self.recompute_s + sum(self.comm_s.values()) + self.bubble_s


def axis_link(axis: str, layout: Layout, gpus_per_node: int, hw: Hardware) -> float:
    """Bytes/s per GPU of the link a group spanning `axis` ("tp", "ulysses+dp", ...) runs on."""
    outermost = max(AXES.index(a) for a in axis.split("+"))
    span = 1
    for a in AXES[:outermost + 1]:
        span *= getattr(layout, a)
    raw = hw.intra_bytes_per_s if span <= gpus_per_node else hw.inter_bytes_per_s
    return raw * hw.link_efficiency


def comm_seconds(work: Workload, layout: Layout, stage: int, gpus_per_node: int,
                 hw: Hardware) -> dict[tuple[str, str], float]:
    """Bandwidth-bound seconds of one step for `stage`, per (axis, kind), ring factors applied
    (balanced pipeline stages, as the planner's memory model assumes)."""
    volume = comm_volume(work, layout, stage=stage)
    out = {}
    for axis, kinds in volume.items():
        group = 1
        for a in axis.split("+"):
            group *= getattr(layout, a)
        bw = axis_link(axis, layout, gpus_per_node, hw)
        for kind, nbytes in kinds.items():
            out[(axis, kind)] = bus_factor(kind, group) * nbytes / bw
    return out


def stage_flops(work: Workload, layout: Layout, stage: int) -> tuple[float, float, float]:
    """(FLOPs, recompute FLOPs, self-attention FLOPs) of one micro-batch on one rank of `stage`.

    A rank computes 1/(tp*sp) of the per-token work (blocks, and since the sequence is sharded
    before it exists whole, its span's patch embedding and final linear), but some work whole
    (replicated_forward_flops): the timestep MLP and caption projection on stage 0, and the
    cross-attention k/v projections of the caption, cut over tp only, on every sp rank."""
    n, l, b = work.tokens, work.text_tokens, layout.micro_batch_size
    share = b / (layout.tp * layout.sp)
    block = block_forward_flops(work.arch, n, l)
    blocks = stage_block_counts(work.arch.depth, layout.pp)[stage]
    forward = blocks * (block["self_attention"] + block["rest"])
    token_embed = token_embed_flops(work, n)
    if stage == 0:
        forward += token_embed / 2
    if stage == layout.pp - 1:
        forward += token_embed / 2
    forward = forward * share + replicated_forward_flops(work, layout, stage)
    ckpt = stage_checkpointed_blocks(work.arch.depth, layout, stage)
    recompute = ckpt * (block["rest"] + (block["self_attention"] if layout.activation_checkpointing == "full" else 0))
    attention = 3 * blocks * block["self_attention"] * share
    if work.lora:  # frozen base: backward = input gradients only; the adapters train (flops.py)
        part = blocks / work.arch.depth
        backward = frozen_backward_flops(work.arch, n, l) * part
        adapters = lora_forward_flops(work.arch, n, l, work.lora_rank, work.lora_targets) * part
        return forward + (backward + 3 * adapters) * share, recompute * share, attention
    return 3 * forward, recompute * share, attention


def token_embed_flops(work: Workload, tokens: int) -> float:
    """Patch embedding + final linear of one sample: the per-token part of embed_forward_flops."""
    return 2 * 2.0 * tokens * work.arch.in_channels * work.patch_volume * work.arch.hidden


def replicated_forward_flops(work: Workload, layout: Layout, stage: int) -> float:
    """Forward FLOPs one rank of `stage` computes whole for its micro-batch, beyond its 1/(tp*sp)
    share: stage 0's timestep MLP and caption projection (embed_forward_flops less the per-token
    part; replicated parameters, every rank runs them), and every stage's cross-attention k/v
    projections of the caption, column-parallel over tp but repeated on each sp rank."""
    n, l, b, d = work.tokens, work.text_tokens, layout.micro_batch_size, work.arch.hidden
    blocks = stage_block_counts(work.arch.depth, layout.pp)[stage]
    text_kv = 2 * l * 2 * d * d  # per block and sample: counted in its `rest` at 1/(tp*sp)
    out = blocks * text_kv * b / layout.tp * (1 - 1 / layout.sp)
    if stage == 0:
        out += b * (embed_forward_flops(work.arch, n, l) - token_embed_flops(work, n))
    return out


def stage_time(work: Workload, layout: Layout, hw: Hardware, gpus_per_node: int, stage: int) -> StepTime:
    rate = hw.peak_flops * hw.efficiency
    flops, recompute, attention = stage_flops(work, layout, stage)
    m = layout.grad_accum
    seconds = comm_seconds(work, layout, stage, gpus_per_node, hw)
    if ("ring", "p2p") in seconds:  # K/V hops overlap the attention of the blocks already received
        hidden = m * attention / rate * (layout.ring - 1) / layout.ring
        seconds[("ring", "p2p")] = max(0.0, seconds[("ring", "p2p")] - hidden)
    comm: dict[str, float] = {}
    for (axis, _), value in seconds.items():
        comm[axis] = comm.get(axis, 0.0) + value
    in_block = sum(v for (axis, kind), v in seconds.items()
                   if axis in ("tp", "ulysses") or (axis == "ring" and kind == "p2p"))
    per_micro = (flops + recompute) / rate + in_block / m
    bubble = (layout.pp - 1) * per_micro if layout.pp > 1 else 0.0
    return StepTime(compute_s=m * flops / rate, recompute_s=m * recompute / rate, comm_s=comm, bubble_s=bubble)


def step_time(work: Workload, layout: Layout, hw: Hardware, gpus_per_node: int) -> StepTime:
    """The slowest pipeline stage's step (all stages when pp > 1)."""
    times = [stage_time(work, layout, hw, gpus_per_node, s) for s in range(layout.pp)]
    return max(times, key=lambda t: t.total_s)


def model_flops_per_step(work: Workload, layout: Layout) -> float:
    """Model FLOPs (no recompute) of the whole cluster's step: MFU's numerator."""
    samples = layout.micro_batch_size * layout.grad_accum * layout.dp
    return dit_train_flops(work.arch, work.tokens, work.text_tokens, work.lora_rank, work.lora_targets) * samples
