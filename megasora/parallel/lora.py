"""LoRA adapters on the model's linears, applied by parallelize() after tensor-parallel slicing.

An adapted linear computes y = W x + b + (alpha / r) * B (A dropout(x)), A (r, in) and B (out, r);
B starts at zero, so an adapted model starts as the base model, and only A and B train (the base
is frozen). Under tensor parallelism the adapter follows its linear's split, so it is exact and
costs no extra communication:

    column-parallel W (out/tp, in):  A whole (r, in), replicated;  B (out/tp, r), rows split.
        The input is the full sequence chunk on every tp rank, so A x is the same everywhere and
        each rank's B rows make its own out/tp features. A's gradient is a partial sum over the
        ranks' features: summed over tp by a gradient hook, like every replicated parameter.
    row-parallel W (out, in/tp):     A (r, in/tp), columns split;  B whole (out, r), replicated.
        A_r x_r is rank r's partial sum of A x, so B A_r x_r is its partial sum of the update:
        added to W_r x_r BEFORE the reduce-scatter, which sums the partials with the base's.
        B's gradient is then a partial sum (of the ranks' A_r x_r): summed over tp by a hook.

A's initial value is drawn whole from a generator seeded by the linear's name (crc32), then cut
like the linear: every tp degree starts from the same adapter as one process, and the global RNG
(the base model's seeded init, data order) is untouched by turning LoRA on.
"""
from __future__ import annotations

import fnmatch
import math
import re
import zlib
from functools import partial
from typing import Callable, Literal, Optional, cast

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed import ProcessGroup

from megasora.config import ConfigError, LoRAConfig
from megasora.models import convert
from megasora.models.dit import DiTArch
from megasora.models.wan import WanArch
from megasora.parallel.comm import reduce_scatter_seq_for_tp
from megasora.parallel.mesh import Mesh
from megasora.parallel.tensor import (
    ColumnParallelLinear,
    ModulationLinear,
    RowParallelLinear,
    _sum_over_tp,
    is_tensor_parallel,
    mark_tensor_parallel,
    tp_partition_dims,
)

Split = Literal["none", "column", "row"]
ADAPTABLE = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


class LoRAFactor(nn.Module):
    """One factor (A or B) as a bias-free linear: its parameter is named `weight`, like peft's."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class LoRALinear(nn.Module):
    """A linear (plain, column- or row-parallel) plus its adapter; the base keeps its parameter names
    (`weight`, `bias`), so checkpoints, tp split dims and materialize see the same model."""

    def __init__(self, base: nn.Module, split: Split, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 dropout: float, group: Optional[ProcessGroup]) -> None:
        super().__init__()
        self.weight: nn.Parameter = cast(nn.Parameter, base.weight)
        self.bias: Optional[nn.Parameter] = cast(Optional[nn.Parameter], base.bias)
        self.split = split
        self.group = group  # the tp group of a row-parallel base: its reduce-scatter
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = LoRAFactor(lora_a)  # (r, in) or (r, in/tp)
        self.lora_B = LoRAFactor(lora_b)  # (out, r) or (out/tp, r)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) * B A dropout(x): (B, N, in_local) -> (B, N, out_local); a partial sum if row-parallel."""
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split != "row":
            return F.linear(x, self.weight, self.bias) + self.delta(x)
        assert self.group is not None
        partial_sums = F.linear(x, self.weight) + self.delta(x)          # (B, N, out), this rank's share
        out = reduce_scatter_seq_for_tp(partial_sums, self.group)         # (B, N/tp, out)
        return out if self.bias is None else out + self.bias


def _split_of(module: nn.Module) -> Split:
    if isinstance(module, RowParallelLinear):
        return "row"
    return "column" if isinstance(module, ColumnParallelLinear) else "none"


def adaptable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every linear LoRA can adapt (adaLN's modulation linear is not one: under tp it is
    column-parallel over a gathered conditioning, which this adapter does not follow)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, ADAPTABLE) and not isinstance(module, ModulationLinear)
            and ".adaln." not in f"{name}."}


def matches(name: str, pattern: str) -> bool:
    """peft's convention: a pattern names a module by its full name or by a dotted suffix (`attn.q`
    adapts every block's attn.q, not cross_attn.q); shell wildcards allowed (`blocks.1*.mlp.fc1`)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def generic_names(names: list[str]) -> list[str]:
    """Module names with block indices folded (blocks.3.attn.q -> blocks.*.attn.q), in model order."""
    return list(dict.fromkeys(re.sub(r"(^|\.)(\d+)(\.|$)", r"\1*\3", name) for name in names))


def select_targets(model: nn.Module, lora: LoRAConfig) -> dict[str, nn.Module]:
    """The linears the config's patterns name; a pattern naming none is a one-line ConfigError."""
    linears = adaptable_linears(model)
    for pattern in lora.targets:
        if not any(matches(name, pattern) for name in linears):
            raise ConfigError(f"train.lora.targets: {pattern!r} matches no linear layer of this model",
                              f"name layers it has (a full name or a dotted suffix such as attn.q): "
                              f"{', '.join(generic_names(list(linears)))}")
    return {name: module for name, module in linears.items() if any(matches(name, p) for p in lora.targets)}


