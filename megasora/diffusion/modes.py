"""Sora's prompting modes on one sampler: t2v, t2i, i2v, extend, loop, connect, edit.

Every mode is `sample_euler` with a conditioning mask (megasora/diffusion/masks.py) or an
SDEdit start, in latent space:

    t2v      pure noise                              t2i   one token frame
    i2v      first frame = the image                 edit  SDEdit: noise the clip to S, denoise
    extend   sliding windows; each holds the last (first, --backward) `context` frames clean
    loop     one window [video end | generated | video start]: played in a loop, the clip
             continues through the generated frames back into its own first frame
    connect  one window [video1 end | generated | video2 start]

Windows are `window` latent frames long (the model's training clip by default); longer
results come from more windows, each seeded by (seed, window index).

Inputs (images / videos) are decoded, resized to a size the patching allows at their own
aspect ratio, and encoded with the run's VAE (`Codec`); pixel-space runs use pixels.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from megasora.config import Config
from megasora.data.video_io import is_image, iter_video_clips, read_image
from megasora.diffusion.masks import frame_mask, latent_frame_mask
from megasora.diffusion.sampler import FrameCondition, Progress, sample_euler
from megasora.errors import UserError
from megasora.models.vae import latents_to_pixels, pixels_to_latents, vae_from_config

log = logging.getLogger("megasora")

MODES = ("t2v", "t2i", "i2v", "extend", "loop", "connect", "edit")


class InputError(UserError):
    """A sampling input (image, video, size) the user can fix."""

    kind = "input"


# ---------------------------------------------------------------- pixels <-> latents


class Codec:
    """Pixels (B, 3, T, H, W) in [-1, 1] <-> diffusion latents, through the run's VAE or as-is."""

    def __init__(self, cfg: Config) -> None:
        self.vae = None
        self.temporal, self.spatial = 1, 1
        if cfg.vae.path:
            self.vae = vae_from_config(cfg.vae).eval()
            self.temporal, self.spatial = self.vae.temporal_factor, self.vae.spatial_factor
        elif cfg.model.in_channels != 3:
            raise InputError(f"this run has no vae.path and model.in_channels={cfg.model.in_channels}, so image "
                             f"and video inputs cannot be encoded", "sample a run trained with a VAE or on pixels")

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal  # the causal VAE encodes frame 0 alone

    def latent_frames(self, pixel_frames: int) -> int:
        return 1 + (pixel_frames - 1) // self.temporal

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return pixels.float()
        return pixels_to_latents(self.vae, pixels)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        return latents_to_pixels(self.vae, latents)


def fit_latent_size(src_h: int, src_w: int, area: int, multiple: tuple[int, int]) -> tuple[int, int]:
    """(h, w) latent size with the source's aspect ratio, h*w ~= area, each a multiple of the patch."""
    scale = math.sqrt(area / (src_h * src_w))
    mh, mw = multiple
    return max(mh, round(src_h * scale / mh) * mh), max(mw, round(src_w * scale / mw) * mw)


def resize_cover(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, height, width) in [-1, 1]: scale to cover, centre-crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    scale = max(height / x.shape[2], width / x.shape[3])
    rh, rw = max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale))
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3)  # (3, T, H, W)


