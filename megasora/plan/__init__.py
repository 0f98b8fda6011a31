"""Models of the system (plain functions, no process groups): communication, memory, step time,
and the layout search built on them (`megasora plan`, `submit`'s fit check, `megasora scale`).

Public API (all milliseconds, no torch.distributed calls):

    from megasora.plan import Layout, load_hardware, predict, search

    hw = load_hardware("h100")                  # or "h200" | "a100" | "b200" | "cpu" | a YAML file
    layout = Layout(tp=2, ulysses=4, ring=4, pp=1, dp=1, zero_stage=2,
                    activation_checkpointing="selective", micro_batch_size=1, grad_accum=1)
    p = predict(cfg, layout, hw, gpus_per_node=8)   # cfg: a config.Config
    p.memory.total_bytes, p.memory.terms()      # MemoryBreakdown: weights ... allowance
    p.time.total_s, p.time.comm_s               # StepTime: compute, recompute, comm per axis, bubble
    p.fits, p.mfu, p.samples_per_s

    layout_from_config(cfg, world_size)         # the layout a config runs as
    search(cfg, nodes, gpus_per_node, hw).ranked  # every accepted layout that fits, fastest first

For a scaling study: `predict(cfg, layout_from_config(cfg, world), hw, gpus_per_node).time.total_s`
is the predicted step time of a config at a world size (hw = load_hardware("cpu") measures this
machine's matmul rate and memcpy bandwidth to predict CPU runs; `megasora.hardware.Hardware(...)`
takes any figures).

Modules: hardware.py (a GPU of megasora/hardware.py's table, this CPU measured, or a cluster file),
workload.py (Workload, Layout from a config), memory.py (per-GPU bytes), communication.py
(per-axis bytes), time_model.py (step seconds), predict.py (Prediction), search.py (enumeration,
ranking, submit's fit warning).
"""
from megasora.plan.hardware import HardwareError, PlanError, load_hardware
from megasora.plan.memory import MemoryBreakdown, memory_breakdown
from megasora.plan.predict import Prediction, predict
from megasora.plan.search import SearchResult, search
from megasora.plan.time_model import StepTime, step_time
from megasora.plan.workload import Layout, Workload, layout_from_config, workload_from_config

__all__ = ["HardwareError", "Layout", "MemoryBreakdown", "PlanError", "Prediction",
           "SearchResult", "StepTime", "Workload", "layout_from_config", "load_hardware", "memory_breakdown",
           "predict", "search", "step_time", "workload_from_config"]
