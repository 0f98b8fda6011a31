"""Latents -> viewable video files: what the sampler calls after denoising."""
from __future__ import annotations

from pathlib import Path

import torch

from megasora.data.video_io import tensor_to_frames, write_video
from megasora.models.vae import latents_to_pixels


@torch.no_grad()
def decode_to_files(vae, latents: torch.Tensor, out: str | Path, fps: float = 8.0,
                    suffix: str = ".mp4") -> list[Path]:
    """Decode normalized latents (B, C, T', H', W') with `vae` and write one file per sample.

    `out` is a file path for B == 1, else a directory receiving sample_000.mp4, ... A
    one-frame latent (an image) is written as .png whatever the suffix.
    """
    pixels = latents_to_pixels(vae, latents.float().to(next(vae.parameters()).device)).cpu()  # (B, 3, T, H, W)
    out = Path(out)
    if latents.shape[0] == 1 and out.suffix:
        paths = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"sample_{i:03d}{suffix}" for i in range(latents.shape[0])]
    written = []
    for video, path in zip(pixels, paths):
        frames = tensor_to_frames(video)
        path = path.with_suffix(".png") if frames.shape[0] == 1 else path
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, frames, fps)
        written.append(path)
    return written
