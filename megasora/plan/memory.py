"""Per-GPU memory of one training step: plain functions of (Workload, Layout), in bytes.

Every term is counted from what our code actually keeps alive (tensors saved for backward,
DeepSpeed's buffers), so `MemoryBreakdown.live_bytes` is what an exact live-tensor count
measures at the step's peak (tests/test_plan_memory.py compares the two). On a GPU the
caching allocator, CUDA context, NCCL and cuBLAS add what no tensor count sees; that is the
stated `allowance` (fragmentation share + fixed workspace), added on top for `fits`.

Notation: b micro-batch, N video tokens per sample, L text tokens, D hidden, M = mlp_ratio*D,
H heads; t = tp, s = ulysses*ring (sp). A rank holds r = b*N/(t*s) tokens of the residual
stream and a = b*N/s tokens inside tensor-parallel regions (tp all-gathers its chunks),
with D/t and M/t of the widths there (docs/planning.md explains each term).

Model state (Psi = parameters on the rank: tp shards q/k/v/out, fc1/fc2 and adaLN; norms,
row biases and embeddings are replicated; pp keeps one stage's blocks), ZeRO partitions over
Z = dp*sp ranks (DeepSpeed reduces gradients over dp x sp; mesh.py `dpsp`):

    weights     A Psi (A = 2 bf16, 4 fp32); ZeRO 3: A Psi / Z.
    grads       in the model dtype (DeepSpeed's grad_accum_dtype default): A Psi at ZeRO 0/1,
                A Psi / Z at ZeRO 2/3; at ZeRO 1/2 they pass through the reduce bucket first, so a
                rank with Psi <= 5e8 and one micro-batch per step stores none at the peak (the start
                of backward); with gradient accumulation the partition holds the running sum.
    optimizer   fp32 master copy 4Psi/Z (ZeRO 1-3: DeepSpeed clones its partition even in fp32;
                ZeRO 0 + bf16: 4Psi) and Adam m, v 8Psi/Z (8Psi at ZeRO 0).
    ZeRO 1/2:   one gradient reduce bucket of 5e8 elements (DeepSpeed's reduce_bucket_size) in the
                gradient dtype, two with overlap_comm (on CUDA); ZeRO 3: one (stage3.py keeps one per
                dtype, overlap_comm or not) plus the gathered weights of the block in use and the
                one prefetched.
    reduction:  a bf16 model reducing in fp32 (train.grad_reduce_dtype) copies the bucket being
                reduced to fp32, min(Psi, 5e8) x 4 bytes: during backward with overlap_comm, after
                it otherwise (reduce_transient_bytes).
    EMA:        fp32, 4Psi/Z: each rank keeps its part of every parameter's even split over dp x sp
                (train/ema.py; under ZeRO-3 its own weight partition, nothing gathered).

LoRA (train.lora.rank > 0, parallel/lora.py): the frozen base keeps its weights (ZeRO-3 still
partitions them) but no gradients, master copy or Adam moments; those, and the weights too, count
the adapters instead (`lora_stage_params`), and there is no EMA (config.validate refuses one).

A checkpoint save runs between steps (no activations): its peak is the model state plus what the
save holds at once (`save_transient`), nothing on the device since every rank streams its own
shards (train/checkpoint.py): DeepSpeed's torch.save copies one device storage at a time to the
host, the EMA goes to its file a tensor at a time through the host, nothing is gathered
(bench/bench_checkpoint_memory.py measures 0 torch bytes on CPU, where no copy is made at all).
The save this replaced held on the device a clone of the rank's EMA and the EMA all-gathered
over tp, and with pp the whole model's EMA pickled and unpickled by all_gather_object.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

from megasora.models.dit import DiTArch
from megasora.models.flops import block_linears, lora_block_targets
from megasora.parallel.activation_checkpointing import checkpointed_blocks
from megasora.parallel.p2p import parity_posts_early
from megasora.plan.communication import dit_param_counts, lora_block_params
from megasora.plan.communication import stage_block_counts as _stage_block_counts
from megasora.plan.workload import Layout, Workload

FP32 = 4
REDUCE_BUCKET_ELEMENTS = 5e8       # DeepSpeed zero_optimization.reduce_bucket_size default
ALLOWANCE_FRACTION = 0.10          # caching-allocator fragmentation, share of live bytes
ALLOWANCE_FIXED_BYTES = 2 * 1024 ** 3  # CUDA context ~0.5 GiB + NCCL buffers ~1 GiB + cuBLAS/flash workspaces


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU at the step's peak (the largest pipeline stage)."""
    weights: float
    grads: float
    optimizer: float          # fp32 master partition + Adam moments
    ema: float
    zero_buffers: float       # DeepSpeed reduce buckets (+ ZeRO-3 gathered weights)
    activations: float        # saved for backward, all in-flight micro-batches, all blocks
    transient: float          # the peak's working set: one block's recompute / backward grads / sp buffers
    allowance: float          # stated: fragmentation share + fixed workspaces (0 on CPU)
    save_transient: float = 0.0  # a checkpoint save's bytes beyond the model state (module docstring)
    reduce_transient: float = 0.0  # the fp32 copy of the bucket being reduced (bf16 model, fp32 reduction)

    @property
    def live_bytes(self) -> float:
        """What an exact live-tensor count sees at the peak."""
        return (self.weights + self.grads + self.optimizer + self.ema + self.zero_buffers
                + self.activations + self.transient)

    @property
    def save_peak_bytes(self) -> float:
        """Live bytes at a checkpoint save: the model state and what the save holds."""
        return self.weights + self.grads + self.optimizer + self.ema + self.zero_buffers + self.save_transient

    @property
    def reduce_peak_bytes(self) -> float:
        """Live bytes while a gradient bucket is reduced after backward (overlap_comm off): the model
        state and the bucket's fp32 copy. With overlap_comm the copy is in `transient` instead."""
        return self.weights + self.grads + self.optimizer + self.ema + self.zero_buffers + self.reduce_transient

    @property
    def total_bytes(self) -> float:
        return max(self.live_bytes, self.save_peak_bytes, self.reduce_peak_bytes) + self.allowance

    def terms(self) -> dict[str, float]:
        return asdict(self)

    def largest_term(self) -> tuple[str, float]:
        return max(self.terms().items(), key=lambda kv: kv[1])


