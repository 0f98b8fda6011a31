"""Exponential moving average of the weights, kept in fp32 for sampling."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def gathered_parameters(model: nn.Module, zero_stage: int) -> contextlib.AbstractContextManager:
    """Inside the block every parameter of `model` holds its full value (a collective under ZeRO-3)."""
    if zero_stage == 3:  # ZeRO-3 partitions parameters; gather them to read full values.
        import deepspeed  # lazy: DeepSpeed takes ~1 s to import; only ZeRO-3 needs it here
        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


class EMA:
    def __init__(self, model: nn.Module, decay: float, zero_stage: int = 0) -> None:
        self.decay = decay
        self.zero_stage = zero_stage
        with gathered_parameters(model, zero_stage):
            self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Early steps average over fewer updates so the EMA is useful before 1/(1-decay) steps.
        decay = min(self.decay, (1 + step) / (10 + step))
        with gathered_parameters(model, self.zero_stage):
            for name, p in model.named_parameters():
                self.shadow[name].lerp_(p.detach().float(), 1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