def initial_a(name: str, rank: int, in_features: int) -> torch.Tensor:
    """The whole A (r, in) of the linear `name`: peft's kaiming-uniform(a=sqrt 5) bound 1/sqrt(in),
    from a generator of its own (see the module docstring)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    bound = 1 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def _adapter(name: str, base: nn.Module, lora: LoRAConfig, mesh: Optional[Mesh]) -> LoRALinear:
    split = _split_of(base)
    tp_rank, tp_size = (mesh.rank_in("tp"), mesh.size("tp")) if mesh is not None else (0, 1)
    weight = cast(torch.Tensor, base.weight)
    out_local, in_local = weight.shape
    in_full = in_local * tp_size if split == "row" else in_local
    device = torch.device("cpu") if weight.is_meta else weight.device  # meta: made for real here
    lora_a = initial_a(name, lora.rank, in_full)
    if split == "row":
        lora_a = lora_a[:, tp_rank * in_local:(tp_rank + 1) * in_local].clone()  # (r, in/tp)
    lora_b = torch.zeros(out_local, lora.rank)                                 # (out or out/tp, r)
    group = mesh.communicating_group("tp") if split == "row" and mesh is not None else None
    adapter = LoRALinear(base, split, lora_a.to(device), lora_b.to(device), lora.scale, lora.dropout, group)
    if split == "row":
        mark_tensor_parallel(adapter.lora_A.weight, 1)
    elif split == "column":
        mark_tensor_parallel(adapter.lora_B.weight, 0)
    if mesh is not None and tp_size > 1:  # a replicated factor's gradient is a partial sum over tp
        for factor in (adapter.lora_A.weight, adapter.lora_B.weight):
            if not is_tensor_parallel(factor):
                factor.register_hook(partial(_sum_over_tp, mesh.communicating_group("tp")))
    return adapter


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def apply_lora(model: nn.Module, lora: LoRAConfig, mesh: Optional[Mesh] = None) -> nn.Module:
    """Adapt the linears train.lora.targets names and freeze everything else, in place.

    Call after tensor parallelism sliced the linears (the adapter follows their split); `mesh`
    None means one process.
    """
    targets = select_targets(model, lora)
    for name, base in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _adapter(name, base, lora, mesh))
    if lora.init:
        load_adapters(model, list(targets), lora, mesh)
    for name, param in model.named_parameters():
        if not is_lora_parameter(name):
            param.requires_grad_(False)
            if param._backward_hooks:  # tp's gradient sum: a frozen parameter has no gradient to sum
                param._backward_hooks.clear()
    return model


def lora_partition_dims(model: nn.Module) -> dict[str, int]:
    """LoRA parameter name -> the dim tp splits it along, at ANY tp degree (like tp_partition_dims):
    B of a column-parallel target by rows, A of a row-parallel target by columns."""
    base = tp_partition_dims(model)
    dims = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            base_dim = base.get(f"{name}.weight")
            if base_dim == 0:
                dims[f"{name}.lora_B.weight"] = 0
            elif base_dim == 1:
                dims[f"{name}.lora_A.weight"] = 1
    return dims


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's LoRA tensors by parameter name (detached; tp-split ones are this rank's part)."""
    return {name: p.detach() for name, p in model.named_parameters() if is_lora_parameter(name)}


