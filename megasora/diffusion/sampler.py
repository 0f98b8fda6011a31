"""Euler sampler for rectified flow with classifier-free guidance."""
from __future__ import annotations

import torch
from torch import nn

from megasora.config import DiffusionConfig
from megasora.diffusion.flow import resolution_shift, shift_timesteps


def sampling_timesteps(steps: int, num_tokens: int, cfg: DiffusionConfig) -> torch.Tensor:
    """steps+1 times from 1 (noise) to 0 (data), shifted like training for this resolution."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), resolution_shift(num_tokens, cfg))


@torch.no_grad()
def sample_euler(model: nn.Module, shape: tuple[int, int, int, int, int], text: torch.Tensor,
                 text_mask: torch.Tensor, cfg: DiffusionConfig, steps: int = 30, guidance: float = 4.0,
                 patch: tuple[int, int, int] = (1, 2, 2), generator: torch.Generator | None = None,
                 cond_latents: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 to t=0. shape = (B, C, T, H, W) of the latents to produce.

    guidance > 1 mixes conditional and null-caption predictions: v = v_null + g (v_text - v_null).
    cond_latents (B, C, pt, H, W), if given, are kept clean as the first frames (image-to-video).
    """
    b, _, frames, h, w = shape
    param = next(model.parameters())
    x = torch.randn(shape, generator=generator).to(device=param.device, dtype=param.dtype)
    num_tokens = (frames // patch[0]) * (h // patch[1]) * (w // patch[2])
    times = sampling_timesteps(steps, num_tokens, cfg).to(param.device)
    use_cfg = guidance != 1.0
    text_in = torch.cat([text, text]) if use_cfg else text
    mask_in = torch.cat([text_mask, text_mask]) if use_cfg else text_mask
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]) if use_cfg else None
    for t_now, t_next in zip(times[:-1], times[1:]):
        if cond_latents is not None:
            x[:, :, :cond_latents.shape[2]] = cond_latents
        t_model = _model_timesteps(t_now, b, num_tokens, frames, patch, cond_latents is not None, param.device)
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = torch.cat([t_model, t_model]) if use_cfg else t_model
        v = model(x_in, t_in, text_in.to(param.dtype), mask_in, drop.to(param.device) if use_cfg else None)
        if use_cfg:
            v_text, v_null = v.chunk(2)
            v = v_null + guidance * (v_text - v_null)
        x = x + (t_next - t_now) * v
    if cond_latents is not None:
        x[:, :, :cond_latents.shape[2]] = cond_latents
    return x.float()


def _model_timesteps(t: torch.Tensor, b: int, num_tokens: int, frames: int, patch: tuple[int, int, int],
                     conditioned: bool, device: torch.device) -> torch.Tensor:
    if not conditioned:
        return t.expand(b).to(device)
    per_frame = num_tokens // (frames // patch[0])
    t_tokens = t.expand(b, num_tokens).clone()
    t_tokens[:, :per_frame] = 0.0
    return t_tokens.to(device)
