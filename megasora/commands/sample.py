"""`megasora sample`: generate clips from a trained checkpoint in any of Sora's prompting modes.

The modes live in megasora/diffusion/modes.py; this command parses, checks the inputs (one
line and exit 2 for anything wrong, before any process group), runs the mode — sharded over
sequence-parallel ranks when launched with torchrun — and writes mp4 (PNG for images) plus a
PNG contact sheet of frames.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from megasora.commands.ckpt import checkpoints_root
from megasora.config import Config, apply_overrides, config_from_dict
from megasora.data.video_io import tensor_to_frames, write_video
from megasora.diffusion import modes
from megasora.diffusion.modes import Codec, InputError, InputLoader
from megasora.launcher.env import discover
from megasora.models import build_dit
from megasora.models.dit import DiT
from megasora.models.prompt_extension import DEFAULT_EXTENSION_TEMPLATE, PromptExtender, check_model_dir, check_template
from megasora.models.text import check_text_path, guidance_negative, text_encoder_from_config
from megasora.models.vae import check_vae_path
from megasora.parallel import init_parallel
from megasora.parallel.lora import is_lora_parameter
from megasora.parallel.mesh import LayoutError, validate_config_layout
from megasora.train.checkpoint import CheckpointError, read_model_weights
from megasora.train.distributed import device_for, init_distributed
from megasora.train.lora_export import merged

log = logging.getLogger("megasora")

EPILOG = """modes (sizes are latent frames / height / width; default: the training clip):
  t2v      text to video (default)                 megasora sample --run R --prompt "a red circle moving left"
  t2i      one frame, written as PNG               megasora sample --run R --mode t2i --prompt "..." --height 24 --width 40
  i2v      animate an image                        megasora sample --run R --mode i2v --image cat.png --prompt "..."
  extend   continue a video (--backward: precede)  megasora sample --run R --mode extend --video a.mp4 --frames 8
  loop     the video, then back into its start    megasora sample --run R --mode loop --video a.mp4
  connect  a transition from one video to another  megasora sample --run R --mode connect --video a.mp4 --video2 b.mp4
  edit     SDEdit under a new prompt               megasora sample --run R --mode edit --video a.mp4 --strength 0.6
sequence parallel (one clip's tokens sharded; same result as one process):
  torchrun --standalone --nproc_per_node 2 -m megasora sample --run-dir R --prompt "..." --set parallel.ulysses=2"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample", help="sample videos/images from a checkpoint: t2v, t2i, i2v, extend, loop, connect, edit",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", "--run-dir", dest="run",
                        help="run directory (newest complete checkpoint) or a checkpoints dir; under torchrun "
                             "spell it --run-dir (torchrun reads --run as its own --run-path)")
    source.add_argument("--weights", help="a .safetensors file from `megasora ckpt export` (config in the .json beside it)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00000050 (default: latest)")
    p.add_argument("--mode", default="t2v", choices=("t2v", "t2i", "i2v", "extend", "loop", "connect", "edit"),
                   help="prompting mode (default: t2v)")
    p.add_argument("--prompt", action="append", default=[], help="caption; repeat for several clips")
    p.add_argument("--prompts", default=None, metavar="FILE", help="captions, one per line (added to --prompt)")
    p.add_argument("--extend-prompt", nargs="?", const="", default=None, metavar="DIR",
                   help="rewrite each prompt into a detailed caption with the local causal LM in DIR (its chat "
                        "template, greedy decoding) before encoding; printed and stored beside the sample")
    p.add_argument("--extend-max-tokens", type=int, default=120,
                   help="--extend-prompt: cap on the extension's length in tokens (default: 120)")
    p.add_argument("--extend-template", default=DEFAULT_EXTENSION_TEMPLATE,
                   help="--extend-prompt: the request to the LM; {prompt} is the user's prompt")
    p.add_argument("--image", default=None, help="i2v: the image to animate (a video's first frame works too)")
    p.add_argument("--video", default=None, help="extend / loop / connect / edit: the input video")
    p.add_argument("--video2", default=None, help="connect: the video to lead into")
    p.add_argument("--backward", action="store_true", help="extend: generate frames before the video")
    p.add_argument("--strength", type=float, default=0.6,
                   help="edit: noise level the input is taken to, 0 (unchanged) .. 1 (ignore it) (default: 0.6)")
    p.add_argument("--frames", type=int, default=None,
                   help="latent frames: of the clip (t2v, i2v), to add (extend), to read of the input (edit)")
    p.add_argument("--height", type=int, default=None,
                   help="latent height (default: the training size, or the input's aspect at its area)")
    p.add_argument("--width", type=int, default=None, help="latent width (see --height)")
    p.add_argument("--window", type=int, default=None,
                   help="latent frames per generated window (default: the training clip length)")
    p.add_argument("--steps", type=int, default=30, help="Euler steps (default: 30)")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale, 1 = off (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", default=None,
                   help="output .mp4/.gif (.png for t2i); several prompts add _0, _1 ... "
                        "(default: RUN/samples/MODE.mp4)")
    p.add_argument("--upscale", type=int, default=8, help="pixel-space runs: nearest-neighbour zoom for viewing")
    p.add_argument("--fps", type=float, default=None, help="frame rate of inputs and outputs (default: data.fps)")
    p.add_argument("--save-latents", default=None, metavar="FILE.pt",
                   help="also save the sampled latents (and the encoded inputs) with torch.save")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config; parallel.* shards sampling over torchrun ranks")
    p.set_defaults(func=run)


