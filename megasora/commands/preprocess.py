"""`megasora preprocess`: encode videos/images + captions into webdataset shards (megasora/data/preprocess.py)."""
from __future__ import annotations

import argparse
import json
import logging
import math

import torch

from megasora.config import load_config
from megasora.data.preprocess import PreprocessSpec, check_request, encoder_identity, run_preprocess
from megasora.launcher.env import rank_and_world
from megasora.models.text import text_encoder_from_config, uses_empty_caption
from megasora.models.vae import vae_from_config

log = logging.getLogger("megasora.preprocess")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="encode videos/images + captions into webdataset shards (VAE latents, text embeddings)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Read videos (mp4/webm/mov/mkv/avi via PyAV) and images, cut clips of data.clip_frames frames at\n"
            "data.fps, resize each source to the nearest bucket within data.max_area keeping its aspect\n"
            "ratio, encode latents with the VAE (vae.path) and captions with the text encoder (text.path),\n"
            "and write shard-NNNNNN.tar + shard-NNNNNN.json into --out.\n\n"
            "Resumable: shards whose index json exists are skipped. Multi-process: launch N copies with\n"
            "RANK/WORLD_SIZE (torchrun), OMPI_COMM_WORLD_* (mpirun) or SLURM_PROCID/SLURM_NTASKS (srun);\n"
            "shard i is written by rank i mod N. Unreadable inputs are skipped and listed in report.json.\n\n"
            "example:\n"
            "  megasora preprocess --config configs/quickstart.yaml --out data/shards clips/ \\\n"
            "      --captions captions.jsonl --set vae.path=runs/vae/vae.safetensors"),
    )
    p.add_argument("inputs", nargs="*", help="video/image files or directories (default: data.inputs)")
    p.add_argument("--config", default=None, help="YAML preset supplying the data/vae/text/model sections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable, e.g. --set data.fps=12")
    p.add_argument("--out", default=None, help="output shard directory (default: data.shards)")
    p.add_argument("--captions", action="append", default=None, metavar="FILE",
                   help="JSONL/CSV of path (and optionally clip) -> caption (default: data.captions); repeat it "
                        "to give each clip several captions (data.caption_mix draws among them in this order)")
    p.add_argument("--inputs-per-shard", type=int, default=8, help="input files per shard (default 8)")
    p.add_argument("--max-clips-per-video", type=int, default=0, help="0 = cut every full clip")
    p.add_argument("--device", default="cpu", help="device for the VAE and text encoder (cpu, cuda)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.data.shards
    inputs = args.inputs or cfg.data.inputs
    check_request(cfg, list(inputs), args.captions or cfg.data.captions, out)  # before the encoders load
    if not cfg.vae.path:
        log.warning("vae.path is empty: encoding with a randomly initialised VideoVAE (fine for tests only)")
    rank, world = rank_and_world()
    torch.manual_seed(cfg.train.seed)
    vae = vae_from_config(cfg.vae).to(args.device)
    text = text_encoder_from_config(cfg.text, args.device)
    encoders = encoder_identity(cfg.vae.path, cfg.train.seed, text.path, cfg.text.max_length)
    spec = PreprocessSpec(inputs=list(inputs), out=out, captions=args.captions or cfg.data.captions,
                          fps=cfg.data.fps, clip_frames=cfg.data.clip_frames, max_area=cfg.data.max_area,
                          patch=math.lcm(*cfg.model.patch[1:]), inputs_per_shard=args.inputs_per_shard,
                          max_clips_per_video=args.max_clips_per_video, rank=rank, world_size=world,
                          encoders=encoders, null_caption=uses_empty_caption(cfg))
    report = run_preprocess(spec, vae, text)
    print(json.dumps({k: v for k, v in report.as_dict().items() if k != "failures"}))
    return 0
