"""Exponential moving average of the weights, kept in fp32 for sampling, saved and restored per shard.

Each rank keeps the EMA of the parameters it holds: its tensor-parallel slice of its pipeline
stage's parameters (under ZeRO-3 the whole slice, gathered for each update). A checkpoint holds
these slices as they are (megasora/train/shard_files.py): one rank per distinct slice (dp x sp
rank 0; the others hold copies) streams its tensors into `ema/slice_mpXX.safetensors` (XX: its
model-parallel rank), named like the whole model's parameters, with the place each slice sits
in its parameter; a tp-replicated parameter is written by tp rank 0 only. Restoring reads, for
each parameter, the part this rank holds under the CURRENT layout from whichever files hold it,
so tp / pp / dp changes need no conversion, and no rank gathers, clones or pickles the EMA.

Sharding the EMA over dp x sp as well (each rank updating a part of its slice) fits the same
files: every rank would write the part it holds, with its start offset.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from megasora.parallel.mesh import Mesh
from megasora.parallel.tensor import is_tensor_parallel
from megasora.train.shard_files import Piece, ShardIndex, write_shard


def gathered_parameters(model: nn.Module, zero_stage: int) -> contextlib.AbstractContextManager:
    """Inside the block every parameter of `model` holds its full value (a collective under ZeRO-3)."""
    if zero_stage == 3:  # ZeRO-3 partitions parameters; gather them to read full values.
        import deepspeed  # lazy: DeepSpeed takes ~1 s to import; only ZeRO-3 needs it here
        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ShardPlace:
    """Where this rank's parameters sit in the whole model, and whether it writes them."""
    tp_rank: int = 0
    tp_size: int = 1
    writes: bool = True        # the one copy of this slice that is saved (dp x sp rank 0)
    # its file in the checkpoint's ema/ directory; not "mp_rank_*": DeepSpeed's universal
    # conversion takes every file of the checkpoint directory tree named so for its own
    file: str = "slice_mp00"

    @classmethod
    def of(cls, mesh: Optional[Mesh]) -> "ShardPlace":
        """From the mesh; without one (train-vae: data parallel only) global rank 0 writes."""
        if mesh is None:
            return cls(writes=not dist.is_initialized() or dist.get_rank() == 0)
        return cls(mesh.rank_in("tp"), mesh.size("tp"), mesh.rank_in("dpsp") == 0, f"slice_mp{mesh.rank_in('mp'):02d}")

    def piece(self, param: torch.Tensor, shape: tuple[int, ...]) -> Piece:
        if not is_tensor_parallel(param):
            return Piece.whole_of(shape)
        return Piece.split(shape, param.partition_dim, self.tp_rank, self.tp_size)  # type: ignore[attr-defined]


class EMA:
    def __init__(self, model: nn.Module, decay: float, zero_stage: int = 0, place: ShardPlace = ShardPlace()) -> None:
        self.decay = decay
        self.zero_stage = zero_stage
        self.place = place
        with gathered_parameters(model, zero_stage):
            self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}
            self.pieces = {name: place.piece(p, tuple(self.shadow[name].shape)) for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Early steps average over fewer updates so the EMA is useful before 1/(1-decay) steps.
        decay = min(self.decay, (1 + step) / (10 + step))
        with gathered_parameters(model, self.zero_stage):
            for name, p in model.named_parameters():
                self.shadow[name].lerp_(p.detach().float(), 1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's EMA tensors themselves (not copies): copy them to keep them past the next update."""
        return dict(self.shadow)

    def save(self, directory: Path) -> None:
        """Stream this rank's slices into directory/<place.file>.safetensors (if this rank writes them)."""
        if not self.place.writes:
            return
        # a tp-replicated parameter is the same on every tp rank: tp rank 0 writes it
        names = [n for n, p in self.pieces.items() if p.shape != p.whole or self.place.tp_rank == 0]
        directory.mkdir(parents=True, exist_ok=True)
        write_shard(directory / f"{self.place.file}.safetensors", {n: self.shadow[n] for n in names},
                    {n: self.pieces[n] for n in names})

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        """Read this rank's slice of every parameter from the shard files in `directory`, whatever
        layout wrote them (only the overlapping bytes of each saved slice are read)."""
        with ShardIndex(directory) as index:
            missing = set(self.shadow) - set(index.names())
            if missing:
                raise KeyError(f"{directory}: the EMA lacks parameters {sorted(missing)[:5]}")
            for name, tensor in self.shadow.items():
                index.read_into(name, tensor, self.pieces[name])  # host slices copied in, on any device

    @torch.no_grad()
    def load_whole(self, state: dict[str, Any]) -> None:
        """Read this rank's slices from whole tensors (checkpoints that stored the EMA unsharded in
        their client state, before per-shard EMA files)."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name][self.pieces[name].region])
