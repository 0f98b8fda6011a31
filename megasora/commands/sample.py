"""`megasora sample`: generate a clip from a trained checkpoint and write it as a GIF/MP4."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("megasora")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample", help="sample a video from a checkpoint (Euler + classifier-free guidance)",
        description=__doc__ + " Any latent size works (RoPE is relative); it must divide by the patch size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (uses run/checkpoints/latest) or a checkpoints dir")
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


def checkpoint_root(path: Path) -> Path:
    if (path / "checkpoints" / "latest").is_file():
        return path / "checkpoints"
    if (path / "latest").is_file():
        return path
    raise FileNotFoundError(f"{path}: no checkpoint found (expected {path}/checkpoints/latest)")


def load_sampling_model(run_path: Path, tag: str | None, use_ema: bool) -> tuple[torch.nn.Module, "Config"]:
    from megasora.config import config_from_dict
    from megasora.models import build_dit
    from megasora.train.checkpoint import read_model_weights
    weights, cfg_dict, used_ema = read_model_weights(checkpoint_root(run_path), tag, use_ema)
    cfg = config_from_dict(cfg_dict)
    model = build_dit(cfg)
    model.load_state_dict(weights)
    log.info("loaded %s weights from %s", "EMA" if used_ema else "raw", run_path)
    return model.eval(), cfg


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
    run_path = Path(args.run)
    model, cfg = load_sampling_model(run_path, args.tag, not args.no_ema)
    text, mask = TextEncoder(cfg.text.path or None, cfg.text.max_length).encode(args.prompt)
    shape = (len(args.prompt), cfg.model.in_channels, args.frames or cfg.data.frames,
             args.height or cfg.data.height, args.width or cfg.data.width)
    latents = sample_euler(model, shape, text, mask, cfg.diffusion, steps=args.steps, guidance=args.guidance,
                           patch=tuple(cfg.model.patch), generator=torch.Generator().manual_seed(args.seed))
    out = Path(args.out) if args.out else run_path / "samples" / "sample.gif"
    for i, video in enumerate(latents):
        path = out if len(args.prompt) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        write_video(to_frames(video, args.upscale), path)
        print(f"wrote {path}  ({args.prompt[i]!r})")
    return 0