def load_sampling_model(args: argparse.Namespace) -> tuple[DiT, Config, Path]:
    """The DiT and its config (with --set applied) from a run's checkpoint or an exported safetensors file."""
    if args.weights:
        path = _existing(args.weights, "--weights")
        weights, cfg_dict = read_exported(path)
        source, out_dir = str(path), path.parent
    else:
        root, tag = checkpoints_root(Path(args.run))
        weights, cfg_dict, used_ema = read_model_weights(root, args.tag or tag, not args.no_ema)
        source, out_dir = f"{root} ({'EMA' if used_ema else 'raw'} weights)", Path(args.run)
    cfg = config_from_dict(apply_overrides(cfg_dict, getattr(args, "overrides", [])))
    if cfg.train.lora.rank > 0 and any(is_lora_parameter(name) for name in weights):
        weights = merged(weights, cfg)  # a LoRA checkpoint holds only adapters: fold them into the base
    model = build_dit(cfg)
    model.load_state_dict(weights)
    log.info("loaded %s", source)
    return model.eval(), cfg, out_dir


def read_exported(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and config of `megasora ckpt export` output (F.safetensors + F.json), or one clear error."""
    fix = "pass a file written by `megasora ckpt export`, with its .json beside it"
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"--weights {path} is not a readable safetensors file ({err})", fix) from err
    config = path.with_suffix(".json")
    try:
        return weights, json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"the config of --weights, {config}, is missing or not JSON ({err})", fix) from err


def _existing(path: str, flag: str) -> Path:
    if not Path(path).is_file():
        raise InputError(f"{flag} {path} does not exist", f"pass an existing file to {flag}")
    return Path(path)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in _existing(args.prompts, "--prompts").read_text().splitlines()
                    if line.strip()]
    if not prompts:
        raise InputError("no prompt given", "pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


# ---------------------------------------------------------------- checks (before any process group)


def check_request(args: argparse.Namespace, cfg: Config) -> None:
    """Every size / flag combination the mode needs, as one InputError line."""
    pt, ph, pw = cfg.model.patch
    needs = {"i2v": ["image"], "extend": ["video"], "loop": ["video"], "connect": ["video", "video2"],
             "edit": ["video"]}.get(args.mode, [])
    for name in needs:
        if not getattr(args, name):
            raise InputError(f"--mode {args.mode} needs --{name}", f"pass --{name} FILE")
    for flag, value, p in (("--frames", args.frames, pt), ("--height", args.height, ph),
                           ("--width", args.width, pw), ("--window", args.window, pt)):
        if value is not None and (value <= 0 or value % p):
            raise InputError(f"{flag} {value} is not a positive multiple of the patch size {p} "
                             f"(model.patch={cfg.model.patch}, latent units)",
                             f"use {flag} {max(p, (max(value, 1) + p - 1) // p * p)}")
    window = args.window or cfg.data.frames
    if args.mode in ("loop", "connect") and window < 3 * pt:
        raise InputError(f"--mode {args.mode} needs a window of at least {3 * pt} latent frames (known frames "
                         f"at both ends), got {window}", f"pass --window {3 * pt} or more")
    if args.mode == "extend" and window < 2 * pt:
        raise InputError(f"--mode extend needs a window of at least {2 * pt} latent frames, got {window}",
                         f"pass --window {2 * pt} or more")
    if not 0.0 <= args.strength <= 1.0:
        raise InputError(f"--strength {args.strength} is outside [0, 1]", "pass e.g. --strength 0.6")
    check_vae_path(cfg.vae.path)  # the run's VAE decodes the samples: a moved one fails here, not after sampling
    check_text_path(cfg.text.path)


def check_world(cfg: Config, world: int) -> None:
    """Sampling shards one clip over sequence / tensor parallel ranks; it has no dp or pp."""
    p = cfg.parallel
    model_ranks = p.tp * p.ulysses * p.ring
    if p.pp != 1 or world != model_ranks:
        raise LayoutError(f"sampling with {world} process(es) shards one clip over parallel.tp x ulysses x ring "
                          f"= {model_ranks} (pp={p.pp}); launch exactly {model_ranks} process(es) with "
                          f"parallel.pp=1, e.g. --set parallel.ulysses={world}")
    validate_config_layout(cfg, world)


# ---------------------------------------------------------------- running a mode


def check_extension(args: argparse.Namespace) -> None:
    """--extend-prompt's model and template, one line each, before any model loads."""
    if getattr(args, "extend_prompt", None) is None:
        return
    check_template(args.extend_template, "--extend-template", required=("prompt",))
    check_model_dir(args.extend_prompt, "--extend-prompt")
    if args.extend_max_tokens < 1:
        raise InputError(f"--extend-max-tokens {args.extend_max_tokens} must be >= 1", "pass e.g. 120")


def extend_prompts(args: argparse.Namespace, prompts: list[str], device: str) -> list[str]:
    """The prompts the text encoder sees: the user's, or their extensions (printed)."""
    if getattr(args, "extend_prompt", None) is None:
        return prompts
    extender = PromptExtender(args.extend_prompt, device, args.extend_max_tokens, args.extend_template)
    extended = extender.extend(prompts)
    for short, long in zip(prompts, extended):
        print(f"extended prompt {short!r} -> {long!r}")
    return extended


def run(args: argparse.Namespace) -> int:
    world = discover().world_size
    prompts = read_prompts(args)
    check_extension(args)
    model, cfg, out_dir = load_sampling_model(args)
    check_request(args, cfg)
    if world > 1:
        check_world(cfg, world)
    inputs = encode_inputs(args, cfg)  # decoding errors surface here, before any process group
    rank = 0
    if world > 1:
        rank = start_sequence_parallel(model, cfg, world)
    elif torch.cuda.is_available():
        model.cuda()
    # Every rank extends the same prompts the same way (greedy), so no collective is needed.
    encoded = extend_prompts(args, prompts, "cuda" if torch.cuda.is_available() else "cpu")
    encoder = text_encoder_from_config(cfg.text)
    text, mask = encoder.encode(encoded)
    window = args.window or cfg.data.frames
    context = modes.context_frames(args.mode, window, cfg.model.patch[0])
    progress = modes.StepProgress(rank == 0, windows_needed(args, cfg, window, context))
    sampler = modes.ModeSampler(model, cfg, text, mask, args.steps, args.guidance, args.seed, progress,
                                null_caption=guidance_negative(encoder, cfg))
    latents = run_mode(sampler, args, cfg, inputs, window, context)
    progress.close()
    if rank == 0:
        write_outputs(args, cfg, out_dir, prompts, latents, inputs, encoded, text)
    return 0


def encode_inputs(args: argparse.Namespace, cfg: Config) -> dict[str, torch.Tensor]:
    """The mode's image / video inputs as latents at one size."""
    if args.mode in ("t2v", "t2i"):
        return {}
    height, width = args.height or None, args.width or None
    loader = InputLoader(Codec(cfg), cfg.model.patch_size, cfg.data.height * cfg.data.width,
                         args.fps or cfg.data.fps)
    if height and width:
        loader.size = (height, width)
    elif height or width:
        loader.area = (height or cfg.data.height) * (width or cfg.data.width)
    if args.mode == "i2v":
        return {"image": loader.image(args.image)}
    read = args.frames if args.mode == "edit" and args.frames else args.window or cfg.data.frames
    inputs = {"video": loader.video(args.video, "--video", read)}
    if args.mode == "connect":
        inputs["video2"] = loader.video(args.video2, "--video2", read)
    return inputs


def start_sequence_parallel(model: DiT, cfg: Config, world: int) -> int:
    """Process group + mesh; the model's sequence is sharded over tp x ulysses x ring. Returns the rank."""
    env = init_distributed()
    init_parallel(model, cfg.parallel, world, cfg.train)
    model.to(device_for(env))
    log.info("sampling with the sequence sharded over %d ranks (tp=%d ulysses=%d ring=%d)", world,
             cfg.parallel.tp, cfg.parallel.ulysses, cfg.parallel.ring)
    return env.rank


def windows_needed(args: argparse.Namespace, cfg: Config, window: int, context: int) -> int:
    if args.mode == "extend":
        return -(-(args.frames or window) // (window - context))
    return 1


def run_mode(s, args: argparse.Namespace, cfg: Config, inputs: dict[str, torch.Tensor], window: int,
             context: int) -> torch.Tensor:
    frames, pt = args.frames or cfg.data.frames, cfg.model.patch[0]
    if args.mode == "t2v":
        return modes.t2v(s, frames, args.height or cfg.data.height, args.width or cfg.data.width)
    if args.mode == "t2i":
        return modes.t2v(s, pt, args.height or cfg.data.height, args.width or cfg.data.width)
    if args.mode == "i2v":
        return modes.i2v(s, inputs["image"], frames)
    video = inputs["video"]
    if args.mode == "extend":
        return modes.extend(s, video, args.frames or window, window, min(context, video.shape[2]), args.backward)
    context = min(context, video.shape[2], inputs.get("video2", video).shape[2])
    if args.mode == "loop":
        return modes.loop(s, video, window, context)
    if args.mode == "connect":
        return modes.connect(s, video, inputs["video2"], window, context)
    return modes.edit(s, video, args.strength)


# ---------------------------------------------------------------- writing


def write_outputs(args: argparse.Namespace, cfg: Config, out_dir: Path, prompts: list[str],
                  latents: torch.Tensor, inputs: dict[str, torch.Tensor], encoded: list[str] | None = None,
                  text: torch.Tensor | None = None) -> None:
    """Clips, contact sheet, `--save-latents`; with --extend-prompt, PATH.prompt.json beside each clip holds
    the user's prompt and the extended one the model was given."""
    encoded = encoded or prompts
    codec = Codec(cfg) if cfg.vae.path or cfg.model.in_channels == 3 else None
    pixels = codec.decode(latents) if codec is not None else latents[:, :3].clamp(-1, 1)
    upscale = args.upscale if not cfg.vae.path else 1
    image = pixels.shape[2] == 1
    out = Path(args.out) if args.out else out_dir / "samples" / f"{args.mode}{'.png' if image else '.mp4'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    clips = []
    for i, video in enumerate(pixels):
        frames = zoom_frames(tensor_to_frames(video), upscale)
        path = out if len(prompts) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        if image:
            path = path.with_suffix(".png")
        write_video(path, frames, args.fps or cfg.data.fps)
        clips.append(frames)
        print(f"wrote {path}  ({prompts[i]!r})")
        if encoded[i] != prompts[i]:
            path.with_suffix(".prompt.json").write_text(json.dumps({"prompt": prompts[i], "extended": encoded[i]}))
    sheet = out.with_name(f"{out.stem}_sheet.png")
    write_video(sheet, contact_sheet(clips)[None], 1.0)
    print(f"wrote {sheet}  (contact sheet: one row per prompt)")
    if args.save_latents:
        torch.save({"latents": latents, "inputs": inputs, "mode": args.mode, "prompts": encoded, "text": text},
                   args.save_latents)


def zoom_frames(frames: np.ndarray, upscale: int) -> np.ndarray:
    return frames.repeat(upscale, axis=1).repeat(upscale, axis=2) if upscale > 1 else frames


def contact_sheet(clips: list[np.ndarray], max_columns: int = 8, gap: int = 2) -> np.ndarray:
    """uint8 (T, H, W, 3) clips -> one (rows*H, cols*W, 3) image: evenly spaced frames, a row per clip."""
    t, h, w, _ = clips[0].shape
    picks = np.linspace(0, t - 1, min(t, max_columns)).round().astype(int)
    sheet = np.full((len(clips) * (h + gap) - gap, len(picks) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for r, clip in enumerate(clips):
        for c, f in enumerate(picks):
            sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = clip[f]
    return sheet
