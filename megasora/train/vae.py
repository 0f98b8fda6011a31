"""Training the causal video VAE on the DiT's DeepSpeed trainer: same engine, checkpoints, metrics.

Only the objective (reconstruction + KL on pixel clips), the model and the per-step
statistics differ from the DiT; the loop, resume, preemption and checkpointing are
`megasora.train.trainer.TrainingLoop`'s. At the end the weights are exported with latent
statistics (shift/scale) as `run.dir/vae.safetensors`, which `vae.path` then points to.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megasora.config import Config, ConfigError
from megasora.data.sources import check_source
from megasora.models.vae import VideoVAE, arch_from_config, kl_divergence, save_vae
from megasora.parallel.mesh import ParallelLayout
from megasora.train import checkpoint
from megasora.train.distributed import device_for, init_distributed
from megasora.train.ema import EMA, _gathered
from megasora.train.engine import build_engine, check_optimizer
from megasora.train.loop import DataParallel, TrainingLoop, TrainResult, peak_memory_bytes
from megasora.train.trainer import layout_record, open_run, restore

log = logging.getLogger("megasora")


class VAEObjective:
    """loss = L1 + MSE(recon, x) + kl_weight * KL; the sampling noise is seeded by (seed, step, ids)."""

    def __init__(self, cfg: Config) -> None:
        self.kl_weight = cfg.vae.kl_weight
        self.seed = cfg.train.seed
        self.last: dict[str, float] = {}

    def __call__(self, model: nn.Module, batch: dict[str, Any], step: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        x = batch["pixels"].to(device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step * 7919 + int(batch["ids"][0]))
        recon, mean, logvar = model(x, generator=gen)
        diff = recon.float() - x.float()
        mse, l1 = diff.pow(2).mean(), diff.abs().mean()
        kl = kl_divergence(mean.float(), logvar.float())
        self.last = {"recon_mse": float(mse.detach()), "kl": float(kl.detach())}
        return l1 + mse + self.kl_weight * kl


def vae_flops_per_sample(model: nn.Module, pixels: torch.Tensor) -> float:
    """Forward FLOPs of one sample (counted by torch), x3 for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixels[:1])
    return 3.0 * counter.get_total_flops()


class VAETrainingLoop(TrainingLoop):
    """TrainingLoop with the VAE objective and VAE statistics (recon MSE, KL) per step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.objective = VAEObjective(self.cfg)
        self.flops_per_sample: float | None = None

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, float]:
        start = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)  # loss, recon_mse, kl
        for micro in micro_batches:
            loss = self.objective(self.engine, micro, step, self.dtype, self.device)
            self.engine.backward(loss)
            self.engine.step()
            last = self.objective.last
            sums += torch.tensor([float(loss.detach()), last["recon_mse"], last["kl"]], dtype=torch.float64)
        if self.ema is not None:
            self.ema.update(self.engine.module, step)
        sums /= len(micro_batches)
        dist.all_reduce(sums, group=self.parallel.group)
        sums /= self.parallel.size
        elapsed = time.perf_counter() - start
        if self.flops_per_sample is None:
            pixels = micro_batches[0]["pixels"].to(self.device, self.dtype)
            self.flops_per_sample = vae_flops_per_sample(self.engine.module, pixels)
        global_samples = sum(m["pixels"].shape[0] for m in micro_batches) * self.parallel.size
        grad_norm = self.engine.get_global_grad_norm()
        return {"loss": float(sums[0]), "recon_mse": float(sums[1]), "kl": float(sums[2]),
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": float(self.engine.get_lr()[0]), "samples_per_s": global_samples / elapsed,
                "flops_per_s": self.flops_per_sample * global_samples / elapsed,
                "mem_bytes": peak_memory_bytes(self.device), "step_time_s": elapsed}


@torch.no_grad()
def latent_statistics(vae: VideoVAE, clips: list, max_clips: int = 16) -> tuple[float, float]:
    """(mean, std) of the latent means over up to `max_clips` whole clips: shift and 1/scale for the DiT."""
    from megasora.data.video_io import clip_to_tensor

    means = [vae.encode(clip_to_tensor(c)[None])[0].flatten() for c in clips[:max_clips]]
    z = torch.cat(means)
    return float(z.mean()), float(z.std().clamp_min(1e-6))


def trained_state(module: nn.Module, ema: EMA | None, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights to export: the EMA when it is on (VideoVAE has no buffers), else the raw ones."""
    if ema is not None:
        return ema.state_dict()
    with _gathered(module, zero_stage):
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


def train_vae(cfg: Config, resume: str | None = None) -> TrainResult:
    """Train VideoVAE(cfg.vae) on the pixel clips of cfg.data.inputs; the start-up mirrors trainer.train."""
    if not cfg.data.inputs:
        raise ConfigError("train-vae needs data.inputs; set data.inputs to video/image files or directories")
    p = cfg.parallel
    if p.tp * p.ulysses * p.ring * p.pp != 1:
        raise ConfigError("train-vae is data parallel only; set parallel.tp/ulysses/ring/pp to 1")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, kind="clips"))
    check_source(cfg)  # before any process group: a wrong path is one line, not one traceback per rank
    check_optimizer(cfg)
    env = init_distributed()
    device = device_for(env)
    record = layout_record(cfg, ParallelLayout.from_config(cfg.parallel, env.world_size), env.world_size)
    ckpt_dir, resume_from, reshard = open_run(cfg, env.rank, record, resume)

    torch.manual_seed(cfg.train.seed)
    model = VideoVAE(arch_from_config(cfg.vae))
    parallel = DataParallel(rank=env.rank, size=env.world_size, group=None)
    engine = build_engine(cfg, model.to(device), parallel.size, load_universal=reshard)
    ema = EMA(engine.module, cfg.train.ema_decay, cfg.train.zero_stage) if cfg.train.ema_decay > 0 else None
    manager = checkpoint.CheckpointManager(ckpt_dir, record, cfg.train.keep_last, cfg.train.keep_every)
    step, samples = restore(engine, ema, resume_from, reshard)

    loop = VAETrainingLoop(cfg, engine, ema, parallel, device, env.rank == 0, manager)
    result = loop.run(step, samples)
    if not result.preempted:
        state = trained_state(engine.module, ema, cfg.train.zero_stage)  # collective under ZeRO-3: all ranks
        if env.rank == 0:
            from megasora.data.clips import decode_all_clips

            d = cfg.data
            clips = decode_all_clips(list(d.inputs), d.fps, d.clip_frames, d.max_area, multiple=8)
            export_vae(state, cfg, clips, Path(cfg.run.dir) / "vae.safetensors")
    return result
