"""Webdataset tar shards of preprocessed samples, plus a per-shard index for random access.

A sample is four tar members sharing a key (the webdataset convention, so
`webdataset.WebDataset(url).decode()` streams them too):
    KEY.latents.npy    float32 (C, T, H, W)  normalized VAE latents
    KEY.text_emb.npy   float32 (L, D)        text encoder tokens
    KEY.text_mask.npy  bool    (L,)          valid-token mask
    KEY.json           metadata: source, clip start, fps, frames, pixel H/W, caption, latent shape
The text members may be stored trimmed after the last valid token, the meta's `text_length`
then naming the padded length L they are zero-padded back to when read (decode_sample).
A sample with several captions (data.caption_mix) adds KEY.text_emb.K.npy / KEY.text_mask.K.npy
for its captions K = 1, 2, ... (the plain members are caption 0; meta "captions" lists them all).
Next to `shard-000007.tar`, `shard-000007.json` holds the index: per sample the key,
latent shape and each member's byte (offset, size) inside the tar. The index is what the
loader plans epochs from (bucket by shape without reading the tar) and what makes a
shard "finished" for resumable preprocessing: it is written last, atomically.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import webdataset as wds

from megasora.config import Config
from megasora.errors import DataError
from megasora.models.text import uses_empty_caption

FIELDS = ("latents.npy", "text_emb.npy", "text_mask.npy", "json")
NULL_CAPTION_FILE = "null_caption.npz"  # the empty caption's embedding beside the shards (Wan's null caption)
INDEX_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class Sample:
    key: str
    latents: np.ndarray  # (C, T, H, W) float32
    text_emb: np.ndarray  # (L, D) float32
    text_mask: np.ndarray  # (L,) bool
    meta: dict
    extra_text: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # captions 1.. (emb, mask)


def caption_fields(k: int) -> tuple[str, str]:
    """Tar member names of a sample's k-th caption embedding and mask (0 = the primary caption)."""
    return ("text_emb.npy", "text_mask.npy") if k == 0 else (f"text_emb.{k}.npy", f"text_mask.{k}.npy")


def caption_count(members: dict) -> int:
    """How many captions a sample's members (an index entry's, or a tar's) hold."""
    return 1 + sum(1 for name in members if name.startswith("text_emb.") and name != "text_emb.npy")


def encode_sample(sample: Sample) -> dict[str, bytes]:
    fields = {
        "latents.npy": npy_bytes(sample.latents.astype(np.float32, copy=False)),
        "text_emb.npy": npy_bytes(sample.text_emb.astype(np.float32, copy=False)),
        "text_mask.npy": npy_bytes(sample.text_mask.astype(bool, copy=False)),
        "json": json.dumps(sample.meta, sort_keys=True).encode(),
    }
    for k, (emb, mask) in enumerate(sample.extra_text, start=1):
        emb_name, mask_name = caption_fields(k)
        fields[emb_name] = npy_bytes(emb.astype(np.float32, copy=False))
        fields[mask_name] = npy_bytes(mask.astype(bool, copy=False))
    return fields


def write_shard(directory: str | Path, index: int, samples: list[Sample], extra: dict | None = None) -> Path:
    """Write tar then index, each to a temp name renamed into place, so a crash leaves no finished shard."""
    directory = Path(directory)
    tar_path = directory / f"{shard_name(index)}.tar"
    tmp = tar_path.with_suffix(".tar.tmp")
    with wds.TarWriter(str(tmp)) as writer:
        for s in samples:
            writer.write({"__key__": s.key, **encode_sample(s)})
    os.replace(tmp, tar_path)
    entries = index_tar(tar_path)
    shapes = {s.key: list(s.latents.shape) for s in samples}
    for e in entries:
        e["shape"] = shapes[e["key"]]
    write_json_atomic(directory / f"{shard_name(index)}.json",
                      {"version": INDEX_VERSION, "tar": tar_path.name, "samples": entries, **(extra or {})})
    return tar_path


def index_tar(tar_path: str | Path) -> list[dict]:
    """Group tar members by key: [{key, members: {field: [offset, size]}}] in file order."""
    entries: dict[str, dict] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile() or "." not in member.name:
                continue
            key, field = member.name.split(".", 1)
            entries.setdefault(key, {"key": key, "members": {}})["members"][field] = [member.offset_data,
                                                                                    member.size]
    return list(entries.values())


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def finished_shards(directory: str | Path) -> list[Path]:
    """Index files of complete shards, sorted (the sorted order defines global sample ids)."""
    return sorted(p for p in Path(directory).glob("shard-*.json") if (p.with_suffix(".tar")).is_file())


