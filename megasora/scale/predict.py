"""The planner's word on a point (megasora/plan): its predicted step time (and parts), with --plan its layout.

Hardware: GPU studies name it (`--gpu h100|h200|a100|b200|FILE`, the planner's table). CPU
studies (local runs, CPU Slurm jobs) are predicted from measured numbers: the matmul peak
the run itself logged (`peak_flops` in metrics.jsonl, the figure its MFU divides by) and
the planner's measured memory-copy bandwidth of this machine for both links (gloo over
shared memory). A study whose prediction cannot be made still reports, with it left empty.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
from pathlib import Path
from typing import Any

from megasora.config import load_config
from megasora.plan.hardware import load_hardware
from megasora.plan.predict import predict
from megasora.plan.search import best_layout
from megasora.plan.workload import layout_from_config, workload_from_config
from megasora.scale.study import Point, Study, StudyError, point_config, point_shape, split_overrides

# The layout keys --plan takes from the planner. Not micro_batch_size / grad_accum: the
# study's weak/strong arithmetic owns the batch.
PLANNED_KEYS = ("parallel.tp", "parallel.ulysses", "parallel.ring", "parallel.pp", "train.zero_stage",
                "train.activation_checkpointing", "train.ac_every")


@functools.lru_cache(maxsize=None)
def _hardware(name: str) -> Any:
    return load_hardware(name)  # "cpu" measures this machine once per process


def point_hardware(study: Study, records: list[dict[str, Any]]) -> Any:
    """The planner Hardware a point ran on (see the module docstring)."""
    if study.gpu and study.gpu != "cpu":
        return _hardware(study.gpu)
    hw = _hardware("cpu")
    peaks = [r["peak_flops"] for r in records if r.get("peak_flops")]
    return dataclasses.replace(hw, peak_flops=statistics.median(peaks)) if peaks else hw


def predicted_columns(study: Study, point: Point, records: list[dict[str, Any]]) -> dict[str, float]:
    """The planner's step time for this point and its parts, as report columns.

    predicted_step_time_s = predicted/compute_s + predicted/recompute_s + the sum of
    predicted/comm_s/<axis> + predicted/bubble_s, next to the measured time/* and comm_s/<axis>.
    """
    cfg = point_config(study, point)
    _, micro = workload_from_config(cfg)
    layout = layout_from_config(cfg, point.world_size, micro)
    time = predict(cfg, layout, point_hardware(study, records), point.procs_per_node).time
    return {"predicted_step_time_s": time.total_s, "predicted/compute_s": time.compute_s,
            "predicted/recompute_s": time.recompute_s, "predicted/bubble_s": time.bubble_s,
            **{f"predicted/comm_s/{axis}": s for axis, s in time.comm_s.items()}}


def planned_layouts(config: str, sizes: list[int], procs_per_node: int, launcher: str, overrides: list[str],
                    gpu: str | None) -> dict[int, list[str]]:
    """Per size, the overrides of the planner's fastest layout that fits (PLANNED_KEYS only)."""
    common, _ = split_overrides(overrides, sorted(sizes))
    cfg = load_config(config, common)
    hardware = _hardware(gpu or "cpu")
    layouts = {}
    for size in sizes:
        nodes, procs = point_shape(launcher, size, procs_per_node)
        best = best_layout(cfg, nodes, procs, hardware)
        if best is None:
            raise StudyError(f"--plan: no layout of {Path(config).name} fits {nodes} node(s) x {procs} "
                             f"{hardware.name}", "see `megasora plan` for the smallest node count that fits")
        layouts[size] = [o for o in best.layout.as_overrides() if o.split("=")[0] in PLANNED_KEYS]
    return layouts