# ------------------------------------------------------------------ parameters


@lru_cache(maxsize=4096)
def stage_block_counts(depth: int, pp: int) -> tuple[int, ...]:
    """Blocks per pipeline stage (communication.py's rule, cached: the search asks it often)."""
    return tuple(_stage_block_counts(depth, pp))


@lru_cache(maxsize=4096)
def _cached_param_counts(arch: DiTArch, tp: int) -> tuple[tuple[str, int], ...]:
    counts = dit_param_counts(arch, tp)
    return tuple((piece, c["matrix"] + c["vector"]) for piece, c in counts.items())


def _param_counts(work: Workload, tp: int) -> dict[str, int]:
    """{block, embed, final}: parameters of each piece on one tp rank (communication.py counts them)."""
    return dict(_cached_param_counts(work.arch, tp))


def block_params(work: Workload, tp: int = 1) -> int:
    """Parameters of one DiT block on one tp rank (parallel/tensor.py TP_PLAN)."""
    return _param_counts(work, tp)["block"]


def total_params(work: Workload) -> int:
    """Parameters of the whole single-device model (tests check this against the real DiT)."""
    counts = _param_counts(work, 1)
    return work.arch.depth * counts["block"] + counts["embed"] + counts["final"]


def stage_params(work: Workload, layout: Layout, stage: int) -> int:
    """Parameters pipeline stage `stage` holds on one tp rank (embeddings on 0, final layer on the last)."""
    counts = _param_counts(work, layout.tp)
    params = stage_block_counts(work.arch.depth, layout.pp)[stage] * counts["block"]
    if stage == 0:
        params += counts["embed"]
    if stage == layout.pp - 1:
        params += counts["final"]
    return params


def lora_stage_params(work: Workload, layout: Layout, stage: int) -> int:
    """Adapter parameters pipeline stage `stage` holds on one tp rank (block linears only: flops.py)."""
    if not work.lora:
        return 0
    per_block, _ = lora_block_params(work.arch, layout.tp, work.lora_rank, work.lora_targets)
    return stage_block_counts(work.arch.depth, layout.pp)[stage] * per_block


