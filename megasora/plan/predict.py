"""One prediction: memory and step time of a config under a layout on some hardware."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megasora.config import Config
from megasora.hardware import Hardware
from megasora.plan.memory import MemoryBreakdown, memory_breakdown
from megasora.plan.time_model import StepTime, model_flops_per_step, step_time
from megasora.plan.workload import Layout, Workload, workload_from_config


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    memory: MemoryBreakdown
    time: StepTime
    fits: bool
    mfu: float                 # model FLOPs / (step time x peak x GPUs)
    samples_per_s: float       # whole cluster
    tokens_per_s: float

    def as_dict(self) -> dict[str, Any]:
        """The `megasora plan --json` record."""
        lay = self.layout
        return {"tp": lay.tp, "ulysses": lay.ulysses, "ring": lay.ring, "pp": lay.pp, "dp": lay.dp,
                "zero_stage": lay.zero_stage, "activation_checkpointing": lay.activation_checkpointing,
                "ac_every": lay.ac_every, "micro_batch_size": lay.micro_batch_size, "grad_accum": lay.grad_accum,
                "memory_bytes": self.memory.total_bytes, "memory_live_bytes": self.memory.live_bytes,
                "memory": self.memory.terms(), "step_time_s": self.time.total_s,
                "time": {"compute_s": self.time.compute_s, "recompute_s": self.time.recompute_s,
                         "comm_s": dict(self.time.comm_s), "bubble_s": self.time.bubble_s},
                "fits": self.fits, "mfu": self.mfu, "samples_per_s": self.samples_per_s,
                "tokens_per_s": self.tokens_per_s, "overrides": lay.as_overrides()}


def predict_workload(work: Workload, layout: Layout, hardware: Hardware, gpus_per_node: int,
                     memory: MemoryBreakdown | None = None) -> Prediction:
    memory = memory or memory_breakdown(work, layout, allowance=hardware.allowance)
    time = step_time(work, layout, hardware, gpus_per_node)
    samples = layout.micro_batch_size * layout.grad_accum * layout.dp
    mfu = model_flops_per_step(work, layout) / (time.total_s * hardware.peak_flops * layout.world_size)
    return Prediction(layout=layout, memory=memory, time=time, fits=memory.total_bytes <= hardware.memory_bytes,
                      mfu=mfu, samples_per_s=samples / time.total_s,
                      tokens_per_s=samples * work.tokens / time.total_s)


def predict(cfg: Config, layout: Layout, hardware: Hardware, gpus_per_node: int,
            tokens: int | None = None) -> Prediction:
    """Memory, step time, fit and MFU of `cfg` run as `layout`."""
    work, _ = workload_from_config(cfg, tokens)
    return predict_workload(work, layout, hardware, gpus_per_node)
