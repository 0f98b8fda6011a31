"""Sharded state on disk: each rank streams the slices of the parameters it holds into its own
safetensors file, and any layout reads back the parts it needs.

A shard file is an ordinary safetensors file (safetensors.safe_open reads it). Its tensors carry
the WHOLE model's parameter names; the header's metadata records, per tensor, where the slice
sits in the whole parameter (`Piece`: start offset and whole shape). A directory of shard files
is read through `ShardIndex`, which parses only the headers: `read_into(name, out, piece)` copies
the overlap of every saved slice with the wanted one, reading just those bytes (get_slice), so a
rank restoring under another tp / pp / dp layout never holds more than its own slice, and
`whole()` assembles full tensors for the one process that exports.

A slice is a rectangle of its parameter. A rank that keeps a flat range of its (tp-local)
parameter, as the sharded EMA does (train/ema.py), writes it as the few rectangles that range
covers (`flat_pieces`: at most 2 * ndim - 1), under the keys `name`, `name#1`, ...; the
metadata's "name" maps such a key to its parameter. Files whose keys are the parameter names
themselves (one rectangle per parameter, as the EMA was written before it was sharded over
dp x sp) read the same way.

`write_shard` writes tensor by tensor: the header from shapes alone, then each tensor's bytes
(a device tensor is copied to the host one at a time; a host tensor is written from its memory),
to a temporary name renamed into place, so no copy of the whole shard ever exists.
"""
from __future__ import annotations

import json
import math
import os
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open

SLICES_KEY = "megasora.slices"   # header metadata: JSON {key: {"start": [...], "whole": [...], "name"?: param}}
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
ALIGN = 8  # safetensors pads the header so tensor data starts 8-byte aligned


@dataclass(frozen=True)
class Piece:
    """Where a slice sits in a whole parameter: its start per dim, its shape and the whole shape."""
    start: tuple[int, ...]
    shape: tuple[int, ...]
    whole: tuple[int, ...]

    @classmethod
    def whole_of(cls, shape: tuple[int, ...]) -> "Piece":
        return cls((0,) * len(shape), tuple(shape), tuple(shape))

    @classmethod
    def split(cls, shape: tuple[int, ...], dim: int, rank: int, size: int) -> "Piece":
        """The rank-th of `size` equal parts along `dim` (tensor parallelism's split), of local `shape`."""
        whole = tuple(n * size if d == dim else n for d, n in enumerate(shape))
        start = tuple(rank * n if d == dim else 0 for d, n in enumerate(shape))
        return cls(start, tuple(shape), whole)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def region(self) -> tuple[slice, ...]:
        """Index of this slice into the whole parameter."""
        return tuple(slice(a, a + n) for a, n in zip(self.start, self.shape))

    def overlap(self, other: "Piece") -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """(index into self, index into other) of the region both cover, or None."""
        mine, theirs = [], []
        for a, n, b, m in zip(self.start, self.shape, other.start, other.shape):
            lo, hi = max(a, b), min(a + n, b + m)
            if lo >= hi:
                return None
            mine.append(slice(lo - a, hi - a))
            theirs.append(slice(lo - b, hi - b))
        return tuple(mine), tuple(theirs)


def flat_pieces(within: Piece, lo: int, hi: int) -> list[tuple[int, Piece]]:
    """The elements [lo, hi) of the flattened slice `within` (row-major) as rectangles of the whole
    parameter, each with its offset from lo: a partial first row, whole rows, a partial last row,
    recursively over the dims (at most 2 * ndim - 1 rectangles)."""
    if not within.shape:  # a 0-d parameter: one element
        return [(0, within)] if lo < hi else []
    rects: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []  # (offset, start, shape) in `within`

    def cover(prefix: tuple[int, ...], a: int, b: int, at: int) -> None:
        """Elements [a, b) of the sub-block within[prefix] (prefix: indices of the leading dims)."""
        if a >= b:
            return
        rest = within.shape[len(prefix):]
        ones = (1,) * len(prefix)
        if len(rest) == 1:
            rects.append((at, prefix + (a,), ones + (b - a,)))
            return
        inner = math.prod(rest[1:])
        (r0, c0), (r1, c1) = divmod(a, inner), divmod(b, inner)
        if r0 == r1:
            cover(prefix + (r0,), c0, c1, at)
            return
        if c0:
            cover(prefix + (r0,), c0, inner, at)
            at, r0 = at + inner - c0, r0 + 1
        if r1 > r0:
            rects.append((at, prefix + (r0,) + (0,) * (len(rest) - 1), ones + (r1 - r0,) + rest[1:]))
            at += (r1 - r0) * inner
        cover(prefix + (r1,), 0, c1, at)

    cover((), lo, hi, 0)
    return [(at, Piece(tuple(a + b for a, b in zip(start, within.start)), shape, within.whole))
            for at, start, shape in rects]


