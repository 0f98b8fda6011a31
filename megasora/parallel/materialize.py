"""A rank's shard of the DiT without the whole model: shapes on the meta device, then values.

The start-up (train/trainer.py) builds the DiT on the meta device (shapes only: no storage,
no random draws), parallelizes it and cuts it to this rank's pipeline stage there, and then
`materialize` gives the parameters this rank holds their values. Before, every rank built
the whole model in fp32 on the host and let parallelize() slice it: 120 GB per rank for
dit-30b.

The values are exactly those of the seeded single-process init, `torch.manual_seed(seed);
DiT(arch)`: the golden parallel == single tests compare with one process as before, and a
run initialises as it did before this change. The global RNG is consumed in the same order
on the same shapes:

  1. construction: each module's own parameters as its `reset_parameters()` sets them
     (torch's convention: a constructor registers its parameters, then calls it), module by
     module in the order the constructors registered them. That order is recorded, not
     written down: the DiT is built once more on meta under a parameter-registration hook.
  2. `DiT.reset_parameters`, step by step (`DiT.reset_steps`).

Each step makes ONE full-size module (weight + bias) or parameter on the host; this rank
keeps its part — the tp shard ColumnParallelLinear / RowParallelLinear cut (equal slices
along `partition_dim`, in tp-rank order), nothing for another stage's blocks — and the rest
is freed. Peak host memory: this rank's shard plus the largest module (plan/memory.py:
startup_host_bytes). The price is time, not memory: every rank still draws every random
number of the whole model, as before (the CPU generator cannot skip ahead).

Why not seed each parameter from (seed, name), which would let a rank skip the draws of
other stages' blocks? Every fresh run's initial weights would change, so recipes tuned and
recorded on today's (docs/prompt_following.md) would no longer reproduce; replaying the
draws saves the memory, which is what stops a large model from starting.

ZeRO-3: `partition` (train/engine.py zero3_partitioner: DeepSpeed's zero.Init over dp x sp)
takes each parameter as soon as its final value is drawn and keeps only this rank's ZeRO-3
partition, so a rank never holds even its whole tp shard: peak = 1/(dp*sp) of the shard plus
one full-size module and that module's tp part (plan/memory.py: startup_host_bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from megasora.models.dit import DiT, ParamInit
from megasora.parallel.tensor import is_tensor_parallel


def build_on_meta(build: Callable[[], DiT]) -> tuple[DiT, list[str]]:
    """The model on the meta device, and the modules owning parameters in the order their
    constructors registered them (= the order they drew from the RNG)."""
    owners: list[nn.Module] = []
    handle = register_module_parameter_registration_hook(lambda module, name, param: owners.append(module))
    try:
        with torch.device("meta"):
            model = build()
    finally:
        handle.remove()
    names = {id(module): name for name, module in model.named_modules()}
    return model, list(dict.fromkeys(names[id(module)] for module in owners if id(module) in names))


@dataclass(frozen=True)
class InitStep:
    """One initialisation `DiT(arch)` performs: the parameters it sets and how it draws them."""
    names: tuple[str, ...]                    # full parameter names
    like: tuple[torch.Tensor, ...]            # their meta tensors: shape and dtype
    draw: Callable[[list[torch.Tensor]], None]  # fills host tensors of those shapes, from the global RNG


def init_steps(model: DiT, owners: list[str]) -> list[InitStep]:
    """Every initialisation `DiT(arch)` performs, in the order it draws from the global RNG:
    each owner module's reset_parameters (construction), then DiT.reset_steps."""
    steps = []
    for owner in owners:
        module = model.get_submodule(owner)
        if not callable(getattr(module, "reset_parameters", None)):
            raise TypeError(f"{owner or 'the model'} ({type(module).__name__}) owns parameters but has no "
                            f"reset_parameters(): its constructor's values cannot be replayed")
        own = [(name, param) for name, param in module._parameters.items() if param is not None]
        steps.append(InitStep(tuple(f"{owner}.{name}" if owner else name for name, _ in own),
                              tuple(param for _, param in own), partial(_reset_into, module)))
    for name, init in model.reset_steps():
        steps.append(InitStep((name,), (model.get_parameter(name),), partial(_init_into, init)))
    return steps


def _reset_into(module: nn.Module, tensors: list[torch.Tensor]) -> None:
    """module.reset_parameters() with `tensors` standing in for its own (meta) parameters."""
    own = {name: param for name, param in module._parameters.items() if param is not None}
    stand_ins = [nn.Parameter(tensor, requires_grad=False) for tensor in tensors]
    module._parameters.update(zip(own, stand_ins))
    try:
        with torch.no_grad():
            module.reset_parameters()  # type: ignore[operator]  # init_steps checked it is callable
        if any(module._parameters[name] is not stand_in for name, stand_in in zip(own, stand_ins)):
            raise TypeError(f"{type(module).__name__}.reset_parameters() replaces its parameters; it must "
                            f"fill them in place for materialize to replay it")
    finally:
        module._parameters.update(own)


