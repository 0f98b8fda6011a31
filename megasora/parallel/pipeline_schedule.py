"""1F1B pipeline schedule and the point-to-point links between neighbouring stages.

`one_f_one_b(stage, stages, m)` is the per-stage order of forward ("F", i) and backward
("B", i) passes (PipeDream-flush / Megatron's non-interleaved schedule):

    warm-up:   F0 .. F(w-1)            w = min(stages - stage - 1, m)
    steady:    F(w) B0 F(w+1) B1 ...   one forward, one backward
    cool-down: B(m-w) .. B(m-1)

so stage s never holds more than stages - s micro-batches of activations, and the idle
time per stage is (stages - 1) forward+backward slots out of (m + stages - 1): the bubble
(p-1)/(m+p-1).

`run_schedule` executes such an order. Sends are asynchronous (isend) and waited for at the
end of the step; the receive of the next action's input is posted before the current action
computes (prefetch) and waited for when it is needed. With non-blocking sends any order
consistent with the data dependencies is deadlock-free, and 1F1B is; a link carries one kind
of message per direction (activations forward, gradients back), in order, so the early
receives match their messages. The callables do the compute, so the same
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

    def post_recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int
                  ) -> tuple[torch.Tensor, "dist.Work"]:
        """Start receiving into a new buffer; wait() on the handle before reading it."""
        buffer = torch.empty(shape, dtype=dtype, device=device)
        return buffer, dist.irecv(buffer, src, group=self.group)

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


def _input_source(action: Action, link: StageLink, fns: StageFunctions, outputs: dict[int, torch.Tensor]
                  ) -> Optional[tuple[int, tuple[int, ...]]]:
    """(source rank, shape) of what `action` receives, None if it receives nothing (or the
    shape is not known yet: a backward's gradient has its forward output's shape)."""
    kind, i = action
    if kind == "F":
        return None if link.prev_rank is None else (link.prev_rank, tuple(fns.message_shape(i)))
    if link.next_rank is None or i not in outputs:
        return None
    return link.next_rank, tuple(outputs[i].shape)


def run_schedule(order: list[Action], link: StageLink, fns: StageFunctions, dtype: torch.dtype,
                 device: torch.device, prefetch: bool = True) -> StageTimes:
    """Execute `order` (e.g. one_f_one_b(...)) for one optimizer step on this stage.

    With `prefetch`, the receive of the next action's input is posted (irecv) before this
    action computes, so the message lands while we compute instead of after we ask for it:
    gloo (and NCCL) move a message only once the receive is posted, and 1F1B's steady state
    has no slack to hide that hand-shake (docs/benchmarks.md, pipeline bubble).
    """
    times = StageTimes()
    start = time.perf_counter()
    received: dict[int, Optional[torch.Tensor]] = {}
    outputs: dict[int, torch.Tensor] = {}
    posted: dict[Action, tuple[torch.Tensor, "dist.Work"]] = {}
    for step, action in enumerate(order):
        t0 = time.perf_counter()
        inp = _receive(action, link, fns, outputs, posted, dtype, device)
        if prefetch and step + 1 < len(order):
            _post(order[step + 1], link, fns, outputs, posted, dtype, device)
        t1 = time.perf_counter()
        times.recv_wait += t1 - t0
        kind, i = action
        if kind == "F":
            if inp is not None:
                inp.requires_grad_()
            out = fns.forward(i, inp)
            times.forward += time.perf_counter() - t1
            received[i], outputs[i] = inp, out
            if link.next_rank is not None:
                link.send(out, link.next_rank)
        else:
            grad_in = fns.backward(i, received.pop(i), outputs.pop(i), inp)
            t2 = time.perf_counter()
            times.backward += t2 - t1
            if link.prev_rank is not None:
                link.send(grad_in, link.prev_rank)
            fns.after_backward(i)
            times.after += time.perf_counter() - t2
    t0 = time.perf_counter()
    link.wait_sends()
    times.send_wait = time.perf_counter() - t0
    times.wall = time.perf_counter() - start
    return times


def _post(action: Action, link: StageLink, fns: StageFunctions, outputs: dict[int, torch.Tensor],
          posted: dict, dtype: torch.dtype, device: torch.device) -> None:
    source = _input_source(action, link, fns, outputs)
    if source is not None and action not in posted:
        posted[action] = link.post_recv(source[1], dtype, device, source[0])


def _receive(action: Action, link: StageLink, fns: StageFunctions, outputs: dict[int, torch.Tensor],
             posted: dict, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """This action's input: the prefetched message (waited for), else a blocking receive."""
    if action in posted:
        buffer, work = posted.pop(action)
        work.wait()
        return buffer
    source = _input_source(action, link, fns, outputs)
    return None if source is None else link.recv(source[1], dtype, device, source[0])
