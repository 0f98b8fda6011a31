"""The one seam where communication is counted (and checked): wrappers around torch.distributed's
collectives.

Our own helpers (parallel/comm.py, ring.py, tensor.py, the pipeline links) and DeepSpeed
(deepspeed.comm.TorchBackend forwards every call to torch.distributed.<op>) all end in these
functions, so wrapping them once counts everything, DeepSpeed's gradient collectives included,
without a counter anywhere in model or parallel code. The same wrappers verify, when asked,
that every tensor they are handed lives on the training device (megasora/parallel/device_check.py).

Importing this module changes nothing. `install()` replaces the functions in the
torch.distributed namespace, once per process; the training start-up
(megasora/train/startup.py) calls it before DeepSpeed creates its communication backend,
which caches all_gather_into_tensor / reduce_scatter_tensor. Should the backend exist
already, install() re-points those two cached functions. While the counter and the check are
off each wrapper costs two attribute checks.

A call is recorded as (axis, kind) -> bytes, seconds, calls. Bytes follow the convention of
megasora/plan/communication.py (full tensor handed to the collective; p2p: bytes sent).
Seconds are the time this rank was blocked: the whole call for a synchronous collective, the
issue plus every wait() of the returned handle for an asynchronous one, i.e. the exposed
communication. The axis is the name of the mesh axes the group spans (`axis_name`); calls on
a one-rank group move nothing and are not recorded. Nested calls (a collective implemented by
another, batch_isend_irecv by isend/irecv) are counted once, at the outermost.
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from megasora.parallel.device_check import CHECK
from megasora.parallel.mesh import axis_name


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _list_bytes(ts: list[torch.Tensor]) -> int:
    return sum(_nbytes(t) for t in ts)


# name -> (kind, the argument whose bytes count, how: "tensor" | "list" | "none" (receives))
WRAPPED: dict[str, tuple[str, str, str]] = {
    "all_reduce": ("all_reduce", "tensor", "tensor"),
    "all_gather_into_tensor": ("all_gather", "output_tensor", "tensor"),
    "all_gather_single": ("all_gather", "output_tensor", "tensor"),
    "_all_gather_base": ("all_gather", "output_tensor", "tensor"),
    "all_gather": ("all_gather", "tensor_list", "list"),
    "reduce_scatter_tensor": ("reduce_scatter", "input", "tensor"),
    "reduce_scatter_single": ("reduce_scatter", "input", "tensor"),
    "_reduce_scatter_base": ("reduce_scatter", "input", "tensor"),
    "reduce_scatter": ("reduce_scatter", "input_list", "list"),
    "all_to_all_single": ("all_to_all", "input", "tensor"),
    "all_to_all": ("all_to_all", "input_tensor_list", "list"),
    "broadcast": ("broadcast", "tensor", "tensor"),
    "reduce": ("reduce", "tensor", "tensor"),
    "send": ("p2p", "tensor", "tensor"),
    "isend": ("p2p", "tensor", "tensor"),
    "recv": ("p2p", "tensor", "none"),   # counted at the sender; the wait is this rank's time
    "irecv": ("p2p", "tensor", "none"),
}


@dataclass
class Tally:
    bytes: int = 0
    seconds: float = 0.0
    calls: int = 0


class CommCounter:
    """Per-step tallies keyed by (axis, kind). Process-global because the seam is."""

    def __init__(self) -> None:
        self.active = False
        self.tallies: dict[tuple[str, str], Tally] = defaultdict(Tally)
        self._layout: Any = None
        self._names: dict[int, Optional[str]] = {}
        self._local = threading.local()

    def set_layout(self, layout: Any) -> None:
        """Name groups by the axes of this layout they span (else: 'world' for any multi-rank group)."""
        self._layout, self._names = layout, {}

    def axis_of(self, group: Any) -> Optional[str]:
        key = id(group)
        if key not in self._names:
            ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
            self._names[key] = self._name(ranks)
        return self._names[key]

    def _name(self, ranks: list[int]) -> Optional[str]:
        if len(ranks) <= 1:
            return None
        if self._layout is None:
            return "world"
        coords = [self._layout.coords(r) for r in ranks]
        spanned = tuple(a for a in coords[0] if len({c[a] for c in coords}) > 1)
        return axis_name(spanned, self._layout)

    def add(self, axis: str, kind: str, nbytes: int, seconds: float, calls: int = 1) -> None:
        tally = self.tallies[(axis, kind)]
        tally.bytes += nbytes
        tally.seconds += seconds
        tally.calls += calls

    def take(self) -> dict[tuple[str, str], Tally]:
        """This window's tallies; starts a new window."""
        out, self.tallies = dict(self.tallies), defaultdict(Tally)
        return out

    @contextmanager
    def counting(self, enabled: bool = True) -> Iterator["CommCounter"]:
        """Count the collectives issued inside the block (nothing when not enabled)."""
        previous, self.active = self.active, enabled
        try:
            yield self
        finally:
            self.active = previous

    @property
    def depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @depth.setter
    def depth(self, value: int) -> None:
        self._local.depth = value


