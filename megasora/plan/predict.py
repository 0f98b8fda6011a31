"""One prediction: memory and step time of a config under a layout on some hardware."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megasora.plan.hardware import Hardware
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


def predict_workload(cfg: Any, work: Workload, layout: Layout, hardware: Hardware, gpus_per_node: int,
                     memory: MemoryBreakdown | None = None) -> Prediction:
    memory = memory or memory_breakdown(work, layout, allowance=hardware.allowance)
    time = step_time(cfg, work, layout, hardware, gpus_per_node)
    samples = layout.micro_batch_size * layout.grad_accum * layout.dp
    mfu = model_flops_per_step(work, layout) / (time.total_s * hardware.peak_flops * layout.world_size)
    return Prediction(layout=layout, memory=memory, time=time, fits=memory.total_bytes <= hardware.memory_bytes,
                      mfu=mfu, samples_per_s=samples / time.total_s,
                      tokens_per_s=samples * work.tokens / time.total_s)


def predict(cfg: Any, layout: Layout, hardware: Hardware, gpus_per_node: int, tokens: int | None = None) -> Prediction:
    """Memory, step time, fit and MFU of `cfg` (a config.Config) run as `layout`."""
    work, _ = workload_from_config(cfg, tokens)
    return predict_workload(cfg, work, layout, hardware, gpus_per_node)


def fit_warning(cfg: Any, nodes: int, gpus_per_node: int, hardware: Hardware) -> str | None:
    """For `megasora submit`: None when the config's own layout is predicted to fit, else one
    line naming its largest memory term and the planner's best layout that fits."""
    from megasora.plan.search import best_layout
    from megasora.plan.workload import layout_from_config
    work, micro = workload_from_config(cfg)
    prediction = predict_workload(cfg, work, layout_from_config(cfg, nodes * gpus_per_node, micro), hardware,
                                  gpus_per_node)
    if prediction.fits:
        return None
    gib = 1024 ** 3
    term, size = prediction.memory.largest_term()
    best = best_layout(cfg, nodes, gpus_per_node, hardware)
    advice = (f"the planner's best layout that fits: {best.layout.describe()} "
              f"({best.memory.total_bytes / gib:.1f} GiB; --set " + " --set ".join(best.layout.as_overrides()) + ")"
              if best else "no layout fits this many nodes (see `megasora plan`)")
    return (f"this job's layout is predicted NOT to fit: {prediction.memory.total_bytes / gib:.1f} GiB per GPU > "
            f"{hardware.memory_bytes / gib:.1f} GiB of {hardware.name} (largest term: {term} "
            f"{size / gib:.1f} GiB); {advice}")
