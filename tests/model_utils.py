"""Random models and inputs for the module-level parallel tests (test_tensor_parallel, test_lora,
test_wan_parallel): every parameter random, so no zero-initialised branch hides a wrong path."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def randomized(model: nn.Module, scale: float = 0.1, norm_width: int = 0) -> nn.Module:
    """Every parameter ~ N(0, scale^2) from seed 0 (adaLN-Zero and zero-initialised outputs would close
    the residual branches a test must see); (norm_width,) vectors are centred at 1 (norm weights)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            unit = param.dim() == 1 and param.shape[0] == norm_width
            param.copy_(torch.randn(param.shape, generator=g) * scale + (1.0 if unit else 0.0))
    return model


def model_inputs(in_channels: int, text_dim: int, b: int, frames: int, side: int, text: int,
                 per_token: bool = False) -> tuple[torch.Tensor, ...]:
    """(latents, t, text, text_mask, dout) from seed 1: sample 1's caption padded after 3 tokens;
    per_token: one timestep per 2x2-patched token."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(b, in_channels, frames, side, side, generator=g)
    tokens = frames * (side // 2) ** 2
    t = torch.rand(b, tokens, generator=g) if per_token else torch.rand(b, generator=g)
    emb = torch.randn(b, text, text_dim, generator=g)
    mask = torch.ones(b, text, dtype=torch.bool)
    mask[1, 3:] = False
    dout = torch.randn(b, in_channels, frames, side, side, generator=g)
    return latents, t, emb, mask, dout


def tp_gathered_grads(model: nn.Module, group: dist.ProcessGroup, split: dict[str, int], tp: int,
                      keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """Gradients unsharded like the parameters: those `split` along a dim are all-gathered over the
    tp `group` (replicated ones are already summed over tp by the hooks); only names `keep` accepts."""
    out = {}
    for name, param in model.named_parameters():
        if not keep(name):
            continue
        grad = param.grad
        if name in split:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(parts, grad.contiguous(), group=group)
            grad = torch.cat(parts, dim=split[name])
        out[name] = grad
    return out


def save_tiny_wan(directory: Path) -> None:
    """A diffusers WanTransformer3DModel sized for configs/tiny.yaml's data (3 latent channels, MiniLM's
    384-d captions), every parameter perturbed (its zero-initialised output would hide the weights), saved."""
    from diffusers import WanTransformer3DModel  # here, not at the top: the tp tests importing this need no diffusers
    model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                                  text_dim=384, freq_dim=32, ffn_dim=72, num_layers=2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
