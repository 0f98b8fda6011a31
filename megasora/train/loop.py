"""The training loop every model shares (TrainingLoop) and its one training step.

`TrainingLoop.run` drives the data stream, metrics, preemption and checkpoints;
`train_step` is one optimizer step, the same for every model and layout:

    forward_backward(micro_batches, step)   the override point: this rank's forward and
                                            backward passes, returning what it measured (on
                                            the device, e.g. the loss of each micro-batch)
    EMA update
    means over micro-batches and dp         one all-reduce on the device, one host read
    step statistics                         throughput and FLOP/s from the injected FLOP model

The base forward_backward runs the micro-batches one after another through the injected
objective (the DiT's flow matching, the VAE's reconstruction + KL); PipelineTrainingLoop
(pipeline_loop.py, parallel.pp > 1) overrides it with the 1F1B schedule. The start-up that
builds a TrainingRun is megasora/train/startup.py.
"""
from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from megasora.config import Config
from megasora.data.sources import build_stream
from megasora.errors import PREEMPTED_EXIT_CODE
from megasora.train import checkpoint
from megasora.train.accounting import StepAccounting
from megasora.train.metrics import MetricsLogger
from megasora.train.preemption import process_flag
from megasora.train.previews import preview_writer, write_previews
from megasora.train.shard_files import ShardIndex
from megasora.train.startup import TrainingRun
from megasora.train.throughput import FlopModel
from megasora.train.universal import universal_checkpoint_info

log = logging.getLogger("megasora")


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)   # step -> global-batch loss
    final_step: int = 0
    samples: int = 0
    preempted: bool = False
    exit_code: int = 0


