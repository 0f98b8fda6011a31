"""Does a clip show what its synthetic caption says? Colour of the foreground and direction of motion.

The synthetic shapes (megasora/data/synthetic.py) are one coloured shape on a dark
background, moving `speed` pixels per frame on a wrap-around grid. A clip is scored by
 - colour: the mean RGB of its foreground pixels, matched to the nearest named colour;
 - direction: the displacement between consecutive frames, found by phase correlation of
   their foreground maps (the circular grid makes the FFT's periodicity exact), averaged
   over frame pairs and matched to the nearest of the four directions. A clip whose mean
   displacement is under `min_speed` pixels per frame counts as static, which matches no
   direction.
A clip matches its prompt when both colour and direction agree with the caption.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megasora.data.synthetic import COLORS, DIRECTIONS, SHAPES
from megasora.diffusion.sampler import sample_euler
from megasora.models.text import TextEncoder

BACKGROUND = -0.9  # the renderer's background value in every channel


@dataclass(frozen=True)
class Prompt:
    color: str
    shape: str
    direction: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"


@dataclass(frozen=True)
class ClipScore:
    color: str | None             # nearest named colour of the foreground (None: no foreground)
    direction: str | None         # nearest direction of the mean motion (None: static)
    displacement: tuple[float, float]  # mean (dy, dx) pixels per frame
    color_ok: bool
    direction_ok: bool

    @property
    def match(self) -> bool:
        return self.color_ok and self.direction_ok


def parse_caption(caption: str) -> Prompt:
    """'a red circle moving left' -> Prompt('red', 'circle', 'left'); ValueError for other text."""
    words = caption.split()
    if (len(words) != 5 or words[0] != "a" or words[3] != "moving" or words[1] not in COLORS
            or words[2] not in SHAPES or words[4] not in DIRECTIONS):
        raise ValueError(f"{caption!r} is not a synthetic caption 'a <colour> <shape> moving <direction>'")
    return Prompt(words[1], words[2], words[4])


def foreground(video: np.ndarray, threshold: float = 0.6) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W) soft foreground weight: how far a pixel is above the background."""
    lift = (video - BACKGROUND).max(axis=0)  # (T, H, W); every named colour lifts some channel by >= 1.9
    return np.clip(lift / threshold - 1.0, 0.0, 1.0) * (lift > threshold)


def nearest_color(video: np.ndarray, weight: np.ndarray) -> str | None:
    if weight.sum() < 1.0:  # less than one pixel's worth of foreground in the whole clip
        return None
    rgb = (video * weight[None]).reshape(3, -1).sum(axis=1) / weight.sum()
    names = list(COLORS)
    dists = [np.linalg.norm(rgb - np.asarray(COLORS[n])) for n in names]
    return names[int(np.argmin(dists))]


def phase_shift(a: np.ndarray, b: np.ndarray, eps: float = 1e-3) -> tuple[int, int]:
    """Integer circular shift (dy, dx) that best maps image a onto image b (phase correlation)."""
    cross = np.fft.fft2(b) * np.conj(np.fft.fft2(a))
    cross /= np.abs(cross) + eps * np.abs(cross).max() + 1e-12  # whiten, but keep near-empty bins quiet
    corr = np.fft.ifft2(cross).real
    dy, dx = np.unravel_index(int(np.argmax(corr)), corr.shape)
    h, w = corr.shape
    return _wrapped(int(dy), h), _wrapped(int(dx), w)


def _wrapped(shift: int, size: int) -> int:
    """A circular shift in [-size/2, size/2]."""
    return shift - size if shift > size // 2 else shift


def mean_displacement(weight: np.ndarray) -> tuple[float, float]:
    """(T, H, W) foreground maps -> mean per-frame (dy, dx) over consecutive frame pairs."""
    shifts = [phase_shift(weight[f] - weight[f].mean(), weight[f + 1] - weight[f + 1].mean())
              for f in range(weight.shape[0] - 1) if weight[f].sum() > 0 and weight[f + 1].sum() > 0]
    if not shifts:
        return 0.0, 0.0
    dy, dx = np.mean(np.asarray(shifts, dtype=np.float64), axis=0)
    return float(dy), float(dx)


