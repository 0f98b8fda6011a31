"""Training the causal video VAE on the DiT's DeepSpeed trainer: same start-up, step, checkpoints, metrics.

Only the model, the objective (reconstruction + KL on pixel clips, with recon MSE and KL
logged per step) and the FLOP model differ from the DiT: they are handed to the shared
`TrainingLoop` (megasora/train/loop.py) after the shared start-up (megasora/train/startup.py).
At the end the weights are exported with latent statistics (shift/scale) as
`run.dir/vae.safetensors`, which `vae.path` then points to.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from megasora.config import Config, ConfigError
from megasora.data.clips import decode_all_clips
from megasora.data.sources import check_source
from megasora.data.video_io import clip_to_tensor
from megasora.launcher.env import DistEnv, discover
from megasora.models.vae import VideoVAE, arch_from_config, kl_divergence, save_vae
from megasora.parallel.mesh import validate_config_layout
from megasora.train.ema import EMA, gathered_parameters
from megasora.train.engine import check_optimizer
from megasora.train.loop import TrainingLoop, TrainResult, compute_dtype
from megasora.train.startup import DataParallel, training_run
from megasora.train.throughput import StepWork

log = logging.getLogger("megasora")


class VAEObjective:
    """loss = L1 + MSE(recon, x) + kl_weight * KL; the sampling noise is seeded by (seed, step, ids)."""

    def __init__(self, cfg: Config) -> None:
        self.kl_weight = cfg.vae.kl_weight
        self.seed = cfg.train.seed

    def __call__(self, model: nn.Module, batch: dict[str, Any], step: int, dtype: torch.dtype,
                 device: torch.device) -> dict[str, torch.Tensor]:
        x = batch["pixels"].to(device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step * 7919 + int(batch["ids"][0]))
        recon, mean, logvar = model(x, generator=gen)
        diff = recon.float() - x.float()
        mse, l1 = diff.pow(2).mean(), diff.abs().mean()
        kl = kl_divergence(mean.float(), logvar.float())
        return {"loss": l1 + mse + self.kl_weight * kl, "recon_mse": mse.detach(), "kl": kl.detach()}


def vae_flops_per_sample(model: nn.Module, pixels: torch.Tensor) -> float:
    """Forward FLOPs of one sample (counted by torch), x3 for forward + backward."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixels[:1])
    return 3.0 * counter.get_total_flops()


class VAEWork:
    """The VAE's FLOP model: torch's count of one sample's forward, taken at the first step."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.flops_per_sample: Optional[float] = None

    def __call__(self, micro_batches: list[dict[str, Any]]) -> StepWork:
        if self.flops_per_sample is None:
            pixels = micro_batches[0]["pixels"].to(self.device, self.dtype)
            self.flops_per_sample = vae_flops_per_sample(self.model, pixels)
        return StepWork(sum(m["pixels"].shape[0] for m in micro_batches), self.flops_per_sample)


@torch.no_grad()
def latent_statistics(vae: VideoVAE, clips: list, max_clips: int = 16) -> tuple[float, float]:
    """(mean, std) of the latent means over up to `max_clips` whole clips: shift and 1/scale for the DiT."""
    means = [vae.encode(clip_to_tensor(c)[None])[0].flatten() for c in clips[:max_clips]]
    z = torch.cat(means)
    return float(z.mean()), float(z.std().clamp_min(1e-6))


def trained_state(module: nn.Module, ema: EMA | None, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights to export: the EMA when it is on (VideoVAE has no buffers), else the raw ones."""
    if ema is not None:
        return ema.state_dict()
    with gathered_parameters(module, zero_stage):
        return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def export_vae(state: dict[str, torch.Tensor], cfg: Config, clips: list, path: Path) -> None:
    """Load the trained weights into a fresh fp32 VideoVAE, set shift/scale from data, save."""
    vae = VideoVAE(arch_from_config(cfg.vae))
    vae.load_state_dict(state)
    vae.eval()
    shift, std = latent_statistics(vae, clips)
    vae.arch = dataclasses.replace(vae.arch, shift_factor=shift, scaling_factor=1.0 / std)
    save_vae(vae, str(path))
    log.info("exported VAE to %s (latent shift %.4f, scale %.4f); set vae.path to it", path, shift, 1.0 / std)


def build_vae(cfg: Config, env: DistEnv) -> tuple[nn.Module, DataParallel]:
    return VideoVAE(arch_from_config(cfg.vae)), DataParallel(rank=env.rank, size=env.world_size, group=None)


def train_vae(cfg: Config, resume: str | None = None) -> TrainResult:
    """Train VideoVAE(cfg.vae) on the pixel clips of cfg.data.inputs, data parallel over every rank."""
    if not cfg.data.inputs:
        raise ConfigError("train-vae needs data.inputs; set data.inputs to video/image files or directories")
    p = cfg.parallel
    if p.tp * p.ulysses * p.ring * p.pp != 1:
        raise ConfigError("train-vae is data parallel only; set parallel.tp/ulysses/ring/pp to 1")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, kind="clips"))
    layout = validate_config_layout(cfg, discover().world_size)
    check_source(cfg)  # before any process group: a wrong path is one line, not one traceback per rank
    check_optimizer(cfg)
    with training_run(cfg, layout, resume, build_vae) as run:
        work = VAEWork(run.engine.module, run.device, compute_dtype(cfg))
        result = TrainingLoop(run, VAEObjective(cfg), work).run(run.step, run.samples)
        if result.preempted:
            return result
        state = trained_state(run.engine.module, run.ema, cfg.train.zero_stage)  # collective under ZeRO-3
    if run.is_main:
        d = cfg.data
        clips = decode_all_clips(list(d.inputs), d.fps, d.clip_frames, d.max_area, multiple=8)
        export_vae(state, cfg, clips, Path(cfg.run.dir) / "vae.safetensors")
    return result