def _header(tensors: Mapping[str, torch.Tensor], pieces: Mapping[str, Piece] | None,
            names: Mapping[str, str] | None = None) -> bytes:
    entries: dict[str, Any] = {}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if pieces is not None:
        slices: dict[str, dict[str, Any]] = {key: {"start": list(p.start), "whole": list(p.whole)}
                                             for key, p in pieces.items()}
        for key, name in (names or {}).items():
            if name != key:
                slices[key]["name"] = name
        entries["__metadata__"] = {SLICES_KEY: json.dumps(slices)}
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-(len(header) + 8) % ALIGN)


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    """This tensor's bytes on the host (a copy only for a device or non-contiguous tensor)."""
    host = tensor.detach().to("cpu").contiguous().reshape(-1)
    return host.view(torch.uint8).numpy().data


def write_shard(path: Path, tensors: Mapping[str, torch.Tensor], pieces: Mapping[str, Piece] | None = None,
                names: Mapping[str, str] | None = None) -> None:
    """Stream `tensors` (in order, by key) into the safetensors file `path`, atomically; `pieces`
    names where each sits in its whole parameter (omit for a plain file of whole tensors), `names`
    the parameter of a key that is not the parameter's name (a second rectangle of it)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    header = _header(tensors, pieces, names)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for tensor in tensors.values():
            f.write(_host_bytes(tensor))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardIndex:
    """Every slice saved in a directory of shard files, by parameter name (headers only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pieces: dict[str, list[tuple[Path, str, Piece]]] = {}  # name -> (file, key, piece)
        self._files = ExitStack()
        self._open: dict[Path, Any] = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                slices = json.loads((f.metadata() or {}).get(SLICES_KEY, "{}"))
                for key in f.keys():
                    shape = tuple(f.get_slice(key).get_shape())
                    where = slices.get(key, {"start": [0] * len(shape), "whole": shape})
                    piece = Piece(tuple(where["start"]), shape, tuple(where["whole"]))
                    self.pieces.setdefault(where.get("name", key), []).append((path, key, piece))

    def __enter__(self) -> "ShardIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._files.close()

    def _file(self, path: Path) -> Any:
        if path not in self._open:
            self._open[path] = self._files.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def names(self) -> list[str]:
        return list(self.pieces)

    def whole_shape(self, name: str) -> tuple[int, ...]:
        return self.pieces[name][0][2].whole

    def read_into(self, name: str, out: torch.Tensor, wanted: Piece) -> None:
        """Fill `out` (shape wanted.shape) with the part `wanted` of the saved parameter `name`."""
        saved = self.pieces.get(name, [])
        if saved and saved[0][2].whole != wanted.whole:
            raise ValueError(f"{self.directory}: {name} was saved with shape {saved[0][2].whole}, "
                             f"this model's is {wanted.whole}")
        covered = 0
        for path, key, piece in saved:
            both = wanted.overlap(piece)
            if both is None:
                continue
            into, source = both
            out[into].copy_(self._file(path).get_slice(key)[source])
            covered += math.prod(s.stop - s.start for s in into)
        if covered != wanted.numel:
            raise ValueError(f"{self.directory}: the saved slices of {name} cover {covered} of the "
                             f"{wanted.numel} elements this rank holds")

    def whole(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for every saved parameter, one at a time (the export's path)."""
        for name in self.pieces:
            shape = self.whole_shape(name)
            path, key, _ = self.pieces[name][0]
            dtype = self._file(path).get_slice(key).get_dtype()
            out = torch.empty(shape, dtype=_torch_dtype(dtype))
            self.read_into(name, out, Piece.whole_of(shape))
            yield name, out


def _torch_dtype(name: str) -> torch.dtype:
    return {v: k for k, v in DTYPES.items()}[name]
