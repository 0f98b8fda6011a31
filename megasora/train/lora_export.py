"""A LoRA run's checkpoint out of MegaSora: diffusers' LoRA format, or the adapters merged into full weights.

A LoRA checkpoint holds only the adapters (parallel/lora.py); its base is the seeded init of its
config (or the pretrained model that config names), rebuilt here to merge.

diffusers' format is peft's: `transformer.<module>.lora_A.weight` (r, in) and `...lora_B.weight`
(out, r), loaded by `WanPipeline.load_lora_weights` / `model.load_lora_adapter` with lora_alpha
= r when the file carries no alphas, i.e. scale 1: the run's alpha / r is folded into B. For a
family with a diffusers counterpart the module names (and B's row order, e.g. Wan's RoPE rows of
q and k) go through models/convert.py's name table.
"""
from __future__ import annotations

from typing import Any

import torch

from megasora.config import Config, ConfigError, config_from_dict
from megasora.models import build_dit, convert
from megasora.models.dit import DiTArch
from megasora.parallel.lora import PREFIX, is_lora_parameter, merged_weights, module_map

FACTORS = (".lora_A.weight", ".lora_B.weight")


def lora_config(cfg_dict: dict[str, Any]) -> Config:
    cfg = config_from_dict(cfg_dict)
    if cfg.train.lora.rank <= 0:
        raise ConfigError("this checkpoint was not trained with LoRA (train.lora.rank=0)",
                          "export its full weights without --format diffusers-lora / --merge")
    return cfg


def diffusers_lora(weights: dict[str, torch.Tensor], scale: float, arch: DiTArch) -> dict[str, torch.Tensor]:
    """Adapters by MegaSora parameter name -> peft/diffusers keys, `scale` (alpha / r) folded into B."""
    rename, out = module_map(arch), {}
    for name, tensor in weights.items():
        if not name.endswith(FACTORS[0]):
            continue
        module = name.removesuffix(FACTORS[0])
        target, rows = rename(module)
        out[f"{PREFIX}{target}.lora_A.weight"] = tensor.float().contiguous()
        b = weights[f"{module}{FACTORS[1]}"].float() * scale
        out[f"{PREFIX}{target}.lora_B.weight"] = rows(b).contiguous()
    return out


def base_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """The frozen base a LoRA run trained on: the pretrained model its config names, or its seeded init."""
    if cfg.model.pretrained:
        config, state = convert.read_diffusers(cfg.model.pretrained)
        return convert.wan_to_megasora(state, convert.wan_arch_from_config(config))
    torch.manual_seed(cfg.train.seed)
    return {name: p.detach() for name, p in build_dit(cfg).named_parameters()}


def merged(weights: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Full weights with the adapters folded in (W + alpha/r * B A), named like the base model."""
    adapters = {name: t for name, t in weights.items() if is_lora_parameter(name)}
    return merged_weights({**base_weights(cfg), **adapters}, cfg.train.lora.scale)
