"""Samples during training (train.sample_every): the fixed train.sample_prompts, sampled with the
EMA weights into run/samples/step_N.mp4 and TensorBoard (`samples`, an animated image).

The trainer hands over the whole model's EMA, assembled on global rank 0 from the parts every
rank writes as a checkpoint does (the EMA is sharded over dp x sp and tp / pp: train/ema.py; no
collective, and no other rank ever holds it whole), and rank 0 samples it on a plain
single-device DiT, so any parallel layout previews alike.
The noise seed is fixed, so successive previews show the same clips getting better.
"""
from __future__ import annotations

import io
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megasora.config import Config
from megasora.data.video_io import write_video
from megasora.diffusion.modes import Codec
from megasora.diffusion.sampler import sample_euler
from megasora.models import build_dit
from megasora.models.prompt_extension import PromptExtender
from megasora.models.text import TextEncoder, guidance_negative

log = logging.getLogger("megasora")


@lru_cache(maxsize=2)
def _text_encoder(path: str, max_length: int, kind: str = "auto"):
    return TextEncoder(path or None, max_length, kind=kind)


@lru_cache(maxsize=1)
def _extender(path: str, device: str) -> PromptExtender:
    return PromptExtender(path, device, key="train.sample_extend_prompt")


@torch.no_grad()
def sample_previews(cfg: Config, weights: dict[str, torch.Tensor], device: torch.device) -> np.ndarray:
    """uint8 (T, H, B*W, 3): the prompts' clips side by side, at the training clip size."""
    model = build_dit(cfg)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.to(device).eval()
    prompts = list(cfg.train.sample_prompts)
    if cfg.train.sample_extend_prompt:  # detailed captions, as `sample --extend-prompt` writes them
        prompts = _extender(cfg.train.sample_extend_prompt, str(device)).extend(prompts)
    encoder = _text_encoder(cfg.text.path, cfg.text.max_length, cfg.text.kind)
    text, mask = encoder.encode(prompts)
    shape = (len(prompts), cfg.model.in_channels, cfg.data.frames, cfg.data.height, cfg.data.width)
    latents = sample_euler(model, shape, text, mask, cfg.diffusion, steps=cfg.train.sample_steps,
                           patch=cfg.model.patch_size, generator=torch.Generator().manual_seed(cfg.train.seed),
                           null_caption=guidance_negative(encoder, cfg))
    pixels = Codec(cfg).decode(latents.cpu()) if cfg.vae.path or cfg.model.in_channels == 3 else latents[:, :3]
    frames = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, T, H, W)
    return torch.cat(list(frames), dim=-1).permute(1, 2, 3, 0).numpy()  # (T, H, B*W, 3)


def preview_device(cfg: Config, device: torch.device) -> torch.device:
    """Where rank 0 samples: its device, but the host under ZeRO-3, which partitions a model too
    large for one GPU (a whole model must never land on one there)."""
    return torch.device("cpu") if cfg.train.zero_stage == 3 else device


def write_previews(cfg: Config, weights: dict[str, torch.Tensor], step: int, device: torch.device,
                   writer=None) -> Path:
    """Sample and write run/samples/step_N.mp4 (+ TensorBoard through `writer`); returns the mp4 path."""
    frames = sample_previews(cfg, weights, preview_device(cfg, device))
    zoom = max(1, 64 // frames.shape[1])  # tiny pixel-space clips are unwatchable at 16 px
    frames = frames.repeat(zoom, axis=1).repeat(zoom, axis=2)
    path = Path(cfg.run.dir) / "samples" / f"step_{step}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, cfg.data.fps)
    if writer is not None:
        add_video(writer, "samples", frames, step, cfg.data.fps)
    log.info("step %d: wrote samples of %d prompts to %s", step, len(cfg.train.sample_prompts), path)
    return path


def add_video(writer, tag: str, frames: np.ndarray, step: int, fps: float) -> None:
    """SummaryWriter.add_video, with a Pillow GIF encoder when moviepy (its encoder) is missing."""
    try:
        import moviepy  # noqa: F401  # lazy: optional, only asked whether TensorBoard can encode video
    except ImportError:
        from tensorboard.compat.proto.summary_pb2 import Summary  # lazy: TensorBoard takes ~1 s to import
        buffer = io.BytesIO()
        images = [Image.fromarray(f) for f in frames]
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(1000 / max(fps, 1)), loop=0)
        t, h, w, c = frames.shape
        image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buffer.getvalue())
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        writer.flush()
        return
    writer.add_video(tag, torch.from_numpy(frames).permute(0, 3, 1, 2)[None], step, fps=int(fps))  # (1, T, C, H, W)
    writer.flush()


@lru_cache(maxsize=4)
def preview_writer(run_dir: Path):
    """A TensorBoard writer for the previews beside the metrics' one (its own event file)."""
    from torch.utils.tensorboard import SummaryWriter  # lazy: ~1.4 s to import; only rank 0 writes
    return SummaryWriter(str(run_dir / "tensorboard"), filename_suffix=".samples")
