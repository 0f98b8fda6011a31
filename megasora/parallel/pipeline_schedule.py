"""1F1B pipeline schedule and the point-to-point links between neighbouring stages.

`one_f_one_b(stage, stages, m)` is the per-stage order of forward ("F", i) and backward
("B", i) passes (PipeDream-flush / Megatron's non-interleaved schedule):

    warm-up:   F0 .. F(w-1)            w = min(stages - stage - 1, m)
    steady:    F(w) B0 F(w+1) B1 ...   one forward, one backward
    cool-down: B(m-w) .. B(m-1)

so stage s never holds more than stages - s micro-batches of activations, and the idle
time per stage is (stages - 1) forward+backward slots out of (m + stages - 1): the bubble
(p-1)/(m+p-1).

`run_schedule` executes such an order. Receives block; sends are asynchronous (isend) and
waited for at the end of the step. With non-blocking sends any order consistent with the
data dependencies is deadlock-free, and 1F1B is. The callables do the compute, so the same
executor drives the DeepSpeed trainer (megasora/train/pipeline_loop.py) and the benchmark.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

Action = tuple[str, int]  # ("F" | "B", micro-batch index)


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[Action]:
    warmup = min(stages - stage - 1, micro_batches)
    order: list[Action] = [("F", i) for i in range(warmup)]
    for i in range(micro_batches - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(micro_batches - warmup, micro_batches)]
    return order


@dataclass
class StageLink:
    """The previous / next stage of this rank's pipeline (global ranks; None at the ends)."""
    group: Optional[ProcessGroup]
    prev_rank: Optional[int]
    next_rank: Optional[int]
    pending: list = field(default_factory=list)

    @classmethod
    def from_ranks(cls, group: Optional[ProcessGroup], pp_ranks: list[int], stage: int) -> "StageLink":
        prev_rank = pp_ranks[stage - 1] if stage > 0 else None
        next_rank = pp_ranks[stage + 1] if stage < len(pp_ranks) - 1 else None
        return cls(group, prev_rank, next_rank)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.detach().contiguous()
        self.pending.append((dist.isend(tensor, dst, group=self.group), tensor))  # keep the buffer alive

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buffer, src, group=self.group)
        return buffer

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


@dataclass
class StageFunctions:
    """What a stage computes; the executor only moves tensors and keeps per-micro-batch state.

    forward(i, received) -> output: `received` is None on the first stage; the output is the
        message for the next stage, or (last stage) anything backward() understands, e.g. the loss.
    backward(i, received, output, grad) -> gradient of `received` (None on the first stage);
        `grad` is the gradient of `output` from the next stage (None on the last stage).
    message_shape(i): shape of micro-batch i's message between stages (same both directions).
    after_backward(i): runs once micro-batch i's gradient has been sent (e.g. engine.step()).
    """
    forward: Callable[[int, Optional[torch.Tensor]], torch.Tensor]
    backward: Callable[[int, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]], Optional[torch.Tensor]]
    message_shape: Callable[[int], tuple[int, ...]]
    after_backward: Callable[[int], None] = lambda i: None


@dataclass
class StageTimes:
    """Seconds of one step on one stage: wall clock; inside forward and backward compute; blocked in
    receives (recv_wait) and in the final wait for this step's sends (send_wait); in after_backward."""
    wall: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    recv_wait: float = 0.0
    send_wait: float = 0.0
    after: float = 0.0

    @property
    def busy(self) -> float:
        return self.forward + self.backward


def run_schedule(order: list[Action], link: StageLink, fns: StageFunctions, dtype: torch.dtype,
                 device: torch.device) -> StageTimes:
    """Execute `order` (e.g. one_f_one_b(...)) for one optimizer step on this stage."""
    times = StageTimes()
    start = time.perf_counter()
    received: dict[int, Optional[torch.Tensor]] = {}
    outputs: dict[int, torch.Tensor] = {}
    for kind, i in order:
        t0 = time.perf_counter()
        if kind == "F":
            inp = None
            if link.prev_rank is not None:
                inp = link.recv(fns.message_shape(i), dtype, device, link.prev_rank).requires_grad_()
            t1 = time.perf_counter()
            out = fns.forward(i, inp)
            t2 = time.perf_counter()
            times.recv_wait, times.forward = times.recv_wait + t1 - t0, times.forward + t2 - t1
            received[i], outputs[i] = inp, out
            if link.next_rank is not None:
                link.send(out, link.next_rank)
        else:
            grad = None
            if link.next_rank is not None:
                grad = link.recv(tuple(outputs[i].shape), dtype, device, link.next_rank)
            t1 = time.perf_counter()
            grad_in = fns.backward(i, received.pop(i), outputs.pop(i), grad)
            t2 = time.perf_counter()
            times.recv_wait, times.backward = times.recv_wait + t1 - t0, times.backward + t2 - t1
            if link.prev_rank is not None:
                link.send(grad_in, link.prev_rank)
            fns.after_backward(i)
            times.after += time.perf_counter() - t2
    t0 = time.perf_counter()
    link.wait_sends()
    times.send_wait = time.perf_counter() - t0
    times.wall = time.perf_counter() - start
    return times
