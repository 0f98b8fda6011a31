"""The DiT training objective: rectified-flow velocity loss on one micro-batch."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megasora.config import Config
from megasora.diffusion.flow import masked_mse, noise_batch


class FlowMatchingObjective:
    """loss(model, micro_batch, step): noise the clean latents, predict the velocity, masked MSE."""

    def __init__(self, cfg: Config) -> None:
        self.diffusion = cfg.diffusion
        self.seed = cfg.train.seed
        self.patch = tuple(cfg.model.patch)

    def tokens_per_sample(self, batch: dict[str, Any]) -> int:
        _, _, t, h, w = batch["latents"].shape
        return (t // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])

    def __call__(self, model: nn.Module, batch: dict[str, Any], step: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        x0 = batch["latents"].to(device=device, dtype=dtype)
        noised = noise_batch(x0, batch["ids"], step, self.seed, self.diffusion, self.patch)
        pred = model(noised.x_t, noised.t_tokens.to(dtype), batch["text_emb"].to(device=device, dtype=dtype),
                     batch["text_mask"].to(device), noised.drop_text)
        return masked_mse(pred, noised.target, noised.loss_mask)