# ------------------------------------------------------------------ model state


def model_state(work: Workload, layout: Layout, params: int, overlap_comm: bool = False,
                trainable: int | None = None) -> dict[str, float]:
    """weights / grads / optimizer / ema / zero_buffers for `params` parameters on this rank, of
    which `trainable` (default all) have gradients and optimizer state: under LoRA `params` is the
    frozen base plus the adapters and `trainable` the adapters.

    Gradients are in the model dtype (DeepSpeed's grad_accum_dtype defaults to it, so a bf16 run
    takes the ordinary ZeRO optimizer at stages 1/2, not the BF16_Optimizer). With overlap_comm
    (train/engine.py: on CUDA) ZeRO 1/2 keep a second reduce bucket, filled while the first is
    reduced (stage_1_and_2.py setup_buckets)."""
    z, stage = layout.dp * layout.sp, layout.zero_stage
    w = 2 if work.bf16 else FP32
    trained = params if trainable is None else trainable
    weights = params * w / (z if stage == 3 else 1)
    grads = trained * w / (z if stage >= 2 else 1)
    if stage in (1, 2) and trained <= REDUCE_BUCKET_ELEMENTS and layout.grad_accum == 1:
        grads = 0.0  # all fit the reduce bucket, nothing accumulated yet: none stored apart at the peak
    master = trained * FP32 / (z if stage >= 1 else 1) if (stage >= 1 or work.bf16) else 0.0
    adam = 2 * trained * FP32 / (z if stage >= 1 else 1)
    ema = params * FP32 / z if work.ema else 0.0
    buffers = 0.0
    if stage in (1, 2):
        buffers = REDUCE_BUCKET_ELEMENTS * w * (2 if overlap_comm else 1)
    elif stage == 3:
        gathered = 2 * block_params(work, layout.tp) * w
        buffers = REDUCE_BUCKET_ELEMENTS * w + gathered
    return {"weights": weights, "grads": grads, "optimizer": master + adam, "ema": ema, "zero_buffers": buffers}


def reduce_transient_bytes(work: Workload, params: int) -> float:
    """The fp32 copy DeepSpeed makes of the gradients it reduces when the model is bf16 and
    train.grad_reduce_dtype is fp32 (stage_1_and_2.py / stage3.py / engine.py: `.to(
    communication_data_type)`): at most one bucket at a time, so min(params, bucket) elements."""
    if not work.bf16 or work.grad_reduce_bytes == 2:
        return 0.0
    return min(params, REDUCE_BUCKET_ELEMENTS) * work.grad_reduce_bytes


def startup_host_bytes(work: Workload, layout: Layout) -> float:
    """Host bytes of parameters a rank holds at start-up, before the engine (parallel/materialize.py):
    its fp32 part of the largest pipeline stage, plus the one full-size module being initialised
    (the largest: adaLN, fc1, fc2 or the caption projection, with its bias). Under ZeRO-3 the part
    held is the dp x sp partition of it. Building the whole model on every rank, as the start-up
    did before, held total_params(work) x 4."""
    held = max(stage_params(work, layout, stage) for stage in range(layout.pp))
    d, m, text = work.arch.hidden, work.mlp_hidden, work.arch.text_dim
    largest_module = max(6 * d * (d + 1), m * (d + 1), d * (m + 1), d * (text + 1))
    if layout.zero_stage == 3:  # train/engine.py zero3_partitioner: each parameter kept as its dp x sp
        # partition as soon as it is drawn, straight from the module being drawn; a tp part that is
        # not contiguous in it (split along columns) is copied first
        tp_copy = largest_module / layout.tp if layout.tp > 1 else 0.0
        return (held / (layout.dp * layout.sp) + largest_module + tp_copy) * FP32
    return (held + largest_module) * FP32


# ------------------------------------------------------------------ activations


def _regions(work: Workload, layout: Layout) -> tuple[float, float, float]:
    """(r, a, lt): residual-stream tokens, tensor-parallel-region tokens, text tokens per rank."""
    b = layout.micro_batch_size
    r = b * work.tokens / (layout.tp * layout.sp)
    a = b * work.tokens / layout.sp
    return r, a, b * work.text_tokens


