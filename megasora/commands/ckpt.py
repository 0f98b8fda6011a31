"""`megasora ckpt`: inspect, export and convert checkpoints.

  inspect DIR                 step, samples, layout, size and completeness of every checkpoint
  export DIR --out F.safetensors [--ema]
                              consolidated full weights (+ F.json with the config), loadable by
                              `megasora sample --weights F.safetensors` on one process
  export DIR --out F.safetensors --format diffusers-lora | --merge
                              a LoRA run: its adapters in diffusers' LoRA format, or merged into
                              full weights (docs/lora.md)
  export RUN --format diffusers --out DIR [--ema] [--merge]
                              a model.family=wan run (or an imported RUN) as a directory
                              WanTransformer3DModel.from_pretrained loads (docs/wan.md)
  import DIR --from diffusers --out RUN
                              a diffusers transformer directory (Wan 2.1 T2V) -> RUN/weights.safetensors
                              + RUN/weights.json in MegaSora's names (`sample --weights` loads it)
  convert DIR [--tag T]       write T.universal (DeepSpeed universal format) explicitly; resuming
                              under a different layout does this automatically
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from megasora.config import Config, ConfigError, config_from_dict, pretrained_settings
from megasora.models import dit_arch, wan_arch
from megasora.models.convert import check_shapes, read_diffusers, wan_arch_from_config, wan_to_megasora, write_diffusers
from megasora.train.checkpoint import (
    TAG_RE,
    CheckpointError,
    CheckpointInfo,
    find_resumable,
    list_tags,
    read_model_weights,
    verify,
)
from megasora.train.lora_export import diffusers_lora, lora_config, merged
from megasora.train.shard_files import write_shard
from megasora.train.universal import convert_to_universal


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ckpt", help="inspect / export / convert checkpoints", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    inspect = sub.add_parser("inspect", help="list checkpoints with step, layout, size, completeness")
    inspect.add_argument("dir", help="run directory or its checkpoints/ directory")
    inspect.set_defaults(func=run_inspect)
    export = sub.add_parser("export", help="consolidated weights to one safetensors file + config JSON")
    export.add_argument("dir", help="run directory, checkpoints/ directory or one step_XXXXXXXX directory")
    export.add_argument("--out", required=True, help="output .safetensors path (config goes next to it as .json)")
    export.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    export.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    export.add_argument("--format", choices=["megasora", "diffusers-lora", "diffusers"], default="megasora",
                        help="diffusers-lora: a LoRA run's adapters in diffusers/peft's LoRA format "
                             "(load_lora_weights / load_lora_adapter), docs/lora.md; diffusers: a "
                             "model.family=wan run as a WanTransformer3DModel directory (--out DIR), docs/wan.md")
    export.add_argument("--merge", action="store_true",
                        help="a LoRA run's adapters merged into its base: full weights (megasora format)")
    export.set_defaults(func=run_export)
    convert = sub.add_parser("convert", help="convert to a DeepSpeed universal checkpoint (any layout can load it)")
    convert.add_argument("dir", help="run directory or checkpoints/ directory")
    convert.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    convert.set_defaults(func=run_convert)
    imp = sub.add_parser("import", help="a diffusers transformer directory -> MegaSora weights in RUN")
    imp.add_argument("dir", help="diffusers transformer directory (config.json + safetensors)")
    imp.add_argument("--from", dest="source_format", choices=["diffusers"], required=True, help="format of DIR")
    imp.add_argument("--out", required=True, help="run directory to write weights.safetensors + weights.json into")
    imp.set_defaults(func=run_import)


def checkpoints_root(path: Path) -> tuple[Path, str | None]:
    """(checkpoints directory, tag or None) of a run dir, its checkpoints/ dir or one step_X dir."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist", "pass a run directory (run.dir), its checkpoints/ "
                              "directory or one step_XXXXXXXX directory")
    if TAG_RE.match(path.name):
        return path.parent, path.name
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    return path, None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_inspect(args: argparse.Namespace) -> int:
    root, _ = checkpoints_root(Path(args.dir))
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    tags = list_tags(root)
    if not tags:
        raise CheckpointError(f"{root} holds no checkpoint (no step_XXXXXXXX directory)",
                              "pass a run directory that `megasora train` saved into, or its checkpoints/")
    print(f"{root}  (latest -> {latest})")
    for tag in tags:
        try:
            m = verify(root / tag)
            lay = m["layout"]
            status = (f"complete  step {m['step']}  samples {m['samples']}  layout dp{lay['dp']} tp{lay['tp']} "
                      f"ulysses{lay['ulysses']} ring{lay['ring']} pp{lay['pp']} zero{lay['zero_stage']}")
        except CheckpointError as err:
            status = f"INCOMPLETE: {err}"
        print(f"  {tag}  {_size(root / tag) / 2 ** 20:8.1f} MiB  {status}")
    for tmp in sorted(root.glob(".tmp.*")):
        print(f"  {tmp.name}  interrupted save (ignored; removed by the next save)")
    return 0


