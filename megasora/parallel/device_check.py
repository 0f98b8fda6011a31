"""Device discipline at the communication seam: every tensor handed to a collective lives on
the training device.

NCCL takes only CUDA tensors, so a host tensor that reaches a collective (a flag made with
`torch.tensor(...)`, a loss moved with `.cpu()`) stops a GPU run at its first step, while gloo
takes both and the CPU tests never notice. Inside `checking(device)` every collective that
megasora/parallel/comm_counter.py wraps first verifies its tensor arguments and raises
`CollectiveDeviceError` naming the collective and the tensor, before anything is sent (so all
ranks fail at the same call instead of some waiting forever).

On an accelerator the test is the device type. On a CPU run host and device are the same
memory, so `HostTensors` stands in for the accelerator: a tensor made on the host (a factory
given no device, `.cpu()`, `torch.from_numpy`) is tagged, what is computed from it stays
tagged (except where a device tensor absorbs a host scalar, as CUDA allows), and `.to(device)`
clears the tag (the copy an accelerator would make). The check refuses tagged tensors, so a
gloo run through the real trainer fails where NCCL would. It can miss a move written
`.to("cpu")` or a factory given `device="cpu"` (on CPU that is the training device too).

`MEGASORA_CHECK_COLLECTIVE_DEVICES=1` turns the check on for a training run (the start-up in
megasora/train/startup.py reads it). On CPU it costs a Python call per torch op: a test mode.
"""
from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

ENV_VAR = "MEGASORA_CHECK_COLLECTIVE_DEVICES"

# Factories that put their result on the default device (the host) unless given `device=`.
FACTORIES: frozenset[Callable] = frozenset({
    torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor, torch.zeros, torch.ones, torch.empty,
    torch.full, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn,
    torch.randint, torch.randperm})
TO_HOST: frozenset[Callable] = frozenset({torch.Tensor.cpu, torch.from_numpy, torch.frombuffer})
MOVES: frozenset[Callable] = frozenset({torch.Tensor.to, torch.Tensor.cuda})
IN_PLACE_OPERATORS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                                "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"})


class CollectiveDeviceError(RuntimeError):
    """A tensor that is not on the training device was handed to a collective."""


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _in_place(func: Callable) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in IN_PLACE_OPERATORS


def _names_device(args: tuple, kwargs: dict) -> bool:
    """Whether a `.to(...)` call names a device (a device, its name, an index or a tensor to follow)."""
    return kwargs.get("device") is not None or any(
        isinstance(a, (torch.device, str, int, torch.Tensor)) and not isinstance(a, bool) for a in args[1:])


class HostTensors(TorchFunctionMode):
    """A CPU run's stand-in for an accelerator: tags the tensors that would live on the host."""

    def __init__(self) -> None:
        super().__init__()
        # id -> weak reference of each tagged tensor: nothing is stored on the tensors themselves
        # (a tensor's attributes are pickled with it by torch.save)
        self.tagged: dict[int, weakref.ref] = {}

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self.tagged.get(id(t))
        return ref is not None and ref() is t

    def _set(self, outs: list[torch.Tensor], host: bool) -> None:
        for t in outs:
            if host:
                self.tagged[id(t)] = weakref.ref(t, functools.partial(self._forget, id(t)))
            else:
                self.tagged.pop(id(t), None)

    def _forget(self, key: int, _dead: weakref.ref) -> None:
        self.tagged.pop(key, None)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = _tensors(out)
        if not outs:
            return out
        if func in TO_HOST or (func in MOVES and _names_device(args, kwargs)):
            if out is args[0]:  # on CPU the move is a no-op; a copy on an accelerator, so tag a new view
                out = outs[0] = out.view_as(out)
            self._set(outs, func in TO_HOST)
        elif func in FACTORIES:
            follows_input = bool(args) and isinstance(args[0], torch.Tensor)  # as_tensor(t) keeps t's device
            if not follows_input and kwargs.get("device") is None:
                self._set(outs, True)
        elif not _in_place(func):  # an in-place op keeps its target where it is
            self._propagate(_tensors((args, kwargs)), outs)
        return out

    def _propagate(self, inputs: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        host = [t for t in inputs if self.is_host(t)]
        if not host:
            return
        # CUDA lets a 0-dim host tensor join device operands; the result is on the device.
        absorbed = all(t.dim() == 0 for t in host) and any(not self.is_host(t) for t in inputs)
        self._set(outs, not absorbed)


class CollectiveDeviceCheck:
    """What the comm seam verifies: off (device None), or every tensor argument on `device`."""

    def __init__(self) -> None:
        self.device: Optional[torch.device] = None
        self.host: Optional[HostTensors] = None
        self.verified: Counter[str] = Counter()  # op -> calls verified since the last checking() began

    def verify(self, op: str, args: tuple, kwargs: dict) -> None:
        if self.device is None:
            return
        self.verified[op] += 1
        for t in _collective_tensors(args, kwargs):
            tagged = self.host is not None and self.host.is_host(t)
            if tagged or t.device.type != self.device.type:
                where = "host (tagged)" if tagged else str(t.device)
                raise CollectiveDeviceError(
                    f"{op}: a {tuple(t.shape)} {t.dtype} tensor on the {where} was handed to a collective of a "
                    f"run on {self.device}; NCCL takes only device tensors: create it with device=... or move "
                    f"it with .to(device) (megasora/parallel/device_check.py)")


CHECK = CollectiveDeviceCheck()


def _collective_tensors(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The tensors of a collective's arguments: tensors, lists of them, P2POps (batch_isend_irecv)."""
    for value in (*args, *kwargs.values()):
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, dist.P2POp):
                item = item.tensor
            if isinstance(item, torch.Tensor):
                yield item


@contextlib.contextmanager
def checking(device: torch.device) -> Iterator[CollectiveDeviceCheck]:
    """Verify every collective's tensors inside the block (tagging host tensors on a CPU run)."""
    previous = CHECK.device, CHECK.host
    CHECK.device, CHECK.host = device, HostTensors() if device.type == "cpu" else None
    CHECK.verified = Counter()
    try:
        with CHECK.host if CHECK.host is not None else contextlib.nullcontext():
            yield CHECK
    finally:
        CHECK.device, CHECK.host = previous


def checking_if_requested(device: torch.device) -> contextlib.AbstractContextManager:
    """`checking(device)` when MEGASORA_CHECK_COLLECTIVE_DEVICES is set (and not 0), else nothing."""
    return checking(device) if os.environ.get(ENV_VAR, "0") not in ("", "0") else contextlib.nullcontext()
