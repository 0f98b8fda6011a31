"""The DiT training loop (TrainingLoop) and the types every loop shares.

trainer.py starts a run and picks the loop: this one, or pipeline_loop.PipelineTrainingLoop
(its subclass for parallel.pp > 1); train/vae.py subclasses it too. Keeping the loop here lets
trainer.py import both loops without either importing trainer.py back.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megasora.config import Config
from megasora.data.sources import build_stream
from megasora.models import dit_arch
from megasora.parallel.mesh import ParallelLayout
from megasora.train import checkpoint
from megasora.train.accounting import StepAccounting  # installs the comm counter before DeepSpeed starts
from megasora.train.ema import EMA
from megasora.train.flops import dit_recompute_flops, dit_train_flops
from megasora.train.metrics import MetricsLogger
from megasora.train.objective import FlowMatchingObjective
from megasora.train.preemption import PREEMPTED_EXIT_CODE, process_flag
from megasora.train.universal import gather_full_state, universal_checkpoint_info

log = logging.getLogger("megasora")


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)   # step -> global-batch loss
    final_step: int = 0
    samples: int = 0
    preempted: bool = False
    exit_code: int = 0


@dataclass
class DataParallel:
    rank: int
    size: int
    group: Any  # process group over which the logged loss is averaged
    mpu: Any = None
    tp_group: Any = None

    @property
    def layout(self) -> ParallelLayout:
        """The mesh's layout; a run without a mesh (train-vae) is data parallel only."""
        return self.mpu.mesh.layout if self.mpu is not None else ParallelLayout(dp=self.size)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class TrainingLoop:
    def __init__(self, cfg: Config, engine: Any, ema: EMA | None, parallel: DataParallel,
                 device: torch.device, is_main: bool, manager: checkpoint.CheckpointManager) -> None:
        self.cfg = cfg
        self.engine = engine
        self.ema = ema
        self.parallel = parallel
        self.device = device
        self.is_main = is_main
        self.manager = manager
        self.objective = FlowMatchingObjective(cfg)
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.arch = dit_arch(cfg)
        self.preemption = process_flag()
        self.accounting = StepAccounting.for_run(cfg, parallel.layout, device)

    def run(self, step: int, samples: int) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(final_step=step, samples=samples)
        start_step = step
        stream = build_stream(cfg, self.parallel.rank, self.parallel.size)
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
        flag = torch.tensor([1.0 if self.preemption.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            log.warning("preemption signal received: saving at step %d and exiting with %d",
                        step, PREEMPTED_EXIT_CODE)
        return flag.item() > 0

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, float]:
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro in micro_batches:
            with self.accounting.phase("fwd"):
                loss = self.objective(self.engine, micro, step, self.dtype, self.device)
            with self.accounting.phase("bwd"):
                self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().double().cpu()
        if self.ema is not None:
            self.ema.update(self.engine.module, step)
        loss_mean = loss_sum / len(micro_batches)
        dist.all_reduce(loss_mean, group=self.parallel.group)
        loss_mean /= self.parallel.size
        return self.step_stats(float(loss_mean), micro_batches, time.perf_counter() - start)

    def step_stats(self, loss: float, micro_batches: list[dict[str, Any]], elapsed: float) -> dict[str, float]:
        """The per-step metrics of metrics.jsonl: throughput and FLOP/s over the global batch."""
        global_samples = sum(m["latents"].shape[0] for m in micro_batches) * self.parallel.size
        global_tokens = sum(self.objective.tokens_per_sample(m) * m["latents"].shape[0]
                            for m in micro_batches) * self.parallel.size
        text_len = micro_batches[0]["text_emb"].shape[1]
        flops = dit_train_flops(self.arch, global_tokens // global_samples, text_len) * global_samples
        t = self.cfg.train  # what activation checkpointing re-runs counts for hfu, not mfu
        recompute = dit_recompute_flops(self.arch, global_tokens // global_samples, text_len,
                                        t.activation_checkpointing, t.ac_every) * global_samples
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": float(self.engine.get_lr()[0]),
            "samples_per_s": global_samples / elapsed,
            "tokens_per_s": global_tokens / elapsed,
            "flops_per_s": flops / elapsed,
            "recompute_flops_per_s": recompute / elapsed,
            "mem_bytes": peak_memory_bytes(self.device),
            "step_time_s": elapsed,
        }

    def record_sample_ids(self, step: int, micro_batches: list[dict[str, Any]]) -> None:
        ids = [i for m in micro_batches for i in m["ids"].tolist()]
        per_rank: list[Any] = [None] * self.parallel.size
        dist.all_gather_object(per_rank, ids, group=self.parallel.group)
        if self.is_main:
            with open(Path(self.cfg.run.dir) / "sample_ids.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "ids": [i for r in per_rank for i in r]}) + "\n")

    def sample_previews(self, step: int, samples: int) -> None:
        """train.sample_every: global rank 0 samples the EMA (megasora/train/previews.py)."""
        ema = self.client_state(step, samples)["ema"]  # the whole model's, as a checkpoint holds it (collective)
        if self.is_main:
            from megasora.train.previews import preview_writer, write_previews
            write_previews(self.cfg, ema, step, self.device, preview_writer(Path(self.cfg.run.dir)))

    def save(self, step: int, samples: int) -> None:
        self.manager.save(self.engine, step, samples, self.client_state(step, samples))

    def client_state(self, step: int, samples: int) -> dict[str, Any]:
        ema = None
        if self.ema is not None:  # stored full (unsharded over tp) so any layout can load it
            ema = gather_full_state(self.ema.state_dict(), self.engine.module, self.parallel.tp_group)
        return {"step": step, "samples": samples, "config": self.cfg.to_dict(), "ema": ema,
                "rng": checkpoint.rng_state(),
                "universal_checkpoint_info": universal_checkpoint_info(self.engine.module)}
