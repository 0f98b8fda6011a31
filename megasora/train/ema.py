"""Exponential moving average of the weights, kept in fp32 for sampling, sharded over dp x sp like
ZeRO's optimizer state, saved and restored per shard on any layout.

Each rank holds the parameters of its tensor-parallel slice of its pipeline stage; of each such
parameter (flattened) its EMA keeps only its part of the parameter's even split over the dp x sp
ranks, `ceil(numel / Z)` elements at `part * ceil(numel / Z)` — the partition ZeRO-3 gives every
parameter, so under ZeRO-3 the update reads the rank's own weight partition (`ds_tensor`, never
the gathered parameter) and under ZeRO 0-2, where every rank holds the whole weights after the
step, it reads its part of them: the update is local either way, no collective. A rank's EMA is
one flat fp32 buffer of ~Psi/Z elements (Psi: the rank's tp/pp parameters).

A checkpoint holds these parts as they are (megasora/train/shard_files.py): every rank streams
its own into `ema/slice_mpXX_dpYYY.safetensors` (XX its model-parallel rank, YYY its dp x sp
rank), named like the whole model's parameters, each part written as the few rectangles of the
whole parameter its flat range covers (`flat_pieces`); a tp-replicated parameter is written by
tp rank 0 only; under ZeRO-3 over fewer ranks than dp x sp (replicated partitions), one replica
writes. Restoring reads, for each rectangle this rank holds under the CURRENT layout,
the overlapping bytes of whichever files hold it, so tp / pp / dp / sp changes need no
conversion, and no rank gathers, clones or pickles the EMA. The whole EMA is assembled on one
process only from the files: `megasora ckpt export --ema` and the training previews.

Without a mesh (train-vae: data parallel only) the EMA is whole on every rank (under ZeRO-3
gathered to build and update it: the VAE is small) and global rank 0 writes it (`state_dict()`
hands the export its tensors).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from megasora.parallel.mesh import Mesh
from megasora.parallel.tensor import is_tensor_parallel
from megasora.train.shard_files import Piece, ShardIndex, flat_pieces, write_shard


def gathered_parameters(model: nn.Module, zero_stage: int) -> contextlib.AbstractContextManager:
    """Inside the block every parameter of `model` holds its full value (a collective under ZeRO-3)."""
    if zero_stage == 3:  # ZeRO-3 partitions parameters; gather them to read full values.
        import deepspeed  # lazy: DeepSpeed takes ~1 s to import; only ZeRO-3 needs it here
        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ShardPlace:
    """Where this rank's parameters sit in the whole model, which part of each it keeps, and
    whether it writes them."""
    tp_rank: int = 0
    tp_size: int = 1
    part: int = 0              # this rank's part of every parameter: its dp x sp rank
    parts: int = 1             # dp x sp
    writes: bool = True        # False: a copy another rank writes (train-vae's replicated EMA)
    dpsp_ranks: tuple[int, ...] = ()  # global ranks of this rank's dp x sp group (ZeRO-3's writer choice)
    # its file in the checkpoint's ema/ directory; not "mp_rank_*": DeepSpeed's universal
    # conversion takes every file of the checkpoint directory tree named so for its own
    file: str = "slice_mp00"

    @classmethod
    def of(cls, mesh: Optional[Mesh]) -> "ShardPlace":
        """From the mesh; without one (train-vae: data parallel only) the EMA is whole on every
        rank and global rank 0 writes it."""
        if mesh is None:
            return cls(writes=not dist.is_initialized() or dist.get_rank() == 0)
        part = mesh.rank_in("dpsp")
        return cls(mesh.rank_in("tp"), mesh.size("tp"), part, mesh.size("dpsp"), True, tuple(mesh.ranks["dpsp"]),
                   f"slice_mp{mesh.rank_in('mp'):02d}_dp{part:03d}")

    def piece(self, param: torch.Tensor, shape: tuple[int, ...]) -> Piece:
        """Where the rank's (tp-local) parameter of `shape` sits in the whole parameter."""
        if not is_tensor_parallel(param):
            return Piece.whole_of(shape)
        return Piece.split(shape, param.partition_dim, self.tp_rank, self.tp_size)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Part:
    """Elements [lo, hi) of a flattened (tp-local) parameter, kept at buffer[offset:offset + hi - lo]."""
    name: str
    lo: int
    hi: int
    offset: int
    within: Piece           # the tp-local parameter in the whole one
    replicated: bool        # the same on every tp rank (tp rank 0 writes it)


def _zero3_writes(model: nn.Module, place: ShardPlace) -> bool:
    """Whether this rank's ZeRO-3 partitions are the copy to save. DeepSpeed may partition over
    fewer ranks than dp x sp (e.g. over dp only, the sp ranks then holding the same partitions):
    of the partition groups inside this rank's dp x sp group, the one with its lowest rank writes."""
    group = next(model.parameters()).ds_process_group  # type: ignore[attr-defined]
    return not place.dpsp_ranks or min(place.dpsp_ranks) in dist.get_process_group_ranks(group)


