"""`megasora eval-prompts`: sample a grid of synthetic-shape prompts from a run and score them.

Each prompt "a <colour> <shape> moving <direction>" is sampled (text-to-video, EMA weights)
and scored by megasora/eval/prompt_score.py: the foreground's colour and the per-frame
displacement (phase correlation) must both match the caption. With --probe it also prints
the denoising loss on real, time-reversed, static and opposite-caption clips
(megasora/eval/motion_probe.py). Only pixel-space synthetic runs (data.kind=synthetic) qualify.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from megasora.commands.sample import contact_sheet, load_sampling_model, zoom_frames
from megasora.data.video_io import tensor_to_frames, write_video
from megasora.errors import UserError
from megasora.eval.motion_probe import probe_losses
from megasora.eval.prompt_score import prompt_grid, sample_prompts, score_clips

EPILOG = """examples:
  megasora eval-prompts --run runs/tiny-prompt
  megasora eval-prompts --run runs/tiny-prompt --prompts 48 --probe --min-match 0.9 --json scores.json
  megasora eval-prompts --run runs/tiny-prompt --sheet prompts.png   # look at the samples"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval-prompts", help="score how well a synthetic-shapes run follows its prompts",
                              description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (newest complete checkpoint) or a checkpoints dir")
    source.add_argument("--weights", help="a .safetensors file from `megasora ckpt export`")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--no-ema", action="store_true", help="score the raw weights instead of the EMA")
    p.add_argument("--prompts", type=int, default=24, help="prompts in the grid (colours x directions, shapes cycle)")
    p.add_argument("--steps", type=int, default=30, help="Euler steps per sample")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt order and the sampling noise")
    p.add_argument("--probe", action="store_true", help="also print the real/reversed/static/opposite loss probe")
    p.add_argument("--min-match", type=float, default=None,
                   help="exit 1 unless this fraction of prompts matches colour and direction")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.add_argument("--sheet", default=None,
                   help="also write a PNG contact sheet of the samples: a row per prompt, its frames left to right")
    p.add_argument("--upscale", type=int, default=4, help="pixel zoom of the contact sheet")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.prompts < 1 or args.steps < 1 or args.upscale < 1:
        raise UserError(f"--prompts {args.prompts} / --steps {args.steps} / --upscale {args.upscale} must be >= 1",
                        "pass positive counts")
    if args.min_match is not None and not 0 <= args.min_match <= 1:
        raise UserError(f"--min-match {args.min_match} is not a fraction", "pass a value in [0, 1]")
    for flag, out in (("--json", args.json), ("--sheet", args.sheet)):  # written after minutes of sampling
        if out and not Path(out).resolve().parent.is_dir():
            raise UserError(f"cannot write {flag} {out}: its directory does not exist", "create it, or pass a path "
                            "in an existing directory")


def _check_run(cfg) -> None:
    if cfg.data.kind != "synthetic" or cfg.vae.path:
        raise UserError(f"this run trains on data.kind={cfg.data.kind!r} (vae.path={cfg.vae.path!r}); the prompt "
                        "score reads synthetic-shape clips in pixel space", "pass a run of data.kind=synthetic")


def write_sheet(path: str, videos, upscale: int) -> None:
    """(B, 3, T, H, W) clips in [-1, 1] -> a PNG with one row of frames per clip."""
    clips = [zoom_frames(tensor_to_frames(torch.from_numpy(v)), upscale) for v in videos]
    write_video(path, contact_sheet(clips)[None], 1.0)
    print(f"wrote {path}  (one row per prompt, in the order above)")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    model, cfg, _ = load_sampling_model(args)
    _check_run(cfg)
    captions = prompt_grid(args.prompts, args.seed)
    videos = sample_prompts(model, cfg, captions, seed=args.seed, steps=args.steps, guidance=args.guidance)
    grid = score_clips(videos, captions)
    if args.sheet:
        write_sheet(args.sheet, videos, args.upscale)
    for caption, s in zip(captions, grid.scores):
        dy, dx = s.displacement
        print(f"{'ok  ' if s.match else 'MISS'} {caption:32s} colour={s.color} direction={s.direction} "
              f"(dy {dy:+.2f}, dx {dx:+.2f} px/frame)")
    print(grid.summary())
    result: dict[str, Any] = {"colour": grid.rate("color_ok"), "direction": grid.rate("direction_ok"), "match": grid.rate("match")}
    if args.probe:
        result["probe"] = probe_losses(model, cfg)
        print("loss probe: " + ", ".join(f"{k} {v:.5f}" for k, v in result["probe"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "prompts": captions,
                       "scores": [{"color": s.color, "direction": s.direction, "displacement": s.displacement,
                                   "match": s.match} for s in grid.scores]}, f, indent=2)
    return 1 if args.min_match is not None and result["match"] < args.min_match else 0
