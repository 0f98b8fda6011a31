"""What one training step computed, for samples/s, tokens/s, FLOP/s and so MFU / HFU.

A training loop is given a FLOP model: a callable from this rank's micro-batches of a step to
their `StepWork`. The DiT's is `DiTWork` (the explicit count of models/flops.py, plus what
activation checkpointing re-runs); the VAE brings its own (megasora/train/vae.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from megasora.config import Config
from megasora.models import dit_arch
from megasora.models.flops import attended_text_tokens, dit_train_flops
from megasora.train.objective import FlowMatchingObjective
from megasora.train.recompute import dit_recompute_flops


@dataclass(frozen=True)
class StepWork:
    """This rank's share of one step (the loop scales it by the data-parallel size)."""
    samples: int
    flops_per_sample: float                              # model FLOPs, forward + backward
    tokens: Optional[int] = None                         # video tokens; None: the model counts none
    recompute_flops_per_sample: Optional[float] = None   # re-run by activation checkpointing (hfu)


FlopModel = Callable[[list[dict[str, Any]]], StepWork]


class DiTWork:
    """The DiT's FLOP model: per-sample FLOPs at the step's mean tokens per sample."""

    def __init__(self, cfg: Config, objective: FlowMatchingObjective) -> None:
        self.arch = dit_arch(cfg)
        self.tokens_per_sample = objective.tokens_per_sample
        self.ac_mode, self.ac_every = cfg.train.activation_checkpointing, cfg.train.ac_every
        self.lora = (cfg.train.lora.rank, tuple(cfg.train.lora.targets))  # frozen base: no weight gradients

    def __call__(self, micro_batches: list[dict[str, Any]]) -> StepWork:
        samples = sum(m["latents"].shape[0] for m in micro_batches)
        tokens = sum(self.tokens_per_sample(m) * m["latents"].shape[0] for m in micro_batches)
        text_len = attended_text_tokens(self.arch, micro_batches[0]["text_emb"].shape[1])
        return StepWork(samples, dit_train_flops(self.arch, tokens // samples, text_len, *self.lora), tokens,
                        dit_recompute_flops(self.arch, tokens // samples, text_len, self.ac_mode, self.ac_every))