def _zero3_range(param: torch.Tensor) -> tuple[int, int]:
    """The flat range of `param` in this rank's ZeRO-3 partition (`ds_tensor`, padded at the end)."""
    size = param.ds_tensor.ds_numel  # type: ignore[attr-defined]
    lo = min(dist.get_rank(param.ds_process_group) * size, param.ds_numel)  # type: ignore[attr-defined]
    return lo, min(lo + size, param.ds_numel)  # type: ignore[attr-defined]


class EMA:
    def __init__(self, model: nn.Module, decay: float, zero_stage: int = 0, place: ShardPlace = ShardPlace()) -> None:
        self.decay = decay
        # under ZeRO-3 the parts are DeepSpeed's partitions, whatever group it partitions over; without
        # a mesh (train-vae) the EMA stays whole, built and updated from the gathered parameters
        self.partitions = zero_stage == 3 and bool(place.dpsp_ranks)
        self.gather = 3 if zero_stage == 3 and not self.partitions else 0
        self.place = replace(place, writes=place.writes and _zero3_writes(model, place)) if self.partitions else place
        self.parts: list[Part] = []
        offset = 0
        for name, p in model.named_parameters():
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3: the unpartitioned (tp-local) shape
            numel = math.prod(shape)
            if self.partitions:
                lo, hi = _zero3_range(p)
            else:
                chunk = -(-numel // place.parts)
                lo, hi = min(place.part * chunk, numel), min((place.part + 1) * chunk, numel)
            self.parts.append(Part(name, lo, hi, offset, place.piece(p, shape), not is_tensor_parallel(p)))
            offset += hi - lo
        device = next(model.parameters()).device
        self.flat = torch.empty(offset, dtype=torch.float32, device=device)  # (sum of the parts,)
        with torch.no_grad(), gathered_parameters(model, self.gather):
            for ema, weights in self._sources(model):
                ema.copy_(weights)

    def _sources(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(this rank's EMA part, the same elements of the current weights) per parameter."""
        for part, p in zip(self.parts, model.parameters()):
            n = part.hi - part.lo
            weights = p.ds_tensor[:n] if self.partitions else p.detach().reshape(-1)[part.lo:part.hi]  # type: ignore[attr-defined]
            yield self.flat[part.offset:part.offset + n], weights

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Early steps average over fewer updates so the EMA is useful before 1/(1-decay) steps.
        decay = min(self.decay, (1 + step) / (10 + step))
        with gathered_parameters(model, self.gather):
            for ema, weights in self._sources(model):
                ema.lerp_(weights.float(), 1 - decay)  # a bf16 part is upcast one parameter at a time

    def slices(self) -> Iterator[tuple[str, Piece, torch.Tensor, bool]]:
        """(parameter name, rectangle of the whole parameter, this rank's EMA of it (a view of the
        buffer), tp-replicated) for every rectangle of every part this rank keeps."""
        for part in self.parts:
            for at, piece in flat_pieces(part.within, part.lo, part.hi):
                view = self.flat[part.offset + at:part.offset + at + piece.numel].view(piece.shape)
                yield part.name, piece, view, part.replicated

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA's tensors of an unsharded EMA (train-vae: no mesh, no tp, one part), views
        of the buffer: copy them to keep them past the next update."""
        if self.place.parts != 1 or self.place.tp_size != 1 or self.partitions:
            raise RuntimeError("a sharded EMA is whole only in its files (ema.save, ShardIndex.whole)")
        return {name: view for name, _, view, _ in self.slices()}

    def save(self, directory: Path) -> None:
        """Stream this rank's parts into directory/<place.file>.safetensors (if this rank writes them)."""
        if not self.place.writes:
            return
        # a tp-replicated parameter is the same on every tp rank: tp rank 0 writes it
        kept = [s for s in self.slices() if not s[3] or self.place.tp_rank == 0]
        keys = _keys([name for name, *_ in kept])
        directory.mkdir(parents=True, exist_ok=True)
        write_shard(directory / f"{self.place.file}.safetensors", {k: s[2] for k, s in zip(keys, kept)},
                    {k: s[1] for k, s in zip(keys, kept)}, {k: s[0] for k, s in zip(keys, kept)})

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        """Read this rank's part of every parameter from the shard files in `directory`, whatever
        layout (or EMA format: whole per tp/pp slice, or sharded) wrote them; only the overlapping
        bytes of each saved slice are read."""
        with ShardIndex(directory) as index:
            missing = {p.name for p in self.parts} - set(index.names())
            if missing:
                raise KeyError(f"{directory}: the EMA lacks parameters {sorted(missing)[:5]}")
            for name, piece, view, _ in self.slices():
                index.read_into(name, view, piece)  # host slices copied in, on any device

    @torch.no_grad()
    def load_whole(self, state: dict[str, Any]) -> None:
        """Read this rank's parts from whole tensors (checkpoints that stored the EMA unsharded in
        their client state, before per-shard EMA files)."""
        missing = {p.name for p in self.parts} - set(state)
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        for name, piece, view, _ in self.slices():
            view.copy_(state[name][piece.region])

    def nbytes(self) -> int:
        """Bytes this rank's EMA holds (the one buffer)."""
        return self.flat.numel() * self.flat.element_size()


def _keys(names: list[str]) -> list[str]:
    """A file's tensor keys: a parameter's name for its first rectangle, name#k for the k-th after."""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        keys.append(name if k == 0 else f"{name}#{k}")
    return keys
