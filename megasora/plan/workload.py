"""What the planner models: the work of one step (`Workload`) and how it is laid out (`Layout`).

Both are plain frozen dataclasses built from a Config, so the memory and time models are
pure functions of (workload, layout, hardware) and run in microseconds.
"""
from __future__ import annotations

from dataclasses import dataclass

from megasora.config import CheckpointingMode, Config, DataConfig, model_parallel_size
from megasora.models import dit_arch
from megasora.models.dit import DiTArch
from megasora.models.flops import attended_text_tokens, ffn_width
from megasora.models.wan import WanArch
from megasora.parallel.mesh import ParallelLayout


@dataclass(frozen=True)
class Layout(ParallelLayout):
    """One candidate: the parallel degrees (mesh.py's ParallelLayout: dp, pp, tp, ulysses, ring,
    sp, world_size), plus the ZeRO stage, activation checkpointing and micro-batching."""
    zero_stage: int = 2
    activation_checkpointing: CheckpointingMode = "none"
    ac_every: int = 1
    micro_batch_size: int = 1
    grad_accum: int = 1      # micro-batches per step (pipeline micro-batches when pp > 1)

    def as_overrides(self) -> list[str]:
        """The `--set` overrides that make a config run this layout."""
        return [f"parallel.tp={self.tp}", f"parallel.ulysses={self.ulysses}", f"parallel.ring={self.ring}",
                f"parallel.pp={self.pp}", f"train.zero_stage={self.zero_stage}",
                f"train.activation_checkpointing={self.activation_checkpointing}",
                f"train.ac_every={self.ac_every}", f"train.micro_batch_size={self.micro_batch_size}",
                f"train.grad_accum={self.grad_accum}"]

    def describe(self) -> str:
        ac = self.activation_checkpointing + (f"/{self.ac_every}" if self.ac_every > 1 else "")
        return (f"tp{self.tp} ulysses{self.ulysses} ring{self.ring} pp{self.pp} dp{self.dp} "
                f"zero{self.zero_stage} ac={ac} mbs{self.micro_batch_size} ga{self.grad_accum}")


@dataclass(frozen=True)
class Workload:
    """One micro-batch of the model: architecture, tokens, dtype and the training extras."""
    arch: DiTArch
    tokens: int              # video tokens per sample (N)
    text_tokens: int         # caption tokens per sample (L)
    bf16: bool
    ema: bool
    samples_per_rank: int    # samples per dp rank per optimizer step (micro_batch x grad_accum)
    grad_reduce_bytes: int = 4  # element bytes DeepSpeed sums gradients in (train.grad_reduce_dtype)
    lora_rank: int = 0          # train.lora.rank: > 0 trains only the adapters on a frozen base
    lora_targets: tuple[str, ...] = ()  # train.lora.targets

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def act_bytes(self) -> int:
        """Bytes of an activation element (the model's compute dtype)."""
        return 2 if self.bf16 else 4

    @property
    def mlp_hidden(self) -> int:
        return ffn_width(self.arch)

    @property
    def wan(self) -> bool:
        """The Wan family (models/wan.py): no adaLN linear per block, fp32 residual arithmetic."""
        return isinstance(self.arch, WanArch)

    @property
    def patch_volume(self) -> int:
        p = self.arch.patch
        return p[0] * p[1] * p[2]


def config_tokens(data: DataConfig, patch: list[int], micro_batch_size: int) -> tuple[int, int]:
    """(video tokens per sample, samples per micro-batch) the config trains on.

    Synthetic data: the fixed latent grid. Shards with data.tokens_per_microbatch: the longest
    clip the micro-batch budget admits (one sample filling it), the memory worst case.
    """
    grid = (data.frames // patch[0]) * (data.height // patch[1]) * (data.width // patch[2])
    if data.kind == "shards" and data.tokens_per_microbatch > 0:
        return data.tokens_per_microbatch, 1
    return grid, micro_batch_size


def workload_from_config(cfg: Config, tokens: int | None = None) -> tuple[Workload, int]:
    """The config's workload and its micro-batch size; `tokens` overrides tokens per sample
    (the micro-batch then follows data.tokens_per_microbatch when that is set)."""
    n, micro = config_tokens(cfg.data, cfg.model.patch, cfg.train.micro_batch_size)
    if tokens is not None:
        n = tokens
        budget = cfg.data.tokens_per_microbatch if cfg.data.kind == "shards" else 0
        micro = max(1, budget // tokens) if budget else cfg.train.micro_batch_size
        if budget and cfg.data.max_micro_batch:
            micro = min(micro, cfg.data.max_micro_batch)
    arch = dit_arch(cfg)
    work = Workload(arch=arch, tokens=n, text_tokens=attended_text_tokens(arch, cfg.text.max_length),
                    bf16=cfg.train.precision == "bf16", ema=cfg.train.ema_decay > 0,
                    samples_per_rank=micro * cfg.train.grad_accum,
                    grad_reduce_bytes=4 if cfg.train.grad_reduce_dtype == "fp32" else 2,
                    lora_rank=cfg.train.lora.rank, lora_targets=tuple(cfg.train.lora.targets))
    return work, micro


def layout_from_config(cfg: Config, world_size: int, micro_batch_size: int | None = None) -> Layout:
    """The layout a config would run at `world_size` (dp derived as in parallel/mesh.py)."""
    p, t = cfg.parallel, cfg.train
    return Layout(tp=p.tp, ulysses=p.ulysses, ring=p.ring, pp=p.pp, dp=max(1, world_size // model_parallel_size(p)),
                  zero_stage=t.zero_stage, activation_checkpointing=t.activation_checkpointing, ac_every=t.ac_every,
                  micro_batch_size=micro_batch_size or t.micro_batch_size, grad_accum=t.grad_accum)