def block_activation_bytes(work: Workload, layout: Layout) -> float:
    """Saved-for-backward bytes of one block, no checkpointing (counted tensor by tensor from the
    fused-kernel path of models/dit.py; docs/planning.md lists them).

    residual stream (r x D): block input, residual after cross-attention, residual after
      self-attention, attention projection output, MLP output                        5 r D
    gathered inputs (a x D): cross q input, self q/k/v input, fc1 input             3 a D
    head-sharded (a x D/t): cross q, normed q, out; self q, k (norm inputs), q, k, v for
      the attention kernel, out; +1 with sp: the out after the all-to-all/ring copy  9(+1) a D/t
    MLP (a x M/t): fc1 output, GELU output                                           2 a M/t
    text (b L x D/t): cross k, normed k, v                                            3 b L D/t
    fp32 statistics: 3 norms' mean/rstd (6 r), q/k RMS (6 a H/t), 2 log-sum-exps (2 a H/t),
      text k RMS (2 b L H/t)
    """
    d, m, h, t = work.arch.hidden, work.mlp_hidden, work.arch.heads, layout.tp
    r, a, lt = _regions(work, layout)
    head_sharded = 9 + (1 if layout.sp > 1 else 0)
    elements = 5 * r * d + 3 * a * d + head_sharded * a * d / t + 2 * a * m / t + 3 * lt * d / t
    elements += lora_activation_elements(work, layout)
    if work.wan:
        return _wan_block_activation_bytes(work, layout, elements)
    # adaLN (per sample): input, SiLU output (gathered over tp: t rows), 6-way modulation
    elements += (7 + t) * layout.micro_batch_size * d
    stats = 6 * r + 8 * a * h / t + 2 * lt * h / t
    return elements * work.act_bytes + stats * FP32


def lora_activation_elements(work: Workload, layout: Layout) -> float:
    """LoRA: what one block's adapters add to its saved tensors, A x (tokens x r) for B's gradient,
    per adapted linear (video linears see the a tokens of the tensor-parallel region, cross-attention
    k/v the caption's). Their input is the base linear's, saved already. The frozen base saves about
    as much as a trained one (the fused kernels keep their inputs whatever needs a gradient): the
    exact probe measures the full fine-tune's activations plus these (bench/bench_memory_model.py)."""
    if not work.lora:
        return 0.0
    _, a, lt = _regions(work, layout)
    linears = block_linears(work.arch)
    return sum((lt if linears[name][2] else a) * work.lora_rank for name in lora_block_targets(work.arch, work.lora_targets))


def _wan_block_activation_bytes(work: Workload, layout: Layout, elements: float) -> float:
    """block_activation_bytes of a Wan block (models/wan.py WanBlock.body), from `elements`, the DiT's
    count without adaLN: its residual arithmetic is fp32, so of the 5 r D residual-stream tensors
    the three norm inputs (both modulated norms and the cross-attention LayerNorm take x.float())
    and the FFN output are saved in fp32; the modulation is the (b, 6, D) fp32 table + projection
    sum (no adaLN linear); the all-heads qk-norms keep one fp32 statistic per token (3 a + b L),
    not per head. Under tp the norm is parallel/tensor.py's TensorParallelRMSNorm (not the fused
    kernel): it also keeps its fp32 normalised rows before the weight (and in bf16 the fp32 copy
    of its input), (3 a + b L) x D/t each. (Live-tensor probe, bench/bench_memory_model.py cases:
    docs/wan.md.)"""
    d, h, t = work.arch.hidden, work.arch.heads, layout.tp
    r, a, lt = _regions(work, layout)
    elements -= 4 * r * d
    fp32 = 4 * r * d + 6 * layout.micro_batch_size * d
    if t > 1:
        fp32 += (3 * a + lt) * d / t * (2 if work.bf16 else 1)
    stats = 6 * r + 3 * a + lt + 2 * a * h / t
    return elements * work.act_bytes + (fp32 + stats) * FP32