class Objective(Protocol):
    """One micro-batch's loss: the tensor backward runs on, or {"loss": it, other terms to log}."""

    def __call__(self, model: nn.Module, batch: dict[str, Any], step: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor | dict[str, torch.Tensor]: ...


@dataclass
class Measured:
    """What forward_backward measured on this rank."""
    # name -> per-micro-batch values (M,) or their mean (), on the training device; the step logs
    # their mean over micro-batches and then over dp
    values: dict[str, torch.Tensor]
    local: dict[str, float] = field(default_factory=dict)  # this rank's own figures, logged as they are


def compute_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class TrainingLoop:
    def __init__(self, run: TrainingRun, objective: Objective, flop_model: FlopModel) -> None:
        self.cfg = run.cfg
        self.engine = run.engine
        self.ema = run.ema
        self.parallel = run.parallel
        self.device = run.device
        self.is_main = run.is_main
        self.manager = run.manager
        self.objective = objective
        self.flop_model = flop_model
        self.dtype = compute_dtype(run.cfg)
        self.preemption = process_flag()
        self.accounting = StepAccounting.for_run(run.cfg.train, run.parallel.layout, run.device)

    def run(self, step: int, samples: int) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(final_step=step, samples=samples)
        start_step = step
        # The DiT's objective names its sequence rank's span: the stream loads only those latent frames.
        cut = self.objective.span_cut() if hasattr(self.objective, "span_cut") else None
        stream = build_stream(cfg, self.parallel.rank, self.parallel.size, cut)
        metrics = MetricsLogger(Path(cfg.run.dir), cfg.train.steps, step, self.is_main)
        self.preemption.install()
        try:
            for batch in self.accounting.batches(stream.steps(samples)):
                if step >= cfg.train.steps:
                    break
                with self.accounting.step():
                    stats = self.train_step(batch.micro_batches, step)
                stats.update(self.accounting.metrics(stats))
                step, samples = step + 1, batch.samples_after
                result.losses[step], result.final_step, result.samples = stats["loss"], step, samples
                if hasattr(stream, "stats"):  # shard streams count corrupt / substituted samples
                    stats.update(stream.stats())
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    metrics.log(step, {**stats, "samples": samples})
                if cfg.run.record_sample_ids:
                    self.record_sample_ids(step, batch.micro_batches)
                if self._should_stop(step):
                    result.preempted = True
                    break
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                    self.save(step, samples)
                if cfg.train.sample_every and step % cfg.train.sample_every == 0:
                    self.sample_previews(step, samples)
            if result.final_step > start_step:  # resuming a finished run trains and saves nothing
                self.save(result.final_step, result.samples)
        finally:
            metrics.close()
        if result.preempted:
            result.exit_code = PREEMPTED_EXIT_CODE
        return result

    def _should_stop(self, step: int) -> bool:
        """All ranks must agree, or some would wait forever in the next collective."""
        flag = torch.full((1,), float(self.preemption.requested), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = flag.item() > 0
        if stop:
            log.warning("preemption signal received: saving at step %d and exiting with %d",
                        step, PREEMPTED_EXIT_CODE)
        return stop

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, float]:
        start = time.perf_counter()
        measured = self.forward_backward(micro_batches, step)
        if self.ema is not None:
            self.ema.update(self.engine.module, step)
        means = self.global_means(measured.values)
        elapsed = time.perf_counter() - start
        return {**means, **self.step_stats(micro_batches, elapsed), **measured.local}

    def forward_backward(self, micro_batches: list[dict[str, Any]], step: int) -> Measured:
        """Forward and backward of each micro-batch in turn, engine.step() after each (DeepSpeed
        counts micro-steps and steps the optimizer at the last); the losses stay on the device."""
        per_micro: list[dict[str, torch.Tensor]] = []
        for micro in micro_batches:
            with self.accounting.phase("fwd"):
                terms = self.objective(self.engine, micro, step, self.dtype, self.device)
                terms = terms if isinstance(terms, dict) else {"loss": terms}
            with self.accounting.phase("bwd"):
                self.engine.backward(terms["loss"])
            self.engine.step()
            per_micro.append({name: value.detach() for name, value in terms.items()})
        return Measured({name: torch.stack([m[name] for m in per_micro]) for name in per_micro[0]})

    def global_means(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each value's mean over this rank's micro-batches, then over dp: one all-reduce of
        float64s on the device and one host read per step."""
        means = torch.stack([v.double().mean() for v in values.values()])  # (K,)
        dist.all_reduce(means, group=self.parallel.group)
        means /= self.parallel.size
        return dict(zip(values, means.tolist()))

    def step_stats(self, micro_batches: list[dict[str, Any]], elapsed: float) -> dict[str, float]:
        """The per-step metrics of metrics.jsonl: throughput and FLOP/s over the global batch."""
        work = self.flop_model(micro_batches)
        samples = work.samples * self.parallel.size
        grad_norm = self.engine.get_global_grad_norm()
        stats = {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                 "lr": float(self.engine.get_lr()[0]),
                 "samples_per_s": samples / elapsed}
        if work.tokens is not None:
            stats["tokens_per_s"] = work.tokens * self.parallel.size / elapsed
        stats["flops_per_s"] = work.flops_per_sample * samples / elapsed
        if work.recompute_flops_per_sample is not None:  # what checkpointing re-runs counts for hfu, not mfu
            stats["recompute_flops_per_s"] = work.recompute_flops_per_sample * samples / elapsed
        return {**stats, "mem_bytes": peak_memory_bytes(self.device), "step_time_s": elapsed}

    def record_sample_ids(self, step: int, micro_batches: list[dict[str, Any]]) -> None:
        ids = [i for m in micro_batches for i in m["ids"].tolist()]
        per_rank: list[Any] = [None] * self.parallel.size
        dist.all_gather_object(per_rank, ids, group=self.parallel.group)
        if self.is_main:
            with open(Path(self.cfg.run.dir) / "sample_ids.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "ids": [i for r in per_rank for i in r]}) + "\n")

    def sample_previews(self, step: int, samples: int) -> None:
        """train.sample_every: global rank 0 samples the whole EMA (megasora/train/previews.py),
        assembled from the slices every rank writes as a checkpoint does (nothing is gathered)."""
        assert self.ema is not None  # config validation: sample_every needs train.ema_decay > 0
        shards = Path(self.cfg.run.dir) / "samples" / ".ema"
        if self.is_main:
            shutil.rmtree(shards, ignore_errors=True)  # debris of an interrupted preview
        dist.barrier()
        self.ema.save(shards)
        dist.barrier()  # every slice is on disk
        if self.is_main:
            with ShardIndex(shards) as index:
                weights = dict(index.whole())
            shutil.rmtree(shards)
            write_previews(self.cfg, weights, step, self.device, preview_writer(Path(self.cfg.run.dir)))

    def save(self, step: int, samples: int) -> None:
        self.manager.save(self.engine, step, samples, self.client_state(step, samples), self.ema)

    def client_state(self, step: int, samples: int) -> dict[str, Any]:
        """Small values only: the EMA is saved as per-rank shard files beside it (CheckpointManager)."""
        return {"step": step, "samples": samples, "config": self.cfg.to_dict(), "rng": checkpoint.rng_state(),
                "universal_checkpoint_info": self.universal_info()}

    def universal_info(self) -> dict[str, Any]:
        """How each parameter is split over tp, for DeepSpeed's universal conversion (universal.py)."""
        return universal_checkpoint_info(self.engine.module)