def _check_path(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{flag} {path} does not exist or is not a file", f"pass an existing file to {flag}")
    return p


def decode_frames(path: str, flag: str, max_frames: int, fps: float) -> np.ndarray:
    """The first `max_frames` frames (at `fps`) of a video, or an image as one frame: uint8 (T, H, W, 3)."""
    p = _check_path(path, flag)
    try:
        if is_image(p):
            return read_image(p, max_area=1 << 30, multiple=1).frames
        clip = next(iter_video_clips(p, fps, max_frames, max_area=1 << 30, multiple=1, temporal_factor=1,
                                     max_clips=1), None)
    except Exception as err:  # PyAV / Pillow raise many types for a broken file
        raise InputError(f"{flag} {path} could not be decoded ({type(err).__name__}: {err})",
                         "pass a readable video (mp4, webm, ...) or image (png, jpg, ...)") from None
    if clip is None or len(clip.frames) == 0:
        raise InputError(f"{flag} {path} holds no video frames", "pass a video with at least one frame")
    return clip.frames


@dataclass
class InputLoader:
    """Decodes and encodes the mode's inputs at one latent size (the first input fixes the aspect)."""
    codec: Codec
    patch: tuple[int, int, int]
    area: int                       # latent h*w to aim for when no size is given
    fps: float
    size: Optional[tuple[int, int]] = None  # latent (h, w), from --height/--width or the first input

    def image(self, path: str, flag: str = "--image") -> torch.Tensor:
        """(1, C, pt, h, w) latents of an image (or a video's first frame), repeated over a patch's frames."""
        frames = decode_frames(path, flag, 1, self.fps)[:1]
        latents = self._encode(frames)  # (1, C, 1, h, w)
        return latents.repeat(1, 1, self.patch[0], 1, 1)

    def video(self, path: str, flag: str, latent_frames: int) -> torch.Tensor:
        """(1, C, T, h, w) latents of the first `latent_frames` (a multiple of pt) of a video."""
        if is_image(path):
            _check_path(path, flag)
            raise InputError(f"{flag} {path} is an image, but this mode continues or edits a video",
                             "pass a video file (mp4, webm, ...), or use --mode i2v --image for an image")
        frames = decode_frames(path, flag, self.codec.pixel_frames(latent_frames), self.fps)
        usable = self.codec.latent_frames(len(frames)) // self.patch[0] * self.patch[0]
        if usable < self.patch[0]:
            raise InputError(f"{flag} {path} has {len(frames)} frames, fewer than one latent patch needs "
                             f"({self.codec.pixel_frames(self.patch[0])})", "pass a longer video")
        return self._encode(frames[:self.codec.pixel_frames(usable)])

    def _encode(self, frames: np.ndarray) -> torch.Tensor:
        if self.size is None:
            src_h, src_w = frames.shape[1] / self.codec.spatial, frames.shape[2] / self.codec.spatial
            self.size = fit_latent_size(src_h, src_w, self.area, self.patch[1:])
        h, w = self.size
        pixels = resize_cover(frames, h * self.codec.spatial, w * self.codec.spatial)
        return self.codec.encode(pixels[None])


# ---------------------------------------------------------------- the modes


@dataclass
class ModeSampler:
    """One prompt batch, one model: generate() is sample_euler with fresh noise per window."""
    model: nn.Module
    cfg: Config
    text: torch.Tensor          # (B, L, Dt)
    text_mask: torch.Tensor     # (B, L)
    steps: int = 30
    guidance: float = 4.0
    seed: int = 0
    progress: Optional[Callable[[int], Progress]] = None  # window index -> that window's step callback
    windows_done: int = 0
    null_caption: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (L, Dt), (L,): guidance negative (Wan)

    @property
    def batch(self) -> int:
        return self.text.shape[0]

    @property
    def patch(self) -> tuple[int, int, int]:
        return self.cfg.model.patch_size

    def generate(self, frames: int, height: int, width: int, condition: Optional[FrameCondition] = None,
                 init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
        shape = (self.batch, self.cfg.model.in_channels, frames, height, width)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.windows_done)
        progress = self.progress(self.windows_done) if self.progress is not None else None
        self.windows_done += 1
        latents = sample_euler(self.model, shape, self.text, self.text_mask, self.cfg.diffusion, steps=self.steps,
                               guidance=self.guidance, patch=self.patch, generator=generator, condition=condition,
                               init=init, strength=strength, progress=progress, null_caption=self.null_caption)
        return latents.cpu()  # windows are stitched with the (CPU) inputs

    def window_with(self, known: dict[str, torch.Tensor], window: int) -> torch.Tensor:
        """Sample one `window`-frame clip whose first (`head`) / last (`tail`) frames are given."""
        head, tail = known.get("head"), known.get("tail")
        ref = head if head is not None else tail
        if ref is None:
            raise ValueError("window_with needs known head or tail frames")
        _, c, _, h, w = ref.shape
        latents = torch.zeros(self.batch, c, window, h, w)
        mask = torch.zeros(window, dtype=torch.bool)
        if head is not None:
            latents[:, :, :head.shape[2]] = head
            mask |= frame_mask("head", window, head.shape[2])
        if tail is not None:
            latents[:, :, window - tail.shape[2]:] = tail
            mask |= frame_mask("tail", window, tail.shape[2])
        return self.generate(window, h, w, condition=FrameCondition(latents, mask))


def t2v(s: ModeSampler, frames: int, height: int, width: int) -> torch.Tensor:
    return s.generate(frames, height, width)


def i2v(s: ModeSampler, image: torch.Tensor, frames: int) -> torch.Tensor:
    """image (1, C, pt, h, w): the clip's first token frame."""
    mask = latent_frame_mask(frame_mask("first_frame", frames // s.patch[0]), s.patch[0])
    latents = torch.zeros(s.batch, image.shape[1], frames, *image.shape[3:])
    latents[:, :, :image.shape[2]] = image
    return s.generate(frames, image.shape[3], image.shape[4], condition=FrameCondition(latents, mask))


def extend(s: ModeSampler, video: torch.Tensor, new_frames: int, window: int, context: int,
           backward: bool = False) -> torch.Tensor:
    """Add `new_frames` latent frames after (before) the video, window by window."""
    out = video.expand(s.batch, -1, -1, -1, -1)
    added = 0
    while added < new_frames:
        ctx = min(context, out.shape[2])
        n = min(window - ctx, new_frames - added)
        # The context frames come back from the window (held exactly), so the output shows it.
        if backward:
            x = s.window_with({"tail": out[:, :, :ctx]}, ctx + n)
            out = torch.cat([x, out[:, :, ctx:]], dim=2)
        else:
            x = s.window_with({"head": out[:, :, -ctx:]}, ctx + n)
            out = torch.cat([out[:, :, :out.shape[2] - ctx], x], dim=2)
        added += n
    return out


def loop_window(s: ModeSampler, video: torch.Tensor, window: int, context: int) -> torch.Tensor:
    """[video's last `context` frames | generated | video's first `context` frames]."""
    v = video.expand(s.batch, -1, -1, -1, -1)
    return s.window_with({"head": v[:, :, -context:], "tail": v[:, :, :context]}, window)


def loop(s: ModeSampler, video: torch.Tensor, window: int, context: int) -> torch.Tensor:
    """The video followed by a transition that leads back into its first frame (play it on repeat)."""
    x = loop_window(s, video, window, context)
    v = video.expand(s.batch, -1, -1, -1, -1)
    return torch.cat([v[:, :, :v.shape[2] - context], x[:, :, :window - context]], dim=2)


def connect(s: ModeSampler, first: torch.Tensor, second: torch.Tensor, window: int, context: int) -> torch.Tensor:
    """first, a generated transition, second (both (1, C, T, h, w) at one size)."""
    a, b = first.expand(s.batch, -1, -1, -1, -1), second.expand(s.batch, -1, -1, -1, -1)
    x = s.window_with({"head": a[:, :, -context:], "tail": b[:, :, :context]}, window)
    return torch.cat([a[:, :, :a.shape[2] - context], x, b[:, :, context:]], dim=2)


def edit(s: ModeSampler, video: torch.Tensor, strength: float) -> torch.Tensor:
    """SDEdit: noise the clip to t = strength and denoise it under the new prompt."""
    _, _, frames, h, w = video.shape
    return s.generate(frames, h, w, init=video.expand(s.batch, -1, -1, -1, -1), strength=strength)


def context_frames(mode: str, window: int, pt: int) -> int:
    """Frames held clean from each input: half a window to extend, a quarter each side to loop/connect."""
    share = window // 2 if mode == "extend" else window // 4
    return max(pt, share // pt * pt)


# ---------------------------------------------------------------- progress


class StepProgress:
    """tqdm on a terminal, a log line per quarter of the steps otherwise (Slurm logs); rank 0 only."""

    def __init__(self, enabled: bool, windows: int) -> None:
        self.enabled, self.windows = enabled, windows
        self._bar: tqdm | None = None

    def __call__(self, window: int) -> Progress:
        def update(done: int, total: int) -> None:
            if not self.enabled:
                return
            if sys.stderr.isatty():
                if self._bar is None:
                    self._bar = tqdm(total=total * self.windows, desc="sample", unit="step", dynamic_ncols=True)
                self._bar.update(1)
            elif done == total or done % max(1, total // 4) == 0:
                log.info("sampling window %d/%d: step %d/%d", window + 1, self.windows, done, total)
        return update

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
