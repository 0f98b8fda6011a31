"""1F1B pipeline schedule and the point-to-point links between neighbouring stages.

`one_f_one_b(stage, stages, m)` is the per-stage order of forward ("F", i) and backward
("B", i) passes (PipeDream-flush / Megatron's non-interleaved schedule):

    warm-up:   F0 .. F(w-1)            w = min(stages - stage - 1, m)
    steady:    F(w) B0 F(w+1) B1 ...   one forward, one backward
    cool-down: B(m-w) .. B(m-1)

so stage s never holds more than stages - s micro-batches of activations, and the idle
time per stage is (stages - 1) forward+backward slots out of (m + stages - 1): the bubble
(p-1)/(m+p-1).

`run_schedule` executes such an order. Its messages follow NCCL's point-to-point rules
(megasora/parallel/p2p.py): a link carries one kind of message per direction (activations
forward, gradients back), each in micro-batch order on both ends, and on every link exactly
one end receives before it sends. Even stages post the receive of the next action's input
before computing the current action (prefetch: the message lands while they compute) and
send each output on its own; odd stages send each output together with the receive of the
next action's input, in one batch, right after computing. Sends are waited for at the end of
the step. The callables do the compute, so the same executor drives the DeepSpeed trainer
(megasora/train/pipeline_loop.py) and the benchmark.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.distributed import ProcessGroup

from megasora.parallel.p2p import Exchange, Message, exchange, parity_posts_early

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
    pending: list[Exchange] = field(default_factory=list)  # this step's sends, waited for at its end
    stage: int = 0
    stages: int = 1

    @classmethod
    def from_ranks(cls, group: Optional[ProcessGroup], pp_ranks: list[int], stage: int) -> "StageLink":
        prev_rank = pp_ranks[stage - 1] if stage > 0 else None
        next_rank = pp_ranks[stage + 1] if stage < len(pp_ranks) - 1 else None
        return cls(group, prev_rank, next_rank, stage=stage, stages=len(pp_ranks))

    def post(self, sends: list[Message], source: Optional[tuple[int, tuple[int, ...]]], dtype: torch.dtype,
             device: torch.device) -> tuple[Optional[torch.Tensor], Exchange]:
        """Start `sends` and, if `source` = (rank, shape), the receive of a new buffer, as one exchange;
        wait() on it before reading the buffer."""
        buffer, recvs = None, []
        if source is not None:
            buffer = torch.empty(source[1], dtype=dtype, device=device)
            recvs.append((buffer, source[0]))
        handle = exchange(sends, recvs, self.group)
        if sends:
            self.pending.append(handle)
        return buffer, handle

    def wait_sends(self) -> None:
        for handle in self.pending:
            handle.wait()
        self.pending.clear()


@dataclass
class StageFunctions:
    """What a stage computes; the executor only moves tensors and keeps per-micro-batch state.

    forward(i, received) -> output: `received` is None on the first stage; the output is the
        message for the next stage, or (last stage) anything backward() understands, e.g. the loss.
    backward(i, received, output, grad) -> gradient of `received` (None on the first stage);
        `grad` is the gradient of `output` from the next stage (None on the last stage).
    message_shape(i): shape of micro-batch i's message between stages (same both directions).
    after_backward(i): runs once micro-batch i's gradient is on its way (e.g. engine.step()).
    """
    forward: Callable[[int, Optional[torch.Tensor]], torch.Tensor]
    backward: Callable[[int, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]], Optional[torch.Tensor]]
    message_shape: Callable[[int], tuple[int, ...]]
    after_backward: Callable[[int], None] = lambda i: None


@dataclass
class StageTimes:
    """Seconds of one step on one stage: wall clock; inside forward and backward compute; blocked in
    receives (recv_wait: on odd stages a receive's batch includes the send posted with it) and in the
    final wait for this step's sends (send_wait); in after_backward (and posting a gradient's batch)."""
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
                 device: torch.device, prefetch: bool = True) -> StageTimes:
    """Execute `order` (e.g. one_f_one_b(...)) for one optimizer step on this stage.

    With `prefetch`, even stages post the receive of the next action's input before this
    action computes, so the message lands while they compute instead of after they ask for
    it: gloo and NCCL move a message only once its receive is posted, and 1F1B's steady state
    has no slack to hide that hand-shake (docs/benchmarks.md, pipeline bubble). Odd stages,
    and every stage without `prefetch`, batch that receive with the send of this action's
    output (p2p.parity_posts_early says why not both ends of a link can post early).
    With fewer micro-batches than stages every stage batches: neighbours' warm-ups are then
    equally long, and an early gradient receive would wait on a send queued behind the
    activation it is itself about to send.
    """
    micro_batches = sum(kind == "F" for kind, _ in order)
    early = prefetch and parity_posts_early(link.stage) and micro_batches >= link.stages
    times = StageTimes()
    start = time.perf_counter()
    inbox = _Inbox(link, fns, dtype, device)
    for step, action in enumerate(order):
        following = order[step + 1] if step + 1 < len(order) else None
        t0 = time.perf_counter()
        inp = inbox.take(action)
        if early and following is not None:
            inbox.post(following, [])
        t1 = time.perf_counter()
        times.recv_wait += t1 - t0
        kind, i = action
        if kind == "F":
            if inp is not None:
                inp.requires_grad_()
            out = fns.forward(i, inp)
            times.forward += time.perf_counter() - t1
            inbox.received[i], inbox.outputs[i] = inp, out
            message = None if link.next_rank is None else (out, link.next_rank)
        else:
            grad_in = fns.backward(i, inbox.received.pop(i), inbox.outputs.pop(i), inp)
            times.backward += time.perf_counter() - t1
            if link.prev_rank is not None and grad_in is None:  # the previous stage would wait for it forever
                raise RuntimeError(f"stage {link.stage}: backward of micro-batch {i} returned no input gradient")
            message = None if grad_in is None or link.prev_rank is None else (grad_in, link.prev_rank)
        t2 = time.perf_counter()
        inbox.post(None if early else following, [] if message is None else [message])
        if kind == "B":
            fns.after_backward(i)
            times.after += time.perf_counter() - t2
    t0 = time.perf_counter()
    link.wait_sends()
    times.send_wait = time.perf_counter() - t0
    times.wall = time.perf_counter() - start
    return times


class _Inbox:
    """Per-micro-batch state of one step: what each forward received and produced, and the
    receives already posted (action -> buffer and its exchange)."""

    def __init__(self, link: StageLink, fns: StageFunctions, dtype: torch.dtype, device: torch.device) -> None:
        self.link, self.fns, self.dtype, self.device = link, fns, dtype, device
        self.received: dict[int, Optional[torch.Tensor]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.posted: dict[Action, tuple[torch.Tensor, Exchange]] = {}

    def source(self, action: Action) -> Optional[tuple[int, tuple[int, ...]]]:
        """(source rank, shape) of what `action` receives, None if it receives nothing (or the
        shape is not known yet: a backward's gradient has its forward output's shape)."""
        kind, i = action
        if kind == "F":
            return None if self.link.prev_rank is None else (self.link.prev_rank, tuple(self.fns.message_shape(i)))
        if self.link.next_rank is None or i not in self.outputs:
            return None
        return self.link.next_rank, tuple(self.outputs[i].shape)

    def post(self, action: Optional[Action], sends: list[Message]) -> None:
        """One exchange: `sends`, and the receive of `action`'s input unless it is posted already."""
        source = None if action is None or action in self.posted else self.source(action)
        buffer, handle = self.link.post(sends, source, self.dtype, self.device)
        if buffer is not None and action is not None:
            self.posted[action] = (buffer, handle)

    def take(self, action: Action) -> Optional[torch.Tensor]:
        """This action's input: its posted receive (waited for), else one posted and waited for now."""
        if action not in self.posted:
            self.post(action, [])
        if action not in self.posted:
            return None
        buffer, handle = self.posted.pop(action)
        handle.wait()
        return buffer
