"""Where a training step's time and bytes go: MFU/HFU, per-axis communication, step-time breakdown.

Every training loop (TrainingLoop, PipelineTrainingLoop) owns one `StepAccounting` and
adds its `metrics()` to each metrics.jsonl record (and so to TensorBoard):

    mfu, hfu                 model / hardware FLOP/s per device over the device peak; hfu also
                             counts what activation checkpointing recomputes (train/flops.py)
    peak_flops               the peak used: train.peak_flops, else the hardware table, else a
                             measured matmul peak of this device (CPU)
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
equal to these. The counting itself is megasora/parallel/comm_counter.py. Figures are this
rank's (global rank 0 writes metrics.jsonl). `train.accounting=false` switches all of it off.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch

from megasora.parallel.comm_counter import COUNTER, Tally, install

install()  # before DeepSpeed creates its communication backend (see comm_counter.py)

_MEASURED_PEAK: dict[tuple[str, torch.dtype], float] = {}


def measured_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 512,
                         seconds: float = 0.3) -> float:
    """Best FLOP/s of a square matmul on `device` over ~`seconds` (cached per process)."""
    key = (str(device), dtype)
    if key not in _MEASURED_PEAK:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 2.0 * size ** 3 / (time.perf_counter() - start))
        _MEASURED_PEAK[key] = best
    return _MEASURED_PEAK[key]


def table_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak of this GPU from the planner's hardware table, if it knows the device."""
    if device.type != "cuda":
        return None
    try:
        from megasora.plan import hardware
    except ImportError:
        return None
    lookup = getattr(hardware, "peak_flops_for_device", None)
    return lookup(torch.cuda.get_device_name(device), dtype) if lookup else None


def peak_flops(configured: float, device: torch.device, dtype: torch.dtype) -> float:
    """train.peak_flops if set (> 0), else the hardware table, else a measured matmul peak."""
    if configured > 0:
        return configured
    return table_peak(device, dtype) or measured_matmul_peak(device, dtype)


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

    def __init__(self, enabled: bool, layout: Any, peak: float) -> None:
        self.enabled = enabled
        self.world_size = layout.world_size
        self.peak = peak
        self.phases: dict[str, float] = defaultdict(float)
        COUNTER.set_layout(layout)

    @classmethod
    def for_run(cls, cfg: Any, layout: Any, device: torch.device, dtype: torch.dtype) -> "StepAccounting":
        enabled = getattr(cfg.train, "accounting", True)
        peak = peak_flops(getattr(cfg.train, "peak_flops", 0.0), device, dtype) if enabled else 0.0
        return cls(enabled, layout, peak)

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
