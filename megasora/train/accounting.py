"""Where a training step's time and bytes go: MFU/HFU, per-axis communication, step-time breakdown.

Every training loop (TrainingLoop, PipelineTrainingLoop) owns one `StepAccounting` and
adds its `metrics()` to each metrics.jsonl record (and so to TensorBoard):

    mfu, hfu                 model / hardware FLOP/s per device over the device peak; hfu also
                             counts what activation checkpointing recomputes (train/recompute.py)
    peak_flops               the peak used: train.peak_flops, else the hardware table (hardware.py)
                             (bf16 dense peak of a known GPU; on CPU its measured matmul peak)
    comm_bytes/<axis>        bytes handed to collectives on that mesh axis during the step
    comm_s/<axis>            seconds this rank was blocked in them (exposed communication)
    comm_bytes/<axis>/<kind>, comm_s/<axis>/<kind>, comm_calls/<axis>/<kind>   per kind
    time/data_s              waiting for the data stream before the step
    time/fwd_s, time/bwd_s   forward and backward compute, communication inside them included
    time/opt_s               optimizer step, EMA and loss averaging (the rest of the step)
    time/pp_recv_s, time/pp_send_s   pipeline stages: blocked receiving activations/gradients,
                             and waiting for the step's sends at its end (the stage's idle time)
    time/comm_s              all exposed communication of the step (part of the above)

Bytes and axes follow megasora/plan/communication.py, whose analytic figures the tests hold
equal to these. The counting itself is megasora/parallel/comm_counter.py, installed by the
training start-up (megasora/train/startup.py). Figures are this
rank's (global rank 0 writes metrics.jsonl). `train.accounting=false` switches all of it off.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch

from megasora import hardware
from megasora.config import TrainConfig
from megasora.parallel.comm_counter import COUNTER, Tally
from megasora.parallel.mesh import ParallelLayout

_PEAK_CACHE: dict[str, float] = {}


def device_peak(device: torch.device) -> float:
    """Peak FLOP/s of this device from the hardware table (megasora/hardware.py): its dense bf16
    figure for a GPU it names, else the measured fp32 matmul peak of this machine (cached per process)."""
    key = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if key not in _PEAK_CACHE:
        known = [hw for name, hw in hardware.GPUS.items() if name.upper() in key.upper()]
        _PEAK_CACHE[key] = known[0].peak_flops if known else hardware.measure_cpu().peak_flops
    return _PEAK_CACHE[key]


def peak_flops(configured: float, device: torch.device) -> float:
    """train.peak_flops if set (> 0), else `device_peak`."""
    return configured if configured > 0 else device_peak(device)


def comm_metrics(tallies: dict[tuple[str, str], Tally]) -> dict[str, float]:
    """comm_bytes / comm_s / comm_calls per axis and per (axis, kind), plus time/comm_s."""
    out: dict[str, float] = {}
    per_axis: dict[str, Tally] = defaultdict(Tally)
    for (axis, kind), tally in sorted(tallies.items()):
        out[f"comm_bytes/{axis}/{kind}"] = tally.bytes
        out[f"comm_s/{axis}/{kind}"] = tally.seconds
        out[f"comm_calls/{axis}/{kind}"] = tally.calls
        per_axis[axis].bytes += tally.bytes
        per_axis[axis].seconds += tally.seconds
    for axis, tally in per_axis.items():
        out[f"comm_bytes/{axis}"] = tally.bytes
        out[f"comm_s/{axis}"] = tally.seconds
    out["time/comm_s"] = sum(t.seconds for t in per_axis.values())
    return out


class StepAccounting:
    """Phase clocks and the communication window of one training step at a time."""

    def __init__(self, enabled: bool, layout: ParallelLayout, peak: float) -> None:
        self.enabled = enabled
        self.world_size = layout.world_size
        self.peak = peak
        self.phases: dict[str, float] = defaultdict(float)
        COUNTER.set_layout(layout)

    @classmethod
    def for_run(cls, train: TrainConfig, layout: ParallelLayout, device: torch.device) -> "StepAccounting":
        peak = peak_flops(train.peak_flops, device) if train.accounting else 0.0
        return cls(train.accounting, layout, peak)

    def batches(self, stream: Iterable[Any]) -> Iterator[Any]:
        """The stream's items, timing the wait for each as the next step's time/data_s."""
        items = iter(stream)
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            self.phases["data"] = time.perf_counter() - start
            yield item

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's wall time to phase `name` (fwd, bwd, opt) of the current step."""
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] += seconds

    @contextmanager
    def step(self) -> Iterator[None]:
        """Count the communication issued inside the block as this step's."""
        data = self.phases.get("data", 0.0)
        self.phases = defaultdict(float, data=data)
        COUNTER.take()
        with COUNTER.counting(self.enabled):
            yield

    def metrics(self, stats: dict[str, float]) -> dict[str, float]:
        """This step's accounting, from the loop's stats (flops_per_s, step_time_s are global)."""
        if not self.enabled:
            return {}
        out = comm_metrics(COUNTER.take())
        per_device = stats["flops_per_s"] / self.world_size
        out.update({"mfu": per_device / self.peak,
                    "hfu": (per_device + stats.get("recompute_flops_per_s", 0.0) / self.world_size) / self.peak,
                    "peak_flops": self.peak})
        phases = {"data": 0.0, "fwd": 0.0, "bwd": 0.0, **self.phases}
        inside = sum(v for k, v in phases.items() if k != "data")  # timed parts of the step itself
        phases["opt"] = max(0.0, stats["step_time_s"] - inside)
        out.update({f"time/{name}_s": seconds for name, seconds in phases.items()})
        return out
