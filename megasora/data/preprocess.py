"""Videos/images + captions -> VAE latents + text embeddings in webdataset shards (the library of
`megasora preprocess`, megasora/commands/preprocess.py).

Work unit = a shard = `inputs_per_shard` consecutive input files (sorted), so the split
across ranks (shard i goes to rank i % world) and the resume check (shard i's index file
exists) need no coordination. Unreadable inputs are skipped, logged and counted; the
report (report.json, or report-rank{r}.json when multi-process) lists them.

Caption embeddings are stored trimmed after their last valid token (a 512-token UMT5 caption
is mostly padding) with the padded length in the sample's meta (`text_length`); reading pads
them back with zeros (data/shards.py). A model whose null caption is the empty string's
embedding (Wan) gets it stored once as null_caption.npz beside the shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megasora.config import Config
from megasora.data.captions import CaptionTable, captions_for, check_caption_file, load_captions
from megasora.data.shards import (
    NULL_CAPTION_FILE,
    Sample,
    finished_shards,
    shard_name,
    write_json_atomic,
    write_shard,
)
from megasora.data.video_io import clip_to_tensor, is_media, iter_clips
from megasora.errors import MissingPathError, UserError
from megasora.models.text import EMPTY_CAPTION, check_text_path, trim_caption
from megasora.models.vae import check_vae_path, pixels_to_latents

log = logging.getLogger("megasora.preprocess")


@dataclass
class PreprocessSpec:
    inputs: list[str]
    out: str
    captions: str | list[str] = ""  # one table, or several: a clip's captions in order (data.caption_mix)
    fps: float = 8.0
    clip_frames: int = 17
    max_area: int = 65536
    patch: int = 2  # DiT spatial patch; bucket sides are multiples of vae.spatial_factor * patch
    inputs_per_shard: int = 8
    max_clips_per_video: int = 0
    rank: int = 0
    world_size: int = 1
    encoders: dict = field(default_factory=dict)  # identity of the VAE / text encoder (see encoder_identity)
    null_caption: bool = False  # store the empty caption's embedding (models whose null caption it is: Wan)

    def settings(self) -> dict:
        """Everything that changes a shard's content; a resumed run must match it."""
        keys = ("captions", "fps", "clip_frames", "max_area", "patch", "inputs_per_shard", "max_clips_per_video")
        return {**{k: getattr(self, k) for k in keys}, "encoders": self.encoders}


def file_identity(path: str) -> str:
    """sha256 of a weights file, or of a directory's config.json plus its file names and sizes."""
    digest = hashlib.sha256()
    target = Path(path)
    if target.is_file():
        with target.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        for member in sorted(target.rglob("*")):
            if member.is_file():
                digest.update(f"{member.relative_to(target)}:{member.stat().st_size}".encode())
                if member.name == "config.json":
                    digest.update(member.read_bytes())
    return digest.hexdigest()[:16]


def encoder_identity(vae_path: str, seed: int, text_path: str, text_max_length: int) -> dict:
    vae = f"{vae_path}@{file_identity(vae_path)}" if vae_path else f"random-init(seed={seed})"
    return {"vae": vae, "text": f"{text_path}@{file_identity(text_path)}", "text_max_length": text_max_length}


@dataclass
class Report:
    inputs: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    clips: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    dataset: dict = field(default_factory=dict)  # totals over every finished shard in the output dir

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["clips_per_sec"] = self.clips / self.seconds if self.seconds > 0 else 0.0
        return d


def check_inputs_exist(paths: list[str]) -> None:
    for p in paths:
        if not Path(p).exists():
            raise MissingPathError(f"input {p!r} does not exist", "fix the path in data.inputs (or the "
                                   "positional inputs)")


def caption_files(captions: str | list[str]) -> list[str]:
    return [captions] if isinstance(captions, str) and captions else [c for c in captions if c]


