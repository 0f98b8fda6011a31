"""`megasora train-vae`: train the causal 3-D video VAE (reconstruction + KL) with DeepSpeed."""
from __future__ import annotations

import argparse

from megasora.commands.train import add_training_arguments
from megasora.config import load_config
from megasora.train.preemption import process_flag
from megasora.train.vae import train_vae

EPILOG = """examples:
  megasora train-vae --config configs/quickstart.yaml --set run.dir=runs/vae
  torchrun --standalone --nproc_per_node 2 -m megasora train-vae --config configs/quickstart.yaml

Data: every full clip (data.clip_frames frames at data.fps, resized within data.max_area) of
data.inputs, decoded once into memory; each training sample is a vae.train_crop square crop.
Architecture: vae.latent_channels, vae.base_channels, vae.channel_mult, vae.num_res_blocks.
Loss: L1 + MSE reconstruction + vae.kl_weight * KL. Optimizer, schedule, ZeRO, checkpoints
(--resume), metrics and preemption are those of `megasora train`.
Output: run.dir/vae.safetensors with latent shift/scale measured on the data; point
vae.path at it for `megasora preprocess` and for decoding samples."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-vae", help="train the causal video VAE on real clips (reconstruction + KL)",
                              description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p, "configs/quickstart-vae.yaml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    process_flag().install()  # before DeepSpeed starts (seconds): an early SIGUSR1/SIGTERM still saves
    cfg = load_config(args.config, args.overrides)
    return train_vae(cfg, resume=args.resume).exit_code
