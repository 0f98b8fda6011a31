"""Synthetic moving-shape videos with captions that describe them, deterministic by seed.

Each clip is one coloured shape (square, circle, triangle) sliding in one direction on a
dark background, in [-1, 1] RGB. Used before real data exists and as a test fixture: it is
tiny, needs no files, and a model can visibly learn it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from megasora.models.text import TextEncoder, default_text_encoder_path

COLORS = {"red": (1.0, -0.8, -0.8), "green": (-0.8, 1.0, -0.8), "blue": (-0.8, -0.8, 1.0),
          "yellow": (1.0, 1.0, -0.8), "white": (1.0, 1.0, 1.0), "cyan": (-0.8, 1.0, 1.0)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def clip_attributes(seed: int, sample_id: int) -> tuple[str, str, str, int, int]:
    """(color, shape, direction, start_y, start_x) of a sample, a pure function of (seed, id)."""
    rng = np.random.default_rng([seed, sample_id])
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    return color, shape, direction, int(rng.integers(0, 1 << 16)), int(rng.integers(0, 1 << 16))


def caption_for(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def _shape_mask(shape: str, h: int, w: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if shape == "square":
        return (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= radius ** 2
    return (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 2)  # triangle, apex up


def render_clip(seed: int, sample_id: int, frames: int, height: int, width: int,
                only: list[int] | None = None) -> tuple[np.ndarray, str]:
    """Returns (video (3, T, H, W) float32 in [-1, 1], caption); `only`: just these frames of it."""
    color, shape, direction, sy, sx = clip_attributes(seed, sample_id)
    video = render_attributes(color, shape, direction, sy, sx, frames, height, width, only)
    return video, caption_for(color, shape, direction)


def render_attributes(color: str, shape: str, direction: str, sy: int, sx: int,
                      frames: int, height: int, width: int, only: list[int] | None = None) -> np.ndarray:
    """The (3, T, H, W) clip of given attributes; start (sy, sx) is taken modulo the grid. `only`: the
    (3, len(only), H, W) frames of it with these numbers (each frame depends on its number alone)."""
    numbers = list(range(frames)) if only is None else only
    radius = max(1.0, min(height, width) / 6)
    dy, dx = DIRECTIONS[direction]
    speed = max(1.0, min(height, width) / 8)
    video = np.full((3, len(numbers), height, width), -0.9, dtype=np.float32)
    for row, f in enumerate(numbers):
        cy = (sy % height + dy * speed * f) % height
        cx = (sx % width + dx * speed * f) % width
        mask = _shape_mask(shape, height, width, cy, cx, radius)
        for ch, value in enumerate(COLORS[color]):
            video[ch, row][mask] = value
    return video


def all_captions() -> list[str]:
    return [caption_for(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


class CaptionEmbeddings:
    """Text-encoder outputs for the finite synthetic caption set, cached on disk once per encoder."""

    def __init__(self, encoder_path: str, max_length: int, cache_dir: str | None = None) -> None:
        self.encoder_path = encoder_path or default_text_encoder_path()
        key = hashlib.sha1(f"{self.encoder_path}|{max_length}|{'|'.join(all_captions())}".encode()).hexdigest()[:16]
        root = Path(cache_dir or os.environ.get("MEGASORA_CACHE") or Path.home() / ".cache" / "megasora")
        path = root / f"synthetic_captions_{key}.pt"
        if not path.exists():
            self._encode_and_store(path, max_length)
        table = torch.load(path, weights_only=True)
        self.index = {c: i for i, c in enumerate(all_captions())}
        self.emb, self.mask = table["emb"], table["mask"]  # (K, L, Dt), (K, L)

    def _encode_and_store(self, path: Path, max_length: int) -> None:
        emb, mask = TextEncoder(self.encoder_path, max_length).encode(all_captions())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"emb": emb, "mask": mask}, tmp)
        os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written cache

    def lookup(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([self.index[c] for c in captions])
        return self.emb[idx], self.mask[idx]