IMPORTED = "weights.safetensors"  # what `ckpt import` writes into RUN (its config: weights.json beside it)


def run_import(args: argparse.Namespace) -> int:
    config, tensors = read_diffusers(args.dir)
    arch = wan_arch_from_config(config)
    check_shapes(arch, args.dir)
    cfg = Config()
    for key, value in pretrained_settings(config).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    out = Path(args.out) / IMPORTED
    out.parent.mkdir(parents=True, exist_ok=True)
    write_shard(out, wan_to_megasora(tensors, arch))
    out.with_suffix(".json").write_text(json.dumps(cfg.to_dict(), indent=1))
    print(f"wrote {out} ({len(tensors)} tensors of a {config['_class_name']}) and {out.with_suffix('.json')}")
    return 0


def _read_weights(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict, bool]:
    """(weights, config dict, EMA used) of a run's checkpoint, or of an imported RUN (raw weights)."""
    imported = Path(args.dir) / IMPORTED
    if imported.is_file() and not (Path(args.dir) / "checkpoints").is_dir():
        return load_file(str(imported)), json.loads(imported.with_suffix(".json").read_text()), False
    root, tag = checkpoints_root(Path(args.dir))
    return read_model_weights(root, args.tag or tag, ema=args.ema)


def export_diffusers(weights: dict[str, torch.Tensor], cfg_dict: dict, out: Path) -> None:
    cfg = config_from_dict(cfg_dict)
    if cfg.model.family != "wan":
        raise ConfigError(f"ckpt export --format diffusers: this run's model.family is {cfg.model.family!r}, "
                          "which has no diffusers class", "export model.family=wan runs, or use --format megasora")
    write_diffusers(out, weights, wan_arch(cfg))


def run_export(args: argparse.Namespace) -> int:
    weights, cfg, used_ema = _read_weights(args)
    if args.ema and not used_ema:
        raise CheckpointError("ckpt export --ema: this checkpoint has no EMA weights (it was trained with "
                              "train.ema_decay=0)", "drop --ema to export the raw weights")
    if args.format == "diffusers-lora" or args.merge:
        lora_cfg = lora_config(cfg)
        weights = (diffusers_lora(weights, lora_cfg.train.lora.scale, dit_arch(lora_cfg))
                   if args.format == "diffusers-lora" else merged(weights, lora_cfg))
    out = Path(args.out)
    if args.format == "diffusers":
        export_diffusers(weights, cfg, out)
        print(f"wrote {out} (WanTransformer3DModel, {'EMA' if used_ema else 'raw'} weights)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    write_shard(out, weights)  # a plain safetensors file, written tensor by tensor
    out.with_suffix(".json").write_text(json.dumps(cfg, indent=1))
    print(f"wrote {out} ({'EMA' if used_ema else 'raw'} weights, {len(weights)} tensors) and {out.with_suffix('.json')}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    root, tag = checkpoints_root(Path(args.dir))
    tag = args.tag or tag
    info = CheckpointInfo(root, tag, verify(root / tag)) if tag else find_resumable(root)
    if info is None:
        raise CheckpointError(f"{root}: no complete checkpoint to convert",
                              "pass a run directory with a complete checkpoint (`megasora ckpt inspect DIR`)")
    out = root / f"{info.tag}.universal"
    if out.is_dir():
        print(f"{out} already exists")
        return 0
    convert_to_universal(info.path, out)
    print(f"wrote {out}")
    return 0