@torch.no_grad()
def merged_weights(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Whole-model weights with every adapter folded in: W + scale * B A; the LoRA tensors dropped."""
    out = {name: w for name, w in weights.items() if not is_lora_parameter(name)}
    for name in weights:
        if name.endswith(".lora_A.weight"):
            prefix = name.removesuffix(".lora_A.weight")
            a, b = weights[name], weights[f"{prefix}.lora_B.weight"]
            out[f"{prefix}.weight"] = out[f"{prefix}.weight"] + scale * (b.float() @ a.float()).to(out[f"{prefix}.weight"].dtype)
    return out


# ---------------------------------------------------------------- diffusers' LoRA format

PREFIX = "transformer."  # diffusers' pipelines keep the denoiser's adapters under this prefix
RowMap = Callable[[torch.Tensor], torch.Tensor]


def _same(rows: torch.Tensor) -> torch.Tensor:
    return rows


def module_map(arch: DiTArch, to_diffusers: bool = True) -> Callable[[str], tuple[str, RowMap]]:
    """MegaSora module name -> (diffusers module name, map of B's rows (out, r) between the two orders).

    The Wan family goes through models/convert.py's name table (q/k rows are RoPE-reordered,
    proj_out's are (pt, ph, pw, C) there); the default family has no diffusers twin: names kept.
    """
    if not isinstance(arch, WanArch):
        return lambda name: (name, _same)
    wan = arch
    table = {mega.removesuffix(".weight"): (diff.removesuffix(".weight"), transform)
             for diff, mega, transform in convert.name_pairs(wan) if mega.endswith(".weight")}
    to_rows = convert.to_diffusers_tensor if to_diffusers else convert.to_megasora_tensor

    def rename(name: str) -> tuple[str, RowMap]:
        diffusers, transform = table[name]
        return diffusers, lambda rows: to_rows(rows, transform, wan)
    return rename


def _read_lora_file(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"train.lora.init={path} is not a readable safetensors file ({err})",
                          "pass a LoRA file from `megasora ckpt export RUN --format diffusers-lora`") from err


def _check_file(path: str, tensors: dict[str, torch.Tensor], wanted: dict[str, tuple[int, int]],
                lora: LoRAConfig) -> None:
    """The file holds exactly the adapters `wanted` (diffusers module -> (out, in)) at train.lora.rank."""
    modules = {key.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for key in tensors}
    strangers = sorted(modules - set(wanted))
    if strangers or not modules:
        raise ConfigError(f"train.lora.init={path} is a LoRA for another model or other layers: it adapts "
                          f"{strangers[:3] or 'nothing'}, this model's train.lora.targets are "
                          f"{sorted(wanted)[:3]}...", "pass a LoRA exported from a run of this model, or set "
                          "train.lora.targets to the layers it adapts")
    for module, (out_features, in_features) in wanted.items():
        a, b = tensors.get(f"{PREFIX}{module}.lora_A.weight"), tensors.get(f"{PREFIX}{module}.lora_B.weight")
        if a is None or b is None:
            raise ConfigError(f"train.lora.init={path} has no adapter for {module}",
                              "set train.lora.targets to the layers the file adapts")
        if a.shape[0] != lora.rank:
            raise ConfigError(f"train.lora.init={path} holds rank-{a.shape[0]} adapters but train.lora.rank="
                              f"{lora.rank}", f"set train.lora.rank={a.shape[0]}")
        if tuple(a.shape) != (lora.rank, in_features) or tuple(b.shape) != (out_features, lora.rank):
            raise ConfigError(f"train.lora.init={path}: {module} has A {list(a.shape)}, B {list(b.shape)} but "
                              f"this model's layer needs A {[lora.rank, in_features]}, B {[out_features, lora.rank]}"
                              f" (a LoRA for another model)", "pass a LoRA exported from a run of this model")


@torch.no_grad()
def load_adapters(model: nn.Module, names: list[str], lora: LoRAConfig, mesh: Optional[Mesh] = None) -> None:
    """Start the adapters of `names` from train.lora.init (diffusers' LoRA format, alpha / r folded
    into B: divided back out here); each rank copies its tp part."""
    tensors = _read_lora_file(lora.init)
    rename = module_map(cast(DiTArch, model.arch), to_diffusers=False)
    split = lora_partition_dims(model)
    tp_rank, tp_size = (mesh.rank_in("tp"), mesh.size("tp")) if mesh is not None else (0, 1)
    wanted, values = {}, {}
    for name in names:
        adapter = cast(LoRALinear, model.get_submodule(name))
        diffusers, rows = rename(name)
        shapes = {}
        for factor in ("lora_A", "lora_B"):
            shape = list(adapter.get_parameter(f"{factor}.weight").shape)
            dim = split.get(f"{name}.{factor}.weight")
            if dim is not None:
                shape[dim] *= tp_size
            shapes[factor] = shape
        wanted[diffusers] = (shapes["lora_B"][0], shapes["lora_A"][1])
        values[name] = (diffusers, rows)
    _check_file(lora.init, tensors, wanted, lora)
    for name, (diffusers, rows) in values.items():
        adapter = cast(LoRALinear, model.get_submodule(name))
        whole = {"lora_A": tensors[f"{PREFIX}{diffusers}.lora_A.weight"],
                 "lora_B": rows(tensors[f"{PREFIX}{diffusers}.lora_B.weight"]) / lora.scale}
        for factor, value in whole.items():
            param = adapter.get_parameter(f"{factor}.weight")
            dim = split.get(f"{name}.{factor}.weight")
            part = value.chunk(tp_size, dim=dim)[tp_rank] if dim is not None else value
            param.copy_(part.to(param.dtype))
