"""Checkpoints users can trust.

Layout on disk (run.dir/checkpoints/):
    step_00000100/            DeepSpeed's sharded files + megasora.json (the manifest)
        ema/slice_mpXX_dpYYY.safetensors   the EMA, sharded over dp x sp: one file per rank's part
                                     (train/ema.py; the format: docs/checkpoints.md)
    step_00000100.universal/  created on demand when resuming under a different layout
    latest                    tag of the newest complete checkpoint

Save is atomic: every rank writes into `.tmp.step_X/`; after all ranks finished, rank 0
writes the manifest (every file with its size), renames the directory to `step_X/` and only
then moves `latest`. A crash at any point leaves the previous checkpoint and `latest`
untouched. Load verifies the manifest first, so a truncated or missing shard is reported by
name, and `--resume auto` falls back to the newest checkpoint that verifies.

Nothing is gathered to save: each rank streams its own shards (DeepSpeed's files, its EMA
part), and the client state holds only small values. The EMA is restored part by part
under any layout from the ema/ files (also those of the EMA whole per tp/pp slice,
ema/slice_mpXX.safetensors); checkpoints written before those files existed kept the whole EMA
in their client state, which still loads.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megasora.errors import UserError
from megasora.train.ema import EMA
from megasora.train.shard_files import ShardIndex
from megasora.train.universal import convert_to_universal

log = logging.getLogger("megasora")

MANIFEST = "megasora.json"
EMA_DIR = "ema"
TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or of another model; the message names the file."""

    kind = "checkpoint"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- reading (no engine needed)


@dataclass
class CheckpointInfo:
    root: Path
    tag: str
    manifest: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def layout(self) -> dict[str, int]:
        return self.manifest["layout"]


PICK_ANOTHER = "pick a complete one from `megasora ckpt inspect RUN_DIR`"


def read_manifest(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / MANIFEST
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {tag_dir} does not exist", PICK_ANOTHER)
    if not path.is_file():
        raise CheckpointError(f"{tag_dir}: no {MANIFEST}, the checkpoint was never completed", PICK_ANOTHER)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt: {err}", PICK_ANOTHER) from err


def verify(tag_dir: Path) -> dict[str, Any]:
    """Every file the manifest lists exists with its recorded size; returns the manifest."""
    manifest = read_manifest(tag_dir)
    for rel, size in manifest["files"].items():
        f = tag_dir / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint shard missing: {f}", PICK_ANOTHER)
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint shard truncated or altered: {f} has {actual} bytes, "
                                  f"the manifest recorded {size}", PICK_ANOTHER)
    return manifest


def list_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)), reverse=True)


def find_resumable(root: Path) -> CheckpointInfo | None:
    """Newest checkpoint that verifies; each one skipped on the way gets a warning."""
    for tag in list_tags(root):
        try:
            return CheckpointInfo(root, tag, verify(root / tag))
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", tag, err)
    return None


def resolve_resume(resume: str | None, ckpt_dir: Path) -> CheckpointInfo | None:
    """'auto' -> newest complete checkpoint in ckpt_dir or None; a path -> that checkpoint (verified)."""
    if not resume:
        return None
    if resume == "auto":
        found = find_resumable(ckpt_dir)
        if found is None:
            log.info("--resume auto: no complete checkpoint in %s, starting from scratch", ckpt_dir)
        return found
    path = Path(resume)
    if (path / MANIFEST).is_file() or TAG_RE.match(path.name):
        return CheckpointInfo(path.parent, path.name, verify(path))
    if path.is_dir():
        found = find_resumable(path)
        if found is not None:
            return found
    raise CheckpointError(f"--resume {resume}: no complete checkpoint there",
                          f"pass --resume auto, a run directory's checkpoints/, or a step_XXXXXXXX directory "
                          f"holding {MANIFEST}")


def load_engine_state(engine: Any, root: Path, tag: str) -> dict[str, Any]:
    """engine.load_checkpoint, with a checkpoint of another model reported as a CheckpointError."""
    try:
        # LoRA: the checkpoint holds only the trainable adapters; the frozen base is the model's own
        strict = all(p.requires_grad for p in engine.module.parameters())
        _, client = engine.load_checkpoint(str(root), tag=tag, load_module_strict=strict)
    except RuntimeError as err:
        if "state_dict" not in str(err):  # torch's "Error(s) in loading state_dict for DiT: size mismatch"
            raise
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
        raise CheckpointError(f"{root / tag} holds a different model than the config ({first})",
                              "resume it with the config it was trained with (config.yaml beside "
                              "checkpoints/), or start a new run.dir without --resume") from err
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {root / tag}", PICK_ANOTHER)
    return client


# ---------------------------------------------------------------- writing


