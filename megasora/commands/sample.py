"""`megasora sample`: generate a clip from a trained checkpoint and write it as a GIF/MP4."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from megasora.config import Config

log = logging.getLogger("megasora")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample", help="sample a video from a checkpoint (Euler + classifier-free guidance)",
        description=__doc__ + " Any latent size works (RoPE is relative); it must divide by the patch size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (newest complete checkpoint) or a checkpoints dir")
    source.add_argument("--weights", help="a .safetensors file from `megasora ckpt export` (config in the .json beside it)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00000050 (default: latest)")
    p.add_argument("--prompt", action="append", required=True, help="caption; repeat for several clips")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default: the training size)")
    p.add_argument("--height", type=int, default=None, help="latent height (default: the training size)")
    p.add_argument("--width", type=int, default=None, help="latent width (default: the training size)")
    p.add_argument("--steps", type=int, default=30, help="Euler steps")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", default=None, help="output .gif or .mp4 (default: RUN/samples/sample.gif)")
    p.add_argument("--upscale", type=int, default=8, help="nearest-neighbour zoom for viewing tiny clips")
    p.set_defaults(func=run)


def load_sampling_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Config, Path]:
    """The DiT and its config from a run's checkpoint or an exported safetensors file."""
    from megasora.commands.ckpt import checkpoints_root
    from megasora.config import config_from_dict
    from megasora.models import build_dit
    from megasora.train.checkpoint import read_model_weights
    if args.weights:
        from safetensors.torch import load_file
        path = Path(args.weights)
        weights, cfg_dict, source = load_file(str(path)), json.loads(path.with_suffix(".json").read_text()), path
        out_dir = path.parent
    else:
        root, tag = checkpoints_root(Path(args.run))
        weights, cfg_dict, used_ema = read_model_weights(root, args.tag or tag, not args.no_ema)
        source, out_dir = f"{root} ({'EMA' if used_ema else 'raw'} weights)", Path(args.run)
    cfg = config_from_dict(cfg_dict)
    model = build_dit(cfg)
    model.load_state_dict(weights)
    log.info("loaded %s", source)
    return model.eval(), cfg, out_dir


def to_frames(video: torch.Tensor, upscale: int) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] -> (T, H*up, W*up, 3) uint8."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames.repeat(upscale, axis=1).repeat(upscale, axis=2)


def write_video(frames: np.ndarray, path: Path, fps: int = 4) -> None:
    import imageio.v2 as imageio
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mp4":
        imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
    else:
        imageio.mimwrite(path, list(frames), duration=1000 // fps, loop=0)


def run(args: argparse.Namespace) -> int:
    from megasora.diffusion.sampler import sample_euler
    from megasora.models.text import TextEncoder
    model, cfg, out_dir = load_sampling_model(args)
    text, mask = TextEncoder(cfg.text.path or None, cfg.text.max_length).encode(args.prompt)
    shape = (len(args.prompt), cfg.model.in_channels, args.frames or cfg.data.frames,
             args.height or cfg.data.height, args.width or cfg.data.width)
    latents = sample_euler(model, shape, text, mask, cfg.diffusion, steps=args.steps, guidance=args.guidance,
                           patch=tuple(cfg.model.patch), generator=torch.Generator().manual_seed(args.seed))
    videos, upscale = decode_latents(cfg, latents, args.upscale)
    out = Path(args.out) if args.out else out_dir / "samples" / "sample.gif"
    for i, video in enumerate(videos):
        path = out if len(args.prompt) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        write_video(to_frames(video, upscale), path)
        print(f"wrote {path}  ({args.prompt[i]!r})")
    return 0


def decode_latents(cfg: Config, latents: torch.Tensor, upscale: int) -> tuple[torch.Tensor, int]:
    """Latents -> pixels in [-1, 1]: through the configured VAE, or as-is for pixel-space (synthetic) runs."""
    if not cfg.vae.path:
        return latents, upscale
    from megasora.models.vae import latents_to_pixels, vae_from_config
    return latents_to_pixels(vae_from_config(cfg.vae), latents), 1
