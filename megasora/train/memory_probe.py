"""Exact live tensor bytes on any device (CPU included), for comparing memory models with measurement.

`LiveTensorBytes` is a TorchDispatchMode: every tensor an ATen op creates while the mode is
active is recorded by its storage, and forgotten when that storage is freed (a weakref
finalizer; PyTorch keeps one Python object per storage, so the finalizer fires exactly when
the allocation is released). Views share their base's storage and are counted once.
`current_bytes` is the sum of `storage.nbytes()` over live recorded storages; `peak_bytes`
its maximum, sampled after every op. This is what torch.cuda.max_memory_allocated reports
on a GPU, minus allocator rounding, and unlike RSS it is exact and per tensor.

    from megasora.train.memory_probe import LiveTensorBytes

    probe = LiveTensorBytes(device="cpu")      # device=None counts every device
    probe.track(model.parameters())            # tensors that existed before the mode
    with probe:                                # enter / exit as often as needed
        loss = model(x).sum()
        probe.mark("forward")                  # named peak so far, then the peak restarts
        loss.backward()
        probe.mark("backward")
    probe.peak_bytes, probe.current_bytes, probe.marks  # {"forward": bytes, "backward": bytes}
    probe.reset_peak()                         # peak := current

What it cannot see: memory allocated inside one kernel and freed before it returns (kernel
workspaces), allocator caching/fragmentation, and non-tensor buffers (gloo/NCCL internals).
Tensors created outside the mode are invisible unless passed to `track()`. Tensors created on
other threads without the mode (DeepSpeed's optional background threads) are missed; the
autograd engine's CPU backward runs on the calling thread with the mode active.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Track live bytes of the storages of tensors made by ATen ops (see the module docstring)."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.device_type = None if device is None else torch.device(device).type
        self.current_bytes = 0
        self.peak_bytes = 0
        self.marks: dict[str, int] = {}
        self._live: dict[weakref.ref, int] = {}  # storage -> nbytes when last seen
        self._lock = threading.Lock()

    def track(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Count tensors created before the probe (parameters, optimizer state, inputs)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._record(tensor)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def mark(self, name: str) -> int:
        """Store the peak since the last mark (or reset) under `name`, then restart the peak; returns it."""
        self.marks[name] = self.peak_bytes
        self.reset_peak()
        return self.marks[name]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._record(tensor)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out

    def _record(self, tensor: torch.Tensor) -> None:
        if self.device_type is not None and tensor.device.type != self.device_type:
            return
        if tensor.is_sparse or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        # Keyed by weak reference, not id(): a dead storage's entry never matches a new storage
        # that reuses its address (its finalizer may run late, on the thread that freed it).
        lookup = weakref.ref(storage)
        with self._lock:
            if lookup in self._live:  # seen again (an in-place op's output): resize_ may have changed it
                self.current_bytes += nbytes - self._live[lookup]
                self._live[lookup] = nbytes
            else:
                self._live[weakref.ref(storage, self._release)] = nbytes
                self.current_bytes += nbytes

    def _release(self, ref: weakref.ref) -> None:
        with self._lock:
            self.current_bytes -= self._live.pop(ref, 0)