def retained_block_bytes(work: Workload, layout: Layout) -> float:
    """What a checkpointed block keeps until its backward (parallel/activation_checkpointing.py).

    full: its input (r x D). selective: also what the kept self-attention call saved — q, k, v
    and its output (4 a x D/t; +1 with sp: the output after the all-to-all back / the ring's
    returned copy) and the log-sum-exp (fp32) — so attention and its communication are not re-run.
    """
    d, h, t = work.arch.hidden, work.arch.heads, layout.tp
    r, a, _ = _regions(work, layout)
    mode = layout.activation_checkpointing
    if mode == "none":
        return block_activation_bytes(work, layout)
    kept = r * d * work.act_bytes
    if mode == "selective":
        kept += (4 + (1 if layout.sp > 1 else 0)) * a * d / t * work.act_bytes + a * h / t * FP32
    return kept


def io_activation_bytes(work: Workload, layout: Layout, first: bool, last: bool) -> float:
    """Outside the blocks, all of it per sequence span (parallel/sequence.py: a rank is handed
    only its r tokens). Stage 0: the span's noised patch tokens (r x C*p, the patch embedding's
    saved input), caption MLP (b L x (Dtext + 3D)). Every stage: the RoPE tables of the
    attention span (cos, sin: a x Dh/2 fp32 each). Last stage: final layer input and modulated
    norm (2 r D), and the span's loss: prediction, target, difference, its square (4 r x C*p).
    With pp: the message each stage but the last sent, and the cond/text that came with x."""
    b, d = layout.micro_batch_size, work.arch.hidden
    r, a, lt = _regions(work, layout)
    pvol = work.arch.in_channels * work.patch_volume
    elements = 0.0
    if first:
        elements += r * pvol + lt * (work.arch.text_dim + 3 * d)
    if last:
        elements += 2 * r * d + 4 * r * pvol
    if layout.pp > 1:  # 1F1B messages (pipeline.py): (b, r + 1 + L, D) kept until its backward
        if not last:
            elements += (r + b * (1 + work.text_tokens)) * d
        if not first:  # the received cond and text ride along with the saved x
            elements += b * (1 + work.text_tokens) * d
    return elements * work.act_bytes + rope_table_bytes(work, layout)


