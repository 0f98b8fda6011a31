"""Euler sampler for rectified flow with classifier-free guidance, frame conditioning and SDEdit.

One integrator serves every prompting mode (megasora/diffusion/modes.py):
- conditioning frames (`FrameCondition`) are held at their clean latents with t = 0 on their
  tokens, exactly as training's conditioning masks present them (megasora/diffusion/masks.py);
- `init` + `strength` start from a partly noised clip (SDEdit) instead of pure noise.
The model may be sequence-parallel (parallelize()): its output is gathered on every rank, so
every rank runs the same update with the same noise and holds the same result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from megasora.config import DiffusionConfig
from megasora.diffusion.flow import resolution_shift, shift_timesteps
from megasora.diffusion.masks import per_token_timesteps
from megasora.models.text import with_null_caption

Progress = Callable[[int, int], None]  # (steps done, total steps)


@dataclass
class FrameCondition:
    """Known latent frames, kept clean while the others are generated."""
    latents: torch.Tensor  # (B or 1, C, T, H, W); only the frames marked in `frames` are read
    frames: torch.Tensor   # (T,) bool over latent frames; whole patches (pt frames) at a time

    def token_mask(self, pt: int) -> torch.Tensor:
        """(T',) bool over token frames; a patch row must be all conditioned or all generated."""
        rows = self.frames.view(-1, pt)
        if not torch.equal(rows.all(1), rows.any(1)):
            raise ValueError(f"conditioning frames {self.frames.tolist()} split a patch of {pt} latent frames")
        return rows.all(1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x with the conditioning frames replaced by their clean latents."""
        keep = self.frames.to(x.device)[None, None, :, None, None]  # (1, 1, T, 1, 1)
        return torch.where(keep, self.latents.to(device=x.device, dtype=x.dtype).expand_as(x), x)


def sampling_timesteps(steps: int, num_tokens: int, cfg: DiffusionConfig, strength: float = 1.0) -> torch.Tensor:
    """Times from `strength` (1 = pure noise) down to 0, shifted like training for this resolution.

    strength < 1 (SDEdit) keeps the tail of the full schedule below it, prefixed by strength.
    """
    times = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), resolution_shift(num_tokens, cfg))
    if strength >= 1.0:
        return times
    return torch.cat([torch.tensor([float(strength)]), times[times < strength]])


@torch.no_grad()
def sample_euler(model: nn.Module, shape: tuple[int, int, int, int, int], text: torch.Tensor,
                 text_mask: torch.Tensor, cfg: DiffusionConfig, steps: int = 30, guidance: float = 4.0,
                 patch: tuple[int, int, int] = (1, 2, 2), generator: Optional[torch.Generator] = None,
                 cond_latents: Optional[torch.Tensor] = None, condition: Optional[FrameCondition] = None,
                 init: Optional[torch.Tensor] = None, strength: float = 1.0,
                 progress: Optional[Progress] = None,
                 null_caption: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Integrate dx/dt = v from t=strength to t=0. shape = (B, C, T, H, W) of the latents to produce.

    guidance > 1 mixes conditional and null-caption predictions: v = v_null + g (v_text - v_null).
    condition: frames kept clean (i2v, extend, loop, connect); cond_latents (B, C, k, H, W) is the
    shorthand for "the first k frames". init (B, C, T, H, W) with strength in [0, 1]: SDEdit,
    x_strength = (1 - strength) init + strength noise; strength 0 returns init unchanged.
    null_caption (L, Dt), (L,): the negative caption's features (Wan: the empty string's) instead of
    the model's own dropped-caption input.
    """
    if cond_latents is not None:
        condition = first_frames_condition(cond_latents, shape[2])
    b, _, frames, h, w = shape
    param = next(model.parameters())
    noise = torch.randn(shape, generator=generator).to(device=param.device, dtype=param.dtype)
    num_tokens = (frames // patch[0]) * (h // patch[1]) * (w // patch[2])
    times = sampling_timesteps(steps, num_tokens, cfg, strength if init is not None else 1.0).to(param.device)
    x = noise if init is None else (1 - times[0]) * init.to(noise) + times[0] * noise
    if init is not None and strength <= 0:
        return init.float().clone()
    velocity = _guided_velocity(model, text, text_mask, guidance, param, null_caption)
    token_mask = condition.token_mask(patch[0]) if condition is not None else None
    for i, (t_now, t_next) in enumerate(zip(times[:-1], times[1:])):
        if condition is not None:
            x = condition.apply(x)
        t_model = _model_timesteps(t_now, b, num_tokens // (frames // patch[0]), token_mask)
        x = x + (t_next - t_now) * velocity(x, t_model.to(param.device))
        if progress is not None:
            progress(i + 1, len(times) - 1)
    if condition is not None:
        x = condition.apply(x)
    return x.float()


def first_frames_condition(cond_latents: torch.Tensor, frames: int) -> FrameCondition:
    """FrameCondition holding cond_latents (B, C, k, H, W) as the first k of `frames` latent frames."""
    b, c, k, h, w = cond_latents.shape
    latents = torch.zeros(b, c, frames, h, w, dtype=cond_latents.dtype, device=cond_latents.device)
    latents[:, :, :k] = cond_latents
    mask = torch.zeros(frames, dtype=torch.bool)
    mask[:k] = True
    return FrameCondition(latents, mask)


def _guided_velocity(model: nn.Module, text: torch.Tensor, text_mask: torch.Tensor, guidance: float,
                     param: torch.Tensor, null_caption: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                     ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """v(x, t) with classifier-free guidance: one batched forward of the text and null captions
    (the model's dropped caption, or `null_caption` given as the second half's text)."""
    b = text.shape[0]
    use_cfg = guidance != 1.0
    drop: Optional[torch.Tensor] = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)])
    negative, negative_mask = text, text_mask
    if null_caption is not None:
        negative, negative_mask = with_null_caption(text, text_mask, torch.ones(b, dtype=torch.bool), *null_caption)
        drop = None
    text_in = (torch.cat([text, negative]) if use_cfg else text).to(device=param.device, dtype=param.dtype)
    mask_in = (torch.cat([text_mask, negative_mask]) if use_cfg else text_mask).to(param.device)
    drop = drop.to(param.device) if drop is not None else None

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not use_cfg:
            return model(x, t, text_in, mask_in, None)
        v_text, v_null = model(torch.cat([x, x]), torch.cat([t, t]), text_in, mask_in, drop).chunk(2)
        return v_null + guidance * (v_text - v_null)
    return velocity


def _model_timesteps(t: torch.Tensor, b: int, tokens_per_frame: int,
                     token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B,) timesteps, or per-token (B, N) with 0 on conditioning frames."""
    if token_mask is None:
        return t.expand(b)
    return per_token_timesteps(t.expand(b).float(), token_mask.expand(b, -1).to(t.device), tokens_per_frame)