def nearest_direction(displacement: tuple[float, float], min_speed: float) -> str | None:
    """The direction whose unit vector has the largest projection, if that projection is >= min_speed."""
    d = np.asarray(displacement)
    names = list(DIRECTIONS)
    projections = [float(d @ np.asarray(DIRECTIONS[n], dtype=np.float64)) for n in names]
    best = int(np.argmax(projections))
    return names[best] if projections[best] >= min_speed else None


def score_clip(video: np.ndarray, caption: str, min_speed: float = 0.5) -> ClipScore:
    """video (3, T, H, W) in [-1, 1] (pixel space) against its synthetic caption."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected an RGB clip (3, T, H, W), got shape {tuple(video.shape)}")
    prompt = parse_caption(caption)
    video = np.asarray(video, dtype=np.float64)
    weight = foreground(video)
    color = nearest_color(video, weight)
    displacement = mean_displacement(weight)
    direction = nearest_direction(displacement, min_speed)
    return ClipScore(color, direction, displacement, color == prompt.color, direction == prompt.direction)


def prompt_grid(count: int, seed: int = 0) -> list[str]:
    """`count` captions covering colours x directions evenly (shapes cycle), in a seeded order."""
    rng = np.random.default_rng(seed)
    colors, shapes, directions = list(COLORS), list(SHAPES), list(DIRECTIONS)
    combos = [(c, d) for c in colors for d in directions]
    order = rng.permutation(len(combos))
    captions = []
    for i in range(count):
        c, d = combos[order[i % len(combos)]]
        captions.append(Prompt(c, shapes[i % len(shapes)], d).caption)
    return captions


@dataclass(frozen=True)
class GridScore:
    scores: list[ClipScore]
    captions: list[str]

    def rate(self, what: str = "match") -> float:
        return float(np.mean([getattr(s, what) for s in self.scores])) if self.scores else 0.0

    def summary(self) -> str:
        return (f"{len(self.scores)} prompts: colour {self.rate('color_ok'):.0%}, "
                f"direction {self.rate('direction_ok'):.0%}, both {self.rate('match'):.0%}")


def score_clips(videos: np.ndarray, captions: list[str], min_speed: float = 0.5) -> GridScore:
    """videos (B, 3, T, H, W) scored against their captions."""
    return GridScore([score_clip(v, c, min_speed) for v, c in zip(videos, captions)], list(captions))


def sample_prompts(model, cfg, captions: list[str], seed: int = 0, steps: int = 30,
                   guidance: float = 4.0, batch: int = 8) -> np.ndarray:
    """One text-to-video sample per caption from a pixel-space synthetic model: (B, 3, T, H, W) in [-1, 1]."""
    if cfg.vae.path:
        raise ValueError("prompt scoring needs a pixel-space synthetic run (vae.path empty), "
                         f"this run decodes through {cfg.vae.path}")
    encoder = TextEncoder(cfg.text.path or None, cfg.text.max_length)
    d, videos = cfg.data, []
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        text, mask = encoder.encode(chunk)
        shape = (len(chunk), cfg.model.in_channels, d.frames, d.height, d.width)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        latents = sample_euler(model, shape, text, mask, cfg.diffusion, steps=steps, guidance=guidance,
                               patch=cfg.model.patch_size, generator=generator)
        videos.append(latents.clamp(-1, 1).numpy())
    return np.concatenate(videos)


def sample_and_score(model, cfg, captions: list[str], seed: int = 0, steps: int = 30,
                     guidance: float = 4.0, batch: int = 8) -> GridScore:
    """Sample one clip per caption (sample_prompts) and score it against its caption."""
    return score_clips(sample_prompts(model, cfg, captions, seed, steps, guidance, batch), captions)
