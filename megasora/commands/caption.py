"""`megasora caption`: re-caption clips with a local image/video-to-text model (megasora/data/recaption.py)."""
from __future__ import annotations

import argparse
import json
import math

from megasora.config import load_config
from megasora.data.preprocess import check_inputs_exist
from megasora.data.recaption import (
    DEFAULT_INSTRUCTION,
    Captioner,
    CaptionSpec,
    check_captioner_dir,
    check_instruction,
    run_caption,
)
from megasora.errors import UserError
from megasora.launcher.env import rank_and_world
from megasora.models.vae import VideoVAE


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "caption",
        help="write a detailed caption for every clip with a local image/video-to-text model (JSONL for "
             "`preprocess --captions`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Cut the inputs into the clips `megasora preprocess` would cut (data.fps, data.clip_frames,\n"
            "--max-clips-per-video) and caption each with the model in --model (anything\n"
            "AutoModelForImageTextToText + AutoProcessor load: BLIP, LLaVA, Qwen2-VL ...). Video models get\n"
            "--frames frames per clip; image models the middle frame or a 2x2 grid (--image-frames).\n"
            "The JSONL rows {path, clip, start_sec, caption} follow each clip into `preprocess --captions`;\n"
            "give preprocess the original captions too (--captions orig.jsonl --captions OUT) and\n"
            "data.caption_mix trains on both.\n\n"
            "Resumable: clips already in OUT or OUT.parts/ are skipped. Multi-process: launch N copies with\n"
            "RANK/WORLD_SIZE (torchrun), OMPI_COMM_WORLD_* (mpirun) or SLURM_PROCID/SLURM_NTASKS (srun);\n"
            "input i is captioned by rank i mod N, the last rank to finish writes OUT. Unreadable inputs\n"
            "are skipped and listed in OUT.parts/report-rank*.json.\n\n"
            "example:\n"
            "  srun -N 4 --ntasks-per-node 8 --gpus-per-task 1 megasora caption clips/ \\\n"
            "      --model models/llava-video --out captions_long.jsonl --device cuda"),
    )
    p.add_argument("inputs", nargs="*", help="video/image files or directories (default: data.inputs)")
    p.add_argument("--model", default="", help="local transformers image/video-to-text model directory")
    p.add_argument("--out", default="", help="caption JSONL to write (rows: path, clip, start_sec, caption)")
    p.add_argument("--config", default=None, help="YAML preset supplying data.fps / data.clip_frames / data.max_area")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable, e.g. --set data.fps=12")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION,
                   help="what the model is asked (chat models); may use {caption} (the file-name caption) and "
                        "{seconds} (clip length)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip for video models (default 8)")
    p.add_argument("--image-frames", choices=("middle", "grid"), default="middle",
                   help="image models: the middle frame or a 2x2 grid of four frames (default middle)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per generate call (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=120, help="caption length cap in tokens (default 120)")
    p.add_argument("--max-clips-per-video", type=int, default=0, help="0 = every clip (as preprocess)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 on cuda)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    inputs = list(args.inputs or cfg.data.inputs)
    if not args.out or not inputs:
        raise UserError("caption needs inputs and an output file", "pass video/image paths (or data.inputs) and "
                        "--out captions.jsonl")
    if args.batch_size < 1 or args.frames < 1 or args.max_new_tokens < 1:
        raise UserError(f"--batch-size={args.batch_size}, --frames={args.frames} and --max-new-tokens="
                        f"{args.max_new_tokens} must be >= 1", "pass positive values")
    check_inputs_exist(inputs)
    check_instruction(args.instruction)
    check_captioner_dir(args.model)  # before the weights load
    rank, world = rank_and_world()
    spec = CaptionSpec(inputs=inputs, out=args.out, model=args.model, instruction=args.instruction,
                       fps=cfg.data.fps, clip_frames=cfg.data.clip_frames, max_area=cfg.data.max_area,
                       multiple=VideoVAE.spatial_factor * math.lcm(*cfg.model.patch[1:]),
                       temporal_factor=VideoVAE.temporal_factor, max_clips_per_video=args.max_clips_per_video,
                       frames=args.frames, image_frames=args.image_frames, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, device=args.device, rank=rank, world_size=world)
    captioner = Captioner(args.model, args.device, args.frames, args.image_frames, args.max_new_tokens)
    report = run_caption(spec, captioner)
    print(json.dumps({k: v for k, v in report.as_dict().items() if k != "failures"}))
    return 0
