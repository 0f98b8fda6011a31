"""Analytic communication volume of one optimizer step, per rank, per mesh axis and kind.

Plain functions of a workload and a layout (plan/workload.py): no torch, no process group,
microseconds to evaluate, so the planner, `megasora scale` and the tests can all call them.
The counter in megasora/train/accounting.py measures the same quantity at the
torch.distributed seam, and tests/test_accounting.py holds the two equal, byte for byte.

What "bytes" means (the NCCL-tests "algorithm bytes" convention)
----------------------------------------------------------------
For a collective, the bytes of the full tensor the collective is about, as handed to it
by this rank:

    all_reduce       the buffer reduced (input = output size)
    all_gather       the gathered OUTPUT (group size x this rank's piece)
    reduce_scatter   the full INPUT (group size x this rank's piece of the result)
    all_to_all       the input (= output) buffer
    broadcast/reduce the buffer
    p2p              the bytes this rank SENDS (a receive is counted at its sender)

so the time of a bandwidth-bound collective over a group of P ranks with per-rank link
bandwidth `bw` (bytes/s, one direction) is

    time = bus_factor(kind, P) * bytes / bw        (see `bus_factor`, `transfer_seconds`)

with the ring factors explicit: 2(P-1)/P for all_reduce, (P-1)/P for all_gather,
reduce_scatter and all_to_all, 1 for p2p / broadcast / reduce. A group of one rank moves
nothing and is left out.

Axes. A collective is attributed to the mesh axes its group spans, counting only axes of
size > 1: one axis gives its name (dp, tp, ulysses, ring, pp); a group spanning several
(DeepSpeed's dp x sp gradient group when both are > 1, the world group) gives them joined
by "+" in rank order, innermost first, e.g. "ulysses+dp". Its link is the slowest one those
axes cross.

Scope: the collectives issued inside the training step (forward, backward, optimizer step
and the logged-loss averaging); the loop's bookkeeping (preemption flag, sample-id audit,
checkpoints) is not part of a step. Assumptions: the sequence length N is what the ranks
exchange (padded to a multiple of tp*ulysses*ring if it isn't one), caption length is
`text_tokens`, timesteps are per sample (`per_token_timesteps=False`: cond is one token;
conditioning frames make it per token). Padding masks (a uint8 row per Ulysses gather, a
bias row per ring hop) are not modelled.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache

from megasora.models.dit import DiTArch
from megasora.models.flops import TIMESTEP_FREQ_DIM, block_linears, ffn_width, lora_block_targets
from megasora.models.wan import MODULATIONS, WanArch
from megasora.parallel.activation_checkpointing import checkpointed_blocks
from megasora.parallel.mesh import ParallelLayout, axis_name
from megasora.plan.workload import Layout, Workload

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "p2p")
LOSS_BYTES = 8           # the logged loss travels as one float64
NORM_BYTES = 4           # DeepSpeed's global gradient norm: one fp32 scalar
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default (elements)

Volume = dict[str, dict[str, int]]  # axis -> kind -> bytes


def bus_factor(kind: str, group_size: int) -> float:
    """Bytes on the busiest link per byte of `bytes` (ring algorithms; NCCL-tests 'busbw')."""
    p = group_size
    if p <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2.0 * (p - 1) / p
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (p - 1) / p
    if kind in ("p2p", "broadcast", "reduce"):
        return 1.0
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {KINDS}")


def transfer_seconds(kind: str, nbytes: float, group_size: int, bandwidth: float, latency: float = 0.0) -> float:
    """Bandwidth-bound time of one collective of `nbytes` (this module's convention) on links of
    `bandwidth` bytes/s per rank and direction, plus a fixed `latency`."""
    if group_size <= 1 or nbytes == 0:
        return 0.0
    return latency + bus_factor(kind, group_size) * nbytes / bandwidth


# ------------------------------------------------------------------ model shapes


def stage_block_counts(depth: int, stages: int, boundaries: list[int] | None = None) -> list[int]:
    """Blocks per pipeline stage: explicit boundaries, or what parallel/pipeline.py's
    balanced_boundaries gives equal-cost blocks: at most ceil(depth/stages) per stage, filled
    from the last stage backwards, so the early stages (most micro-batches in flight) get fewer."""
    if boundaries:
        edges = [0] + list(boundaries) + [depth]
        return [b - a for a, b in zip(edges[:-1], edges[1:])]
    cap, end, counts = math.ceil(depth / stages), depth, [0] * stages
    for stage in range(stages - 1, 0, -1):
        counts[stage] = min(cap, end - stage)  # leave one block for each earlier stage
        end -= counts[stage]
    counts[0] = end
    return counts


def dit_param_counts(arch: DiTArch, tp: int = 1) -> dict[str, dict[str, int]]:
    """Parameters of the DiT's pieces on one tp rank.

    {piece: {"matrix": ..., "vector": ..., "replicated": ...}} for piece in block (one block),
    embed (patch, timestep and caption embeddings) and final. `matrix` are the weight matrices
    (train/engine.py's weight-decay group), `vector` the biases, norms and the null caption
    (its no-decay group); `replicated` is what every tp rank holds whole (norms, qk-norms,
    row-parallel biases, everything outside the blocks but the final adaLN), whose gradients
    tp sums. adaLN is column-parallel like q/k/v (parallel/tensor.py: ModulationLinear).
    """
    if isinstance(arch, WanArch):
        return wan_param_counts(arch, tp)
    d, h, text_dim = arch.hidden, arch.heads, arch.text_dim
    mlp = int(d * arch.mlp_ratio)
    patch_in = arch.in_channels * math.prod(arch.patch)
    qk = 2 * (d // h) if arch.qk_norm else 0
    sharded_matrix = 2 * 4 * d * d + 2 * d * mlp + 6 * d * d  # q, k, v, out of both attentions; fc1, fc2; adaLN
    sharded_vector = 2 * 3 * d + mlp + 6 * d                  # column-parallel biases: q, k, v; fc1; adaLN
    replicated_vector = 2 * d + 2 * qk + 2 * d + d            # cross_norm, qk-norms, out biases, fc2 bias
    block = {"matrix": sharded_matrix // tp, "vector": sharded_vector // tp + replicated_vector,
             "replicated": replicated_vector}
    pooled = int(arch.pooled_text)  # the pooled caption MLP (model.pooled_text)
    embed_matrix = patch_in * d + TIMESTEP_FREQ_DIM * d + d * d + (1 + pooled) * (text_dim * d + d * d)
    embed_vector = d + 2 * d + (1 + pooled) * 2 * d + text_dim  # biases; null caption embedding
    final_replicated = d * patch_in + patch_in  # the output linear; its adaLN (2D x D) is column-parallel
    final = {"matrix": 2 * d * d // tp + d * patch_in, "vector": 2 * d // tp + patch_in, "replicated": final_replicated}
    return {"block": block,
            "embed": {"matrix": embed_matrix, "vector": embed_vector, "replicated": embed_matrix + embed_vector},
            "final": final}


def wan_param_counts(arch: WanArch, tp: int = 1) -> dict[str, dict[str, int]]:
    """dit_param_counts of the Wan family (models/wan.py; diffusers' WanTransformer3DModel).

    A block has no adaLN linear: a (1, 6, D) table (a matrix for weight decay: 3 dims), replicated.
    Its qk-norms are (D,) weights over all heads, split over tp with the q/k columns
    (parallel/tensor.py TensorParallelRMSNorm); the cross-attention's affine LayerNorm is replicated.
    The embeddings hold the shared 6D time projection; the output head a (1, 2, D) table and proj_out.
    """
    d, f, text_dim = arch.hidden, arch.ffn_width, arch.text_dim
    patch_in = arch.in_channels * math.prod(arch.patch)
    sharded_matrix = 2 * 4 * d * d + 2 * d * f       # q, k, v, out of both attentions; fc1, fc2
    sharded_vector = 2 * 3 * d + f + 2 * 2 * d       # q, k, v biases; fc1 bias; q/k norms of both attentions
    replicated_vector = 2 * d + d + 2 * d * arch.cross_attn_norm  # out biases, fc2 bias, cross LayerNorm
    table = MODULATIONS * d
    block = {"matrix": sharded_matrix // tp + table, "vector": sharded_vector // tp + replicated_vector,
             "replicated": replicated_vector + table}
    embed_matrix = patch_in * d + arch.freq_dim * d + d * d + d * MODULATIONS * d + text_dim * d + d * d
    embed_vector = d + 2 * d + MODULATIONS * d + 2 * d  # biases: patch, time MLP, time projection, caption
    final_matrix = d * patch_in + 2 * d
    return {"block": block,
            "embed": {"matrix": embed_matrix, "vector": embed_vector, "replicated": embed_matrix + embed_vector},
            "final": {"matrix": final_matrix, "vector": patch_in, "replicated": final_matrix + patch_in}}


def stage_params(arch: DiTArch, layout: ParallelLayout, stage: int,
                 boundaries: Sequence[int] = ()) -> dict[str, int]:
    """Local parameters of pipeline stage `stage` on one rank: {"matrix", "vector", "replicated"}, and
    `largest_matrix` (the adaLN, fc1/fc2 or caption projection, elements, upper bound for the stage)."""
    counts = dit_param_counts(arch, layout.tp)
    blocks = stage_block_counts(arch.depth, layout.pp, list(boundaries) or None)[stage]
    pieces = [("block", blocks), ("embed", int(stage == 0)), ("final", int(stage == layout.pp - 1))]
    out = {key: sum(counts[piece][key] * k for piece, k in pieces) for key in ("matrix", "vector", "replicated")}
    mlp = ffn_width(arch)
    out["largest_matrix"] = max(arch.hidden * 6 * arch.hidden // layout.tp, arch.hidden * mlp // layout.tp,
                                arch.text_dim * arch.hidden)
    return out


@lru_cache(maxsize=4096)
def lora_block_params(arch: DiTArch, tp: int, rank: int, targets: tuple[str, ...]) -> tuple[int, int]:
    """(adapter parameters of one block on one tp rank, of which replicated over tp): A (r, in) and
    B (out, r) per adapted linear; a column-parallel linear's B and a row-parallel one's A are cut
    over tp, the other factor is whole (parallel/lora.py)."""
    linears = block_linears(arch)
    total = replicated = 0
    for name in lora_block_targets(arch, targets):
        d_in, d_out, _, split = linears[name]
        a, b = rank * d_in, d_out * rank
        if split == "column":
            b, replicated = b // tp, replicated + a
        else:
            a, replicated = a // tp, replicated + b
        total += a + b
    return total, replicated


def lora_trained_params(work: Workload, layout: ParallelLayout, stage: int,
                        boundaries: Sequence[int] = ()) -> dict[str, int]:
    """The adapters of pipeline stage `stage` on one rank, in stage_params' keys (LoRA trains only them)."""
    per_block, replicated = lora_block_params(work.arch, layout.tp, work.lora_rank, work.lora_targets)
    blocks = stage_block_counts(work.arch.depth, layout.pp, list(boundaries) or None)[stage]
    return {"matrix": blocks * per_block, "vector": 0, "replicated": blocks * replicated, "largest_matrix": 0}


def stage_checkpointed_blocks(depth: int, layout: Layout, stage: int, boundaries: Sequence[int] = ()) -> int:
    """Blocks of pipeline stage `stage` that activation checkpointing re-runs in backward
    (parallel/activation_checkpointing.py's rule: global index % ac_every == 0)."""
    counts = stage_block_counts(depth, layout.pp, list(boundaries) or None)
    first = sum(counts[:stage])
    chosen = checkpointed_blocks(depth, layout.activation_checkpointing, layout.ac_every)
    return sum(1 for i in chosen if first <= i < first + counts[stage])


# ------------------------------------------------------------------ the volume


class _Tally:
    def __init__(self, layout: ParallelLayout) -> None:
        self.layout = layout
        self.volume: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, axes: tuple[str, ...], kind: str, nbytes: float) -> None:
        name = axis_name(axes, self.layout)
        if name is not None and nbytes:
            self.volume[name][kind] += int(nbytes)

    def result(self) -> Volume:
        return {axis: dict(kinds) for axis, kinds in self.volume.items()}


def comm_volume(work: Workload, layout: Layout, *, stage: int = 0, pp_boundaries: Sequence[int] = (),
                per_token_timesteps: bool = False) -> Volume:
    """Bytes one rank (of pipeline stage `stage`) hands to each kind of collective on each axis
    in one optimizer step: {axis: {kind: bytes}} (see the module docstring for the convention).

    `work` gives the model, tokens and text tokens per sample and the dtype; `layout` the degrees,
    ZeRO stage, checkpointing and micro-batching; `pp_boundaries` parallel.pp_boundaries (empty:
    balanced stages).
    """
    act = work.act_bytes                           # activation / gradient element bytes
    micro, b = layout.grad_accum, layout.micro_batch_size
    d, shards = work.arch.hidden, layout.tp * layout.sp
    n = math.ceil(work.tokens / shards) * shards   # tokens exchanged (padded)
    blocks = stage_block_counts(work.arch.depth, layout.pp, list(pp_boundaries) or None)[stage]
    recomputed = stage_checkpointed_blocks(work.arch.depth, layout, stage, pp_boundaries)
    full_ac = layout.activation_checkpointing == "full"
    tally = _Tally(layout)

    cond = 1 if not per_token_timesteps else n // shards  # adaLN input tokens per rank
    wan = isinstance(work.arch, WanArch)
    # Per micro-batch, per block: what its forward (f) and backward (b) pass exchange.
    per_mb = _block_traffic(layout, b, n, d, act, cond, wan_text_tokens=work.text_tokens if wan else None)
    for kind_key, nbytes in per_mb.items():
        axes, kind, when = kind_key
        runs = blocks
        if when == "fwd":  # recompute re-runs forward comm: tp always, sp only under full AC
            runs += recomputed if (axes == ("tp",) or full_ac) else 0
        tally.add(axes, kind, micro * runs * nbytes)

    if stage == layout.pp - 1 and shards > 1:  # each span's squared-error sum, summed over tp x sp (the
        # loss is computed per span: parallel/sequence.py SequenceShard.sum; no output is gathered)
        tally.add(("tp", "ulysses", "ring"), "all_reduce", micro * 4)  # one fp32 scalar per micro-batch
    if stage == layout.pp - 1 and layout.tp > 1 and not wan:  # the final layer's adaLN, forward and backward
        for (kind, _), nbytes in _modulation_traffic(layout.tp, b * cond, d, 2 * d, act).items():
            tally.add(("tp",), kind, micro * nbytes)

    params = stage_params(work.arch, layout, stage, pp_boundaries)
    trained = lora_trained_params(work, layout, stage, pp_boundaries) if work.lora_rank else params
    tally.add(("tp",), "all_reduce", micro * trained["replicated"] * act)  # tp hooks sum replicated grads
    _deepspeed_traffic(tally, layout, layout.zero_stage, micro, params, act, work.grad_reduce_bytes, trained)
    if layout.pp > 1:
        cond_rows = cond * (1 + MODULATIONS) if wan else cond  # Wan's cond is (B, c, 7D): 7c rows of D
        _pipeline_traffic(tally, layout, stage, micro, b, n // shards, cond_rows, work.text_tokens, d, act)
        tally.add(("pp",), "broadcast", LOSS_BYTES)                # the last stage's loss
    tally.add(("dp",), "all_reduce", LOSS_BYTES)                   # logged loss averaged over dp
    return tally.result()


def _block_traffic(layout: ParallelLayout, b: int, n: int, d: int, act: int, cond: int = 1,
                   wan_text_tokens: int | None = None) -> dict[tuple[tuple[str, ...], str, str], float]:
    """{(axes, kind, fwd|bwd): bytes} of one block for one micro-batch of b samples of n tokens
    (`cond`: adaLN input tokens per rank, 1 for per-sample timesteps). A Wan block
    (`wan_text_tokens` = its text_len) has no adaLN linear; under tp its all-heads qk-norms
    all-reduce one fp32 sum of squares per row: self q and k, cross q (attention tokens each)
    and cross k (text tokens), forward and backward (parallel/tensor.py TensorParallelRMSNorm)."""
    out: dict[tuple[tuple[str, ...], str, str], float] = defaultdict(float)
    attn_tokens = n // layout.sp  # tokens a rank's attention chunk holds (tp gathers its residual pieces)
    if layout.tp > 1:
        # 3 sublayers (cross-attn, self-attn, MLP): all-gather in, reduce-scatter out; adjoint in backward
        chunk = b * attn_tokens * d * act
        for when in ("fwd", "bwd"):
            out[(("tp",), "all_gather", when)] += 3 * chunk
            out[(("tp",), "reduce_scatter", when)] += 3 * chunk
        if wan_text_tokens is None:
            for (kind, when), nbytes in _modulation_traffic(layout.tp, b * cond, d, 6 * d, act).items():
                out[(("tp",), kind, when)] += nbytes
        else:
            for when in ("fwd", "bwd"):
                out[(("tp",), "all_reduce", when)] += b * (3 * attn_tokens + wan_text_tokens) * 4
    heads_width = d // layout.tp  # this rank's heads after tp, times head dim
    if layout.ulysses > 1:
        # q, k, v in and out: 4 all-to-alls of the (B, H, N_ring, Dh) chunk, each way
        qkvo = 4 * b * attn_tokens * heads_width * act
        out[(("ulysses",), "all_to_all", "fwd")] += qkvo
        out[(("ulysses",), "all_to_all", "bwd")] += qkvo
    if layout.ring > 1:
        r = layout.ring
        ring_chunk = b * (n // r) * (heads_width // layout.ulysses)  # elements of K (or V): (B, H/U, N/R, Dh)
        kv = 2 * ring_chunk * act
        out[(("ring",), "p2p", "fwd")] += (r - 1) * kv
        # backward: K/V travel again (r-1 hops) and fp32 dK/dV accumulators make r hops
        out[(("ring",), "p2p", "bwd")] += (r - 1) * kv + r * 2 * ring_chunk * 4
    return out


def _modulation_traffic(tp: int, rows: int, d: int, width: int, act: int) -> dict[tuple[str, str], float]:
    """{(kind, fwd|bwd): bytes} of one adaLN under tp (parallel/tensor.py ModulationLinear) for `rows` =
    B x cond tokens: silu(cond) all-gathered in (tp x rows x D), the (rows, width) modulation
    all-to-all'd out; backward the reduce-scatter and the all-to-all back."""
    gathered, modulation = tp * rows * d * act, rows * width * act
    return {("all_gather", "fwd"): gathered, ("all_to_all", "fwd"): modulation,
            ("reduce_scatter", "bwd"): gathered, ("all_to_all", "bwd"): modulation}


def _deepspeed_traffic(tally: _Tally, layout: ParallelLayout, zero_stage: int, micro: int, params: dict[str, int],
                       act: int, reduce_bytes: int, trained: dict[str, int] | None = None) -> None:
    """DeepSpeed 0.19's gradient averaging over dp x sp (MeshMPU's sequence-data-parallel group),
    the parameter gather of ZeRO and the global gradient norm, as its code issues them. Gradients
    travel in `reduce_bytes` per element (train.grad_reduce_dtype), parameters in `act`. `trained`
    (default `params`): the parameters with gradients; under LoRA the adapters, which are all
    ZeRO 1/2 gather after the step, while ZeRO-3 still gathers the frozen base to compute."""
    dpsp, mp = ("ulysses", "ring", "dp"), ("tp", "pp")
    if trained is not None and zero_stage < 3:
        params = trained
    trained = params if trained is None else trained
    grads = (trained["matrix"] + trained["vector"]) * reduce_bytes
    if zero_stage == 0:      # engine.allreduce_gradients at the boundary; utils.clip_grad_norm_
        tally.add(dpsp, "all_reduce", grads)
        tally.add(mp, "all_reduce", NORM_BYTES)
        tally.add(("dp",), "all_reduce", NORM_BYTES)
        return
    if zero_stage in (1, 2):
        # bucketed all-reduce (use_multi_rank_bucket_allreduce): ZeRO-2 on every micro-batch's
        # backward, ZeRO-1 once at the boundary; then each rank's updated partition all-gathered,
        # per param group (decay / no-decay), padded to 2 x ranks elements; norm per param group.
        tally.add(dpsp, "all_reduce", grads * (micro if zero_stage == 2 else 1))
        ranks = math.prod(getattr(layout, a) for a in dpsp)
        align = 2 * ranks
        padded = sum(math.ceil(params[k] / align) * align for k in ("matrix", "vector"))
        tally.add(dpsp, "all_gather", padded * act)
        tally.add(dpsp, "all_reduce", 2 * NORM_BYTES)
        tally.add(mp, "all_reduce", 2 * NORM_BYTES)
        return
    # ZeRO-3: gradients reduce-scattered to their owners on every micro-batch. Parameters below
    # DeepSpeed's stage3_param_persistence_threshold stay whole ("persistent"): gathered once per
    # step after the update. Larger ones (here: the weight matrices, when one matrix reaches the
    # threshold) are gathered for each forward and again for each backward; that part is an
    # estimate (prefetch and reuse can save gathers) that no test holds exact. The first step
    # traces the module order and gathers more; this is the steady state.
    tally.add(dpsp, "reduce_scatter", micro * grads)
    largest_matrix = params.get("largest_matrix", 0)
    gathered = params["matrix"] if largest_matrix >= ZERO3_PERSISTENCE_THRESHOLD else 0
    tally.add(dpsp, "all_gather", (params["matrix"] + params["vector"] - gathered) * act)
    tally.add(dpsp, "all_gather", 2 * micro * gathered * act)
    tally.add(dpsp, "all_reduce", 4 * NORM_BYTES)
    tally.add(mp, "all_reduce", 4 * NORM_BYTES)


def _pipeline_traffic(tally: _Tally, layout: ParallelLayout, stage: int, micro: int, b: int, n_local: int, cond: int,
                      text_tokens: int, d: int, act: int) -> None:
    """1F1B: one (B, n + c + L, D) activation to the next stage and its gradient back, per micro-batch."""
    message = b * (n_local + cond + text_tokens) * d * act
    sends = (stage < layout.pp - 1) + (stage > 0)
    tally.add(("pp",), "p2p", micro * sends * message)


def total_bytes(volume: Volume) -> dict[str, int]:
    """Bytes per axis, summed over kinds."""
    return {axis: sum(kinds.values()) for axis, kinds in volume.items()}