COUNTER = CommCounter()


class _TimedWork:
    """An async handle whose wait() adds to the call's seconds (everything else is delegated)."""

    def __init__(self, work: Any, axis: str, kind: str) -> None:
        self._work, self._axis, self._kind = work, axis, kind

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            if COUNTER.active:
                COUNTER.add(self._axis, self._kind, 0, time.perf_counter() - start, calls=0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _argument(names: list[str], name: str) -> Callable[[tuple, dict], Any]:
    """Fast lookup of parameter `name` in (args, kwargs) of a call (inspect's bind is ~10x slower)."""
    index = names.index(name)
    return lambda args, kwargs: args[index] if len(args) > index else kwargs.get(name)


def _counted(original: Callable, kind: str, counted_arg: str, how: str) -> Callable:
    names = list(inspect.signature(original).parameters)
    group_of, payload_of = _argument(names, "group"), _argument(names, counted_arg)
    op = original.__name__

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if CHECK.device is not None:
            CHECK.verify(op, args, kwargs)
        if not COUNTER.active or COUNTER.depth:
            return original(*args, **kwargs)
        payload = payload_of(args, kwargs)
        nbytes = 0 if how == "none" else _list_bytes(payload) if how == "list" else _nbytes(payload)
        return _timed_call(lambda: original(*args, **kwargs), group_of(args, kwargs), kind, nbytes)

    return wrapper


def _timed_call(call: Callable[[], Any], group: Any, kind: str, nbytes: int) -> Any:
    axis = COUNTER.axis_of(group)
    if axis is None:
        return call()
    COUNTER.depth += 1
    start = time.perf_counter()
    try:
        result = call()
    finally:
        COUNTER.depth -= 1
    COUNTER.add(axis, kind, nbytes, time.perf_counter() - start)
    if isinstance(result, list):
        return [_TimedWork(w, axis, kind) for w in result]
    return _TimedWork(result, axis, kind) if result is not None and hasattr(result, "wait") else result


def _counted_batch(original: Callable) -> Callable:
    @functools.wraps(original)
    def wrapper(p2p_op_list: list) -> Any:
        if CHECK.device is not None:
            CHECK.verify("batch_isend_irecv", (p2p_op_list,), {})
        if not COUNTER.active or COUNTER.depth or not p2p_op_list:
            return original(p2p_op_list)
        sent = sum(_nbytes(op.tensor) for op in p2p_op_list if op.op is c10d.isend)
        return _timed_call(lambda: original(p2p_op_list), p2p_op_list[0].group, "p2p", sent)

    return wrapper


ORIGINALS: dict[str, Callable] = {}  # name -> torch's own function, once installed


def install() -> None:
    """Wrap torch.distributed's collectives, in torch.distributed and in distributed_c10d (where
    P2POp and batch_isend_irecv compare `op is isend`), once per process."""
    if ORIGINALS:
        return
    wrappers = {}
    for name, (kind, counted_arg, how) in WRAPPED.items():
        original = getattr(c10d, name, None)
        if original is not None:
            ORIGINALS[name], wrappers[name] = original, _counted(original, kind, counted_arg, how)
    ORIGINALS["batch_isend_irecv"] = c10d.batch_isend_irecv
    wrappers["batch_isend_irecv"] = _counted_batch(c10d.batch_isend_irecv)
    for name, wrapper in wrappers.items():
        setattr(c10d, name, wrapper)
        setattr(dist, name, wrapper)
    _rewire_deepspeed_backend()


def _rewire_deepspeed_backend() -> None:
    """If DeepSpeed's backend already exists, point the two functions it cached at the wrappers."""
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    backend = getattr(ds_comm, "cdb", None)
    if backend is None:
        return
    for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                       ("reduce_scatter_function", "reduce_scatter_tensor")):
        cached = getattr(backend, attr, None)
        if cached is not None and cached is ORIGINALS.get(name):
            setattr(backend, attr, getattr(dist, name))