def check_request(cfg: Config, inputs: list[str], captions: str | list[str], out: str) -> None:
    """Everything `megasora preprocess` reads exists: one line before the encoders load (seconds).

    The VAE first: a missing one means the inputs would be encoded with nothing useful anyway.
    """
    check_vae_path(cfg.vae.path)
    check_text_path(cfg.text.path)
    if not out or not (inputs or captions):
        raise UserError("preprocess needs an output directory and inputs", "pass --out (or set data.shards) "
                        "and input paths (or data.inputs, or a caption file)")
    check_inputs_exist(inputs)
    for table in caption_files(captions):
        check_caption_file(table)


def collect_inputs(paths: list[str], captions: CaptionTable | None = None) -> list[str]:
    """Media files from paths (files or directories, recursive) and the caption table, sorted and deduplicated."""
    check_inputs_exist(paths)
    found: set[str] = set()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found.update(str(f.resolve()) for f in path.rglob("*") if f.is_file() and is_media(f))
        else:
            found.add(str(path.resolve()))
    if captions:  # files named only in the caption table are inputs too
        found.update(captions.media())
    return sorted(found)


class Progress:
    """tqdm on a TTY; a log line every `every_s` seconds otherwise (Slurm logs stay readable)."""

    def __init__(self, total: int, desc: str, every_s: float = 30.0) -> None:
        self.total, self.desc, self.every_s = total, desc, every_s
        self.done, self.start, self.last = 0, time.time(), time.time()
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=desc, unit="input")

    def update(self, n: int, clips: int, failed: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(clips=clips, failed=failed)
        elif time.time() - self.last >= self.every_s or self.done == self.total:
            rate = clips / max(time.time() - self.start, 1e-9)
            log.info("%s: %d/%d inputs, %d clips (%.2f clips/s), %d failed", self.desc, self.done, self.total,
                     clips, rate, failed)
            self.last = time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def encode_clip(vae, frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> normalized latent mean (C, T', H', W') float32."""
    pixels = clip_to_tensor(frames)[None].to(next(vae.parameters()).device)
    return pixels_to_latents(vae, pixels)[0].float().cpu().numpy()


def process_input(path: str, index: int, tables: list[CaptionTable], spec: PreprocessSpec, vae) -> list[Sample]:
    """All clips of one input file; any decode/encode error propagates (the caller skips the input)."""
    samples = []
    multiple = vae.spatial_factor * spec.patch
    for j, clip in enumerate(iter_clips(path, spec.fps, spec.clip_frames, spec.max_area, multiple,
                                        vae.temporal_factor, spec.max_clips_per_video)):
        latents = encode_clip(vae, clip.frames)
        t, h, w = clip.frames.shape[:3]
        meta = {"source": path, "clip": j, "start_sec": round(clip.start_sec, 4), "fps": clip.fps,
                "frames": t, "height": h, "width": w, "source_height": clip.source_size[0],
                "source_width": clip.source_size[1]}
        captions = captions_for(path, tables, j)
        meta["caption"] = captions[0]
        if len(captions) > 1:
            meta["captions"] = captions
        samples.append(Sample(f"{index:08d}_{j:04d}", latents, np.empty((0, 0), np.float32),
                              np.empty((0,), bool), meta))
    if not samples:
        raise ValueError("no decodable frames")
    return samples


def process_shard(shard: int, paths: list[str], first_index: int, tables: list[CaptionTable],
                  spec: PreprocessSpec, vae, text_encoder, report: Report) -> None:
    samples: list[Sample] = []
    failed_before = len(report.failures)
    for offset, path in enumerate(paths):
        try:
            samples += process_input(path, first_index + offset, tables, spec, vae)
        except Exception as err:  # corrupt or unreadable media: skip it, keep the run going
            report.failed += 1
            report.failures.append({"path": path, "error": f"{type(err).__name__}: {err}"})
            log.warning("skipping %s: %s: %s", path, type(err).__name__, err)
    if samples:
        emb, mask = text_encoder.encode([s.meta["caption"] for s in samples])
        for s, e, m in zip(samples, emb, mask):
            s.text_emb, s.text_mask = stored_caption(e, m)
            s.meta["text_length"] = int(m.shape[0])
        for s in samples:  # further captions (few samples have them; the encoder caches repeats)
            if len(s.meta.get("captions", ())) > 1:
                extra_emb, extra_mask = text_encoder.encode(s.meta["captions"][1:])
                s.extra_text = [stored_caption(e, m) for e, m in zip(extra_emb, extra_mask)]
    # An all-failed shard still gets an (empty) index so a resumed run does not retry it forever.
    write_shard(spec.out, shard, samples, extra={"inputs": paths, "failures": report.failures[failed_before:],
                                                 "settings": spec.settings()})
    report.clips += len(samples)
    report.shards_written += 1


def stored_caption(emb, mask) -> tuple[np.ndarray, np.ndarray]:
    """One caption's (L, D) / (L,) tensors as stored: trimmed after the last valid token."""
    emb, mask = trim_caption(emb, mask)
    return emb.numpy(), mask.numpy()


def write_null_caption(out: Path, text_encoder) -> None:
    """The empty caption's embedding, stored like a sample's caption, for caption dropout (Wan)."""
    emb, mask = text_encoder.encode([EMPTY_CAPTION])
    null_emb, null_mask = stored_caption(emb[0], mask[0])
    tmp = out / f"{NULL_CAPTION_FILE}.tmp.npz"
    np.savez(tmp, text_emb=null_emb, text_mask=null_mask, text_length=np.int64(mask.shape[1]))
    tmp.replace(out / NULL_CAPTION_FILE)


def check_resumable(index_file: Path, spec: PreprocessSpec) -> None:
    """Skipping a finished shard is only right if it was made exactly as this run would make it."""
    previous = json.loads(index_file.read_text()).get("settings")
    if previous != json.loads(json.dumps(spec.settings())):
        raise RuntimeError(f"{index_file} was written with other settings ({previous}) than this run "
                           f"({spec.settings()}): a resumed run would mix them. Use a new --out, or delete "
                           f"{index_file.parent} to start over.")


def dataset_totals(out: Path) -> dict:
    """Shards, clips and failed inputs over all finished shards (all ranks, all resumed runs)."""
    totals = {"shards": 0, "clips": 0, "failed_inputs": 0}
    for index_file in finished_shards(out):
        index = json.loads(index_file.read_text())
        totals["shards"] += 1
        totals["clips"] += len(index["samples"])
        totals["failed_inputs"] += len(index.get("failures", []))
    return totals


def run_preprocess(spec: PreprocessSpec, vae, text_encoder) -> Report:
    """Process this rank's shards; returns (and writes) the report."""
    start = time.time()
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = [load_captions(c) for c in caption_files(spec.captions)]
    inputs = collect_inputs(spec.inputs, tables[0] if tables else None)
    n = spec.inputs_per_shard
    shards = [i for i in range((len(inputs) + n - 1) // n) if i % spec.world_size == spec.rank]
    report = Report(inputs=sum(len(inputs[i * n:(i + 1) * n]) for i in shards))
    progress = Progress(report.inputs, f"preprocess rank {spec.rank}/{spec.world_size}")
    if spec.null_caption and spec.rank == 0:
        write_null_caption(out, text_encoder)
    for shard in shards:
        paths = inputs[shard * n:(shard + 1) * n]
        if (out / f"{shard_name(shard)}.json").is_file():
            check_resumable(out / f"{shard_name(shard)}.json", spec)
            report.shards_skipped += 1  # finished by an earlier run
        else:
            process_shard(shard, paths, shard * n, tables, spec, vae, text_encoder, report)
        progress.update(len(paths), report.clips, report.failed)
    progress.close()
    report.seconds = time.time() - start
    report.dataset = dataset_totals(out)
    name = "report.json" if spec.world_size == 1 else f"report-rank{spec.rank}.json"
    write_json_atomic(out / name, report.as_dict())
    log.info("preprocess rank %d done: %d shards written, %d already finished, %d clips, %d inputs failed "
             "(%.1f s); report in %s", spec.rank, report.shards_written, report.shards_skipped, report.clips,
             report.failed, report.seconds, out / name)
    return report
