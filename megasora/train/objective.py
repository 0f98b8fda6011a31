"""The DiT training objective: rectified-flow velocity loss on one micro-batch.

`FlowMatchingObjective.inputs` is the one place a micro-batch becomes model inputs and loss
terms (noise, timesteps, caption dropout, conditioning frames); the single-process loop calls
the objective, the pipeline loop calls `inputs` just in time for each micro-batch's forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megasora.config import Config
from megasora.diffusion.flow import masked_mse, noise_batch


@dataclass
class FlowInputs:
    """One micro-batch as the model and the loss see it."""
    x_t: torch.Tensor        # (B, C, T, H, W) noised latents
    t: torch.Tensor          # (B,) or per-token (B, N) timesteps
    text: torch.Tensor       # (B, L, Dt) caption features
    text_mask: torch.Tensor  # (B, L) bool
    drop_text: torch.Tensor  # (B,) bool: caption dropped
    target: torch.Tensor     # (B, C, T, H, W) velocity
    loss_mask: torch.Tensor  # (B, 1, T, 1, 1): 0 on conditioning frames

    def model_args(self) -> tuple[torch.Tensor, ...]:
        """DiT.forward's positional inputs (a pipeline stage appends the received message)."""
        return self.x_t, self.t, self.text, self.text_mask, self.drop_text

    def loss(self, pred: torch.Tensor) -> torch.Tensor:
        """Masked MSE of the predicted velocity (B, C, T, H, W)."""
        return masked_mse(pred, self.target, self.loss_mask)


class FlowMatchingObjective:
    """loss(model, micro_batch, step): noise the clean latents, predict the velocity, masked MSE."""

    def __init__(self, cfg: Config) -> None:
        self.diffusion = cfg.diffusion
        self.seed = cfg.train.seed
        pt, ph, pw = cfg.model.patch
        self.patch = (pt, ph, pw)

    def tokens_per_sample(self, batch: dict[str, Any]) -> int:
        _, _, t, h, w = batch["latents"].shape
        return (t // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])

    def inputs(self, batch: dict[str, Any], step: int, dtype: torch.dtype, device: torch.device) -> FlowInputs:
        """The micro-batch's model inputs and loss terms on `device`; noise and timesteps are drawn
        from (seed, sample id, step), so every rank and every call gets the same ones."""
        x0 = batch["latents"].to(device=device, dtype=dtype)
        noised = noise_batch(x0, batch["ids"], step, self.seed, self.diffusion, self.patch)
        return FlowInputs(noised.x_t, noised.t_tokens.to(dtype), batch["text_emb"].to(device=device, dtype=dtype),
                          batch["text_mask"].to(device), noised.drop_text, noised.target, noised.loss_mask)

    def __call__(self, model: nn.Module, batch: dict[str, Any], step: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        inputs = self.inputs(batch, step, dtype, device)
        return inputs.loss(model(*inputs.model_args()))