class CheckpointManager:
    """Atomic saves, verified loads and retention for one run's checkpoint directory."""

    def __init__(self, root: Path, layout: dict[str, int], keep_last: int = 3, keep_every: int = 0) -> None:
        self.root = root
        self.layout = layout
        self.keep_last = max(1, keep_last)
        self.keep_every = keep_every
        self.is_main = dist.get_rank() == 0

    def save(self, engine: Any, step: int, samples: int, client_state: dict[str, Any], ema: EMA | None = None) -> str:
        tag = step_tag(step)
        tmp_tag = f".tmp.{tag}"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)  # debris of an interrupted save
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)  # a LoRA run's frozen base is not saved
        if ema is not None:
            ema.save(self.root / tmp_tag / EMA_DIR)
        dist.barrier()  # every rank's shards are on disk
        if self.is_main:
            self._commit(tmp_tag, tag, step, samples)
        dist.barrier()
        return tag

    def _commit(self, tmp_tag: str, tag: str, step: int, samples: int) -> None:
        tmp_dir = self.root / tmp_tag
        files = {str(p.relative_to(tmp_dir)): p.stat().st_size for p in sorted(tmp_dir.rglob("*")) if p.is_file()}
        manifest = {"step": step, "samples": samples, "layout": self.layout, "files": files,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _atomic_write(tmp_dir / MANIFEST, json.dumps(manifest, indent=1))
        final = self.root / tag
        if final.exists():  # re-saving a step (e.g. after a resume): replace the old copy
            shutil.rmtree(final)
        tmp_dir.rename(final)
        _atomic_write(self.root / "latest", tag)
        self._apply_retention()

    def _apply_retention(self) -> None:
        complete = [t for t in list_tags(self.root) if (self.root / t / MANIFEST).is_file()]
        keep = set(complete[:self.keep_last])
        if self.keep_every:
            keep |= {t for t in complete if int(t.removeprefix("step_")) % self.keep_every == 0}  # list_tags: TAG_RE
        for tag in complete:
            if tag not in keep:
                shutil.rmtree(self.root / tag, ignore_errors=True)
                shutil.rmtree(self.root / f"{tag}.universal", ignore_errors=True)
                for view in self.root.glob(f"{tag}.universal.tp*"):  # universal.tp_rank_view's
                    shutil.rmtree(view, ignore_errors=True)


# ---------------------------------------------------------------- consolidated weights


def load_model_states(tag_dir: Path) -> dict[str, Any]:
    """The first mp rank's model-states file (module, config, EMA), as a CheckpointError if unreadable.
    ZeRO-3 names them after the partition too: zero_pp_rank_0_mp_rank_XX_model_states.pt."""
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) or sorted(tag_dir.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    if not states:
        raise CheckpointError(f"{tag_dir} holds no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint)",
                              PICK_ANOTHER)
    try:
        return torch.load(states[0], map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load raises RuntimeError, UnpicklingError, KeyError, EOFError... on garbage
        raise CheckpointError(f"{states[0]} is unreadable ({type(err).__name__}: {err})", PICK_ANOTHER) from err


def load_ema(ema: EMA, tag_dir: Path, client: dict[str, Any]) -> None:
    """Restore this rank's EMA slices from a checkpoint (any layout): its ema/ shard files, or the
    whole EMA an older checkpoint kept in its client state; one saved without an EMA leaves it."""
    if (tag_dir / EMA_DIR).is_dir():
        ema.load(tag_dir / EMA_DIR)
    elif client.get("ema") is not None:
        ema.load_whole(client["ema"])


def read_ema(tag_dir: Path) -> dict[str, torch.Tensor] | None:
    """A checkpoint's whole EMA on one process (None without one): assembled from its ema/ slices,
    or the whole EMA a checkpoint from before ema/ kept in its client state."""
    if (tag_dir / EMA_DIR).is_dir():
        with ShardIndex(tag_dir / EMA_DIR) as index:
            return dict(index.whole())
    return load_model_states(tag_dir).get("ema")


def read_model_weights(root: Path, tag: str | None = None, ema: bool = True
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """Full (consolidated over tp and ZeRO) weights of a checkpoint on one process, no engine.

    Returns (state_dict, config dict, whether the EMA weights were used).
    """
    info = CheckpointInfo(root, tag, verify(root / tag)) if tag else find_resumable(root)
    if info is None:
        raise CheckpointError(f"{root}: no complete checkpoint",
                              "point at a run directory (or its checkpoints/) that `megasora train` saved into; "
                              "`megasora ckpt inspect DIR` lists what a directory holds")
    saved = load_model_states(info.path)
    cfg = saved.get("config") or {}
    whole_ema = read_ema(info.path) if ema else None
    if whole_ema is not None:
        return whole_ema, cfg, True
    layout = info.layout
    # With pp > 1 each mp_rank file holds one stage's module: consolidate through universal instead.
    if (layout.get("tp", 1) == 1 and layout.get("pp", 1) == 1 and layout.get("zero_stage", 0) < 3
            and saved.get("module") is not None):
        return {k: v.float() for k, v in saved["module"].items()}, cfg, False
    return _weights_via_universal(info), cfg, False


def _weights_via_universal(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """TP-sharded or ZeRO-3 weights: DeepSpeed's universal conversion holds full fp32 tensors."""
    uni = info.root / f"{info.tag}.universal"
    if not uni.is_dir():
        convert_to_universal(info.path, uni)
    weights = {}
    for fp32 in (uni / "zero").glob("*/fp32.pt"):
        weights[fp32.parent.name] = torch.load(fp32, map_location="cpu", weights_only=False)["param"].float()
    return weights