def read_member(handle, span: list[int]) -> bytes:
    offset, size = span
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"member truncated: wanted {size} bytes at {offset}, got {len(data)}")
    return data


def read_latent_frames(handle: BinaryIO, span: list[int], frames: tuple[int, int]) -> np.ndarray:
    """Latent frames [f0, f1) of a (C, T, H, W) float32 latents.npy member, read by range.

    A sequence rank needs only its span's frames: it reads C runs of (f1 - f0) frames after the
    npy header, never the whole clip. Raises ValueError on a malformed member (the loader counts
    and skips)."""
    offset, size = span
    handle.seek(offset)
    try:
        version = np.lib.format.read_magic(handle)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = header(handle)
    except Exception as err:  # numpy raises several types on garbage bytes
        raise ValueError(f"undecodable latents header ({type(err).__name__}: {err})") from err
    data_start = handle.tell()
    if dtype != np.float32 or fortran or len(shape) != 4:
        raise ValueError(f"latents are {dtype} {'fortran ' if fortran else ''}{shape}, not C-order float32 (C, T, H, W)")
    c, t, h, w = shape
    f0, f1 = frames
    if not 0 <= f0 <= f1 <= t or data_start - offset + 4 * c * t * h * w > size:
        raise ValueError(f"latents member of {size} bytes with shape {shape} cannot hold frames [{f0}, {f1})")
    frame_bytes = 4 * h * w
    out = np.empty((c, f1 - f0, h, w), np.float32)
    for channel in range(c):
        handle.seek(data_start + (channel * t + f0) * frame_bytes)
        run = handle.read((f1 - f0) * frame_bytes)
        if len(run) != (f1 - f0) * frame_bytes:
            raise ValueError(f"latents truncated: channel {channel} frames [{f0}, {f1}) short by "
                             f"{(f1 - f0) * frame_bytes - len(run)} bytes")
        out[channel] = np.frombuffer(run, np.float32).reshape(f1 - f0, h, w)
    return out


def decode_sample(key: str, raw: dict[str, bytes], shape: list[int] | None = None,
                  latents: np.ndarray | None = None) -> Sample:
    """Parse the four members (`latents` given: already read, e.g. by read_latent_frames);
    raises ValueError on anything malformed (the loader counts and skips)."""
    try:
        latents = npy_load(raw["latents.npy"]) if latents is None else latents
        emb = npy_load(raw["text_emb.npy"])
        mask = npy_load(raw["text_mask.npy"])
        meta = json.loads(raw["json"])
    except Exception as err:  # np.load raises several types on garbage bytes
        raise ValueError(f"sample {key}: undecodable member ({type(err).__name__}: {err})") from err
    if emb.ndim == 2 and mask.shape == emb.shape[:1] and emb.shape[0] < meta.get("text_length", 0):
        emb, mask = pad_rows(emb, mask, meta["text_length"])
    if shape is not None and list(latents.shape) != list(shape):
        raise ValueError(f"sample {key}: latents shape {list(latents.shape)} != indexed {shape}")
    if latents.dtype != np.float32 or emb.ndim != 2 or mask.shape != emb.shape[:1]:
        raise ValueError(f"sample {key}: bad dtypes/shapes latents {latents.dtype} emb {emb.shape} mask {mask.shape}")
    return Sample(key, latents, emb, mask.astype(bool), meta)


def pad_rows(emb: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A trimmed caption (l, D) / (l,) zero-padded back to `length` rows."""
    extra = length - emb.shape[0]
    return (np.concatenate([emb, np.zeros((extra, emb.shape[1]), emb.dtype)]),
            np.concatenate([mask, np.zeros(extra, bool)]))


def read_null_caption(directory: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The empty caption's (L, D) embedding and (L,) mask `megasora preprocess` stored, or None."""
    path = Path(directory) / NULL_CAPTION_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return pad_rows(data["text_emb"], data["text_mask"].astype(bool), int(data["text_length"]))


def dataset_null_caption(cfg: Config) -> tuple[np.ndarray, np.ndarray] | None:
    """The null caption a run's caption dropout substitutes, when its model's is the empty string's
    embedding (Wan) and it trains on shards; None = the model's own dropped-caption input."""
    if not uses_empty_caption(cfg) or cfg.data.kind != "shards":
        return None
    null = read_null_caption(cfg.data.shards)
    if null is None and cfg.diffusion.caption_dropout > 0:
        raise DataError(f"{cfg.data.shards} has no {NULL_CAPTION_FILE} (the empty caption's embedding, model.family="
                        f"{cfg.model.family}'s null caption for diffusion.caption_dropout)",
                        "re-run `megasora preprocess` with this config (it writes the file), or set "
                        "diffusion.caption_dropout=0")
    return null