def rope_table_bytes(work: Workload, layout: Layout) -> float:
    """RoPE cos and sin (a/b x Dh/2 each, fp32) for the attention span's positions only (models/dit.py)."""
    _, a, _ = _regions(work, layout)
    return a / layout.micro_batch_size * (work.arch.hidden // work.arch.heads) * FP32


def pipeline_inputs_bytes(work: Workload, layout: Layout, stage: int) -> float:
    """Model inputs held outside autograd at a backward: pipeline_loop.py builds a micro-batch's
    inputs just in time and its forward consumes them (what backward needs is counted in
    io_activation_bytes), except on a stage that posts receives early (parallel/p2p.py): it builds
    the next forward's when posting its receive, before the backward runs. Those are the span's
    noised patch tokens, its target (r x C p each) and the caption features (b L x D_text)."""
    early = stage > 0 and parity_posts_early(stage) and layout.grad_accum >= layout.pp
    if layout.pp == 1 or not early:
        return 0.0
    b, pvol = layout.micro_batch_size, work.arch.in_channels * work.patch_volume
    r, _, _ = _regions(work, layout)
    return (2 * r * pvol + b * work.text_tokens * work.arch.text_dim) * work.act_bytes


def block_transient_bytes(work: Workload, layout: Layout) -> float:
    """Working set on top of what is saved, at the peak inside one block's backward: a gradient
    as wide as the MLP (a x M/t; the saved tensor it replaces is freed as its node finishes) and
    one of the residual stream gathered over tp (a x D), or the sequence-parallel buffers of the
    attention call if those are larger."""
    d, m, t = work.arch.hidden, work.mlp_hidden, layout.tp
    _, a, _ = _regions(work, layout)
    grads = (a * m / t + a * d) * work.act_bytes
    return max(grads, sp_buffer_bytes(work, layout))


def sp_buffer_bytes(work: Workload, layout: Layout) -> float:
    """Ulysses/ring buffers alive during one attention call (forward or backward)."""
    d, t = work.arch.hidden, layout.tp
    _, a, _ = _regions(work, layout)
    local = a * d / t
    out = 0.0
    if layout.ulysses > 1:
        out += 2 * 3 * local * work.act_bytes           # stacked q/k/v and its all-to-all output
    if layout.ring > 1:
        out += 2 * local * work.act_bytes + 5 * local * FP32   # incoming K/V; dq, dk, dv acc, incoming dk/dv
    return out


def inflight_microbatches(layout: Layout, stage: int) -> int:
    """1F1B: stage s keeps pp - s micro-batches' activations (at most all of them)."""
    return max(1, min(layout.pp - stage, layout.grad_accum)) if layout.pp > 1 else 1


def stage_activation_bytes(work: Workload, layout: Layout, stage: int) -> tuple[float, float]:
    """(saved activations of all in-flight micro-batches, transient peak) for one pipeline stage."""
    return _StageTerms(work, layout).activations(stage)


class _StageTerms:
    """The per-layout quantities every stage shares, computed once (the search evaluates thousands)."""

    def __init__(self, work: Workload, layout: Layout) -> None:
        self.work, self.layout = work, layout
        self.counts = stage_block_counts(work.arch.depth, layout.pp)
        self.full = block_activation_bytes(work, layout)
        self.retained = retained_block_bytes(work, layout)
        self.transient = block_transient_bytes(work, layout)
        self.chosen = checkpointed_blocks(work.arch.depth, layout.activation_checkpointing, layout.ac_every)

    def activations(self, stage: int) -> tuple[float, float]:
        """Saved bytes of the in-flight micro-batches, and the transient on top of them.

        Backward runs the blocks last to first, freeing each one's saved tensors; while block i
        is in its backward it holds its full activations (recomputed if checkpointed) and the
        blocks after it are gone: the peak exceeds the saved bytes by
        T + max(0, max_i (full - sum_{j >= i} kept_j)), T the block-backward working set."""
        layout, blocks = self.layout, self.counts[stage]
        first = sum(self.counts[:stage])
        checkpointed = set(self.chosen)
        kept = [self.retained if i in checkpointed else self.full for i in range(first, first + blocks)]
        per_micro = sum(kept) + io_activation_bytes(self.work, layout, stage == 0, stage == layout.pp - 1)
        extra, suffix = 0.0, 0.0
        for k in reversed(kept):
            suffix += k
            extra = max(extra, self.full - suffix)
        inflight = per_micro * inflight_microbatches(layout, stage) + pipeline_inputs_bytes(self.work, layout, stage)
        return inflight, self.transient + extra


def peak_candidate_stages(counts: tuple[int, ...]) -> list[int]:
    """Stages that can hold the peak: in-flight micro-batches fall with the stage index, so among
    stages of equal block count the first two (ac_every parity) dominate; plus the first and last."""
    pp = len(counts)
    firsts = {counts.index(c) for c in set(counts)}
    return sorted({0, pp - 1} | firsts | {min(s + 1, pp - 1) for s in firsts})


def memory_breakdown(work: Workload, layout: Layout, allowance: bool = True,
                     overlap_comm: bool | None = None) -> MemoryBreakdown:
    """Peak bytes per GPU; with pp > 1 the stage with the largest total. `overlap_comm` (DeepSpeed
    reduces during backward, as train/engine.py configures on CUDA) defaults to `allowance`, i.e.
    on for a GPU and off for a CPU run's exact count; with it the reduction's fp32 copy coincides
    with backward's working set, without it it comes after (MemoryBreakdown.reduce_peak_bytes)."""
    overlap = allowance if overlap_comm is None else overlap_comm
    terms = _StageTerms(work, layout)
    best = None
    for stage in peak_candidate_stages(terms.counts):
        params, adapters = stage_params(work, layout, stage), lora_stage_params(work, layout, stage)
        trainable = adapters if work.lora else params
        state = model_state(work, layout, params + adapters, overlap, trainable)
        act, transient = terms.activations(stage)
        reduce = reduce_transient_bytes(work, trainable)
        transient += reduce if overlap else 0.0
        live = sum(state.values()) + act + transient
        extra = ALLOWANCE_FRACTION * live + ALLOWANCE_FIXED_BYTES if allowance else 0.0
        candidate = MemoryBreakdown(activations=act, transient=transient, allowance=extra,
                                    reduce_transient=0.0 if overlap else reduce, **state)
        if best is None or candidate.total_bytes > best.total_bytes:
            best = candidate
    assert best is not None
    return best