def _init_into(init: ParamInit, tensors: list[torch.Tensor]) -> None:
    with torch.no_grad():
        init(tensors[0])


class Scratch:
    """One host buffer every step draws into, sized for the largest step. Drawing the whole model
    then allocates only what a rank keeps; a fresh full-size tensor per step instead grew glibc's
    heap by ~40% of the model (freed chunks it does not return: bench/bench_startup_memory.py)."""

    ALIGN = 64  # bytes, like a fresh allocation: the fill kernels see the same alignment

    def __init__(self, steps: list[InitStep]) -> None:
        self.buffer = torch.empty(max(self._layout(step.like)[-1] for step in steps), dtype=torch.uint8)

    def _layout(self, like: tuple[torch.Tensor, ...]) -> list[int]:
        offsets = [0]
        for tensor in like:
            offsets.append(offsets[-1] + -(-tensor.numel() * tensor.element_size() // self.ALIGN) * self.ALIGN)
        return offsets

    def views(self, like: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Contiguous host tensors shaped like `like`, valid until the next call."""
        offsets = self._layout(like)
        return [self.buffer[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                for start, t in zip(offsets, like)]


def local_part(full: torch.Tensor, param: torch.Tensor, tp_rank: int, copy: bool = True) -> torch.Tensor:
    """A copy of this rank's part of a full-size value, for the (meta) parameter `param`; with
    copy=False a contiguous view of `full` where the part is contiguous (a copy otherwise)."""
    if is_tensor_parallel(param):
        dim: int = param.partition_dim  # type: ignore[attr-defined]  # set by mark_tensor_parallel
        width = param.shape[dim]
        full = full.narrow(dim, tp_rank * width, width)  # (..., width, ...) of (..., tp*width, ...)
    if full.shape != param.shape:
        raise ValueError(f"init value of shape {tuple(full.shape)} for a parameter of shape {tuple(param.shape)}")
    return full.clone(memory_format=torch.contiguous_format) if copy else full.contiguous()


def real_parameter(meta: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    """A real parameter holding `value` in place of the meta one, keeping what parallelize()
    attached to it: attributes (tp marks) and gradient hooks (the tp sums)."""
    new = nn.Parameter(value, requires_grad=meta.requires_grad)
    new.__dict__.update(meta.__dict__)
    for hook in (meta._backward_hooks or {}).values():
        new.register_hook(hook)
    return new


def adopt(local: nn.Module, values: dict[str, nn.Parameter]) -> None:
    """Replace each meta parameter of `local` by values[name] (from real_parameter), shared
    parameters by the same one."""
    done: dict[int, nn.Parameter] = {}
    for module_name, module in local.named_modules():
        for name, old in list(module._parameters.items()):
            if old is None:
                continue
            if not old.is_meta and id(old) not in done:  # made real after the meta build (parallel/lora.py)
                done[id(old)] = old
            if id(old) not in done:
                full_name = f"{module_name}.{name}" if module_name else name
                if full_name not in values:
                    raise KeyError(f"{full_name}: no step of the DiT's init sets it")
                done[id(old)] = values.pop(full_name)
            module._parameters[name] = done[id(old)]
    left = [name for name, tensor in [*local.named_parameters(), *local.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"still on the meta device after materialize: {left}")


def materialize(local: nn.Module, build: Callable[[], DiT], tp_rank: int,
                partition: Callable[[nn.Parameter], None] | None = None) -> None:
    """Give `local` — `build()` made on the meta device, parallelized, possibly one pipeline
    stage — this rank's part of the values `torch.manual_seed(s); build()` gives the whole model
    (call it right after seeding). Peak: `local`'s parameters plus one full-size module; with
    `partition` (ZeRO-3), each parameter is handed to it as soon as it is final, so only its
    partitions accumulate. `partition` must be collective-safe: every rank of its group
    reaches the same parameters in the same order (the init's order)."""
    steps = init_steps(*build_on_meta(build))
    final = {name: index for index, step in enumerate(steps) for name in step.names}  # the write that stays
    held = dict(local.named_parameters())
    scratch = Scratch(steps)
    values = {}
    for index, step in enumerate(steps):
        tensors = scratch.views(step.like)
        step.draw(tensors)  # also when nothing is kept: the next steps need the RNG state it leaves
        for name, value in zip(step.names, tensors):
            if name in held and final[name] == index:
                # Handed to `partition` straight from the scratch buffer: it copies out the
                # partition it keeps, and a full-size copy per parameter would grow the heap.
                part = local_part(value, held[name], tp_rank, copy=partition is None)
                values[name] = real_parameter(held[name], part)
                if partition is not None:
                    partition(values[name])
    adopt(local, values)
