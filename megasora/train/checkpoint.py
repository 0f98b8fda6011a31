"""Checkpoints through DeepSpeed's engine (sharded model/optimizer states) plus our client state."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("megasora")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any]) -> str:
    tag = step_tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    return tag


def resolve_resume(resume: str | None, ckpt_dir: Path) -> tuple[Path, str | None] | None:
    """'auto' -> the latest checkpoint in ckpt_dir (or None to start fresh); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            log.info("--resume auto: no checkpoint in %s, starting from scratch", ckpt_dir)
            return None
        return ckpt_dir, latest.read_text().strip()
    path = Path(resume)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if path.is_dir() and path.parent.is_dir():
        return path.parent, path.name
    raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (expected a dir holding `latest` "
                            f"or a step_XXXXXXXX tag directory)")


def load(engine: Any, root: Path, tag: str | None) -> dict[str, Any]:
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {root}/{tag}")
    log.info("resumed from %s", path)
    return client_state


def read_model_weights(root: Path, tag: str | None = None, ema: bool = True
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """Full (consolidated) weights of a checkpoint on one process, without an engine.

    Returns (state_dict, config dict, whether the EMA weights were used).
    """
    tag = tag or (root / "latest").read_text().strip()
    states = root / tag / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise FileNotFoundError(f"{states} is missing: not a complete MegaSora checkpoint")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    cfg = saved.get("config") or {}
    if ema and saved.get("ema") is not None:
        return saved["ema"], cfg, True
    if saved.get("module") is not None and cfg.get("train", {}).get("zero_stage", 0) < 3:
        return {k: v.float() for k, v in saved["module"].items()}, cfg, False
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag), cfg, False
