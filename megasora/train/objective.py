"""The DiT training objective: rectified-flow velocity loss on one micro-batch.

`FlowMatchingObjective.inputs` is the one place a micro-batch becomes model inputs and loss
terms (noise, timesteps, caption dropout, conditioning frames); the single-process loop calls
the objective, the pipeline loop calls `inputs` just in time for each micro-batch's forward.

Under sequence parallelism each rank builds the inputs of its own span of tokens only (the
model's `sequence` hook says which): the clip's latents are cut to the span's latent frames
before anything is noised, the noise of those frames alone is drawn, and the model returns
the velocity of the span's tokens. Each rank's loss is its span's squared errors over each
whole sample's element count, averaged over samples (flow.span_mse: per sample, so dp equals one
process with conditioning frames too); the hook's `sum` adds the ranks' parts (the exact mean),
and the gradient of each part stays on its rank, which DeepSpeed then sums over sp.

The training loop's data source makes that cut already (`span_cut`: a micro-batch with a
`clip_shape` entry holds only the span's latent frames, never the whole clip); a micro-batch
without one (tests, tools) holds whole clips and is cut here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megasora.config import Config
from megasora.data.shards import dataset_null_caption
from megasora.data.stream import SpanCut
from megasora.diffusion.flow import noise_span, span_mse
from megasora.models.dit import NoSequenceSharding, SequenceHook
from megasora.models.patch import TokenSpan, patch_grid
from megasora.models.text import with_null_caption


@dataclass
class FlowInputs:
    """One micro-batch's span of tokens as the model and the loss see it (E = C*pt*ph*pw)."""
    x_t: torch.Tensor        # (B, n, E) noised patch tokens of this rank's span
    t: torch.Tensor          # (B,) or per-token (B, n) timesteps
    text: torch.Tensor       # (B, L, Dt) caption features
    text_mask: torch.Tensor  # (B, L) bool
    drop_text: torch.Tensor  # (B,) bool: caption dropped
    target: torch.Tensor     # (B, n, E) velocity
    loss_mask: torch.Tensor  # (B, n, 1): 0 on conditioning frames and sequence padding
    loss_elements: torch.Tensor  # (B,) elements of each whole sample in its mean
    grid: tuple[int, int, int]   # (T', H', W') token grid of the clips
    sequence: SequenceHook

    def model_args(self) -> tuple[torch.Tensor, ...]:
        """DiT.forward's positional inputs (a pipeline stage appends the received message)."""
        return self.x_t, self.t, self.text, self.text_mask, self.drop_text

    def model_kwargs(self) -> dict[str, Any]:
        return {"grid": self.grid}

    def loss(self, pred: torch.Tensor) -> torch.Tensor:
        """Masked MSE of the predicted velocity (B, n, E) over the whole clip (summed over sp)."""
        return self.sequence.sum(span_mse(pred, self.target, self.loss_mask, self.loss_elements))


def clip_shape(batch: dict[str, Any]) -> tuple[int, int, int]:
    """The whole clip's latent (T, H, W): the stream's `clip_shape`, else the latents' own."""
    if "clip_shape" in batch:
        return tuple(batch["clip_shape"].tolist())  # host tensor: no sync
    return tuple(batch["latents"].shape[-3:])


def span_rows(batch: dict[str, Any], span: TokenSpan, pt: int) -> torch.Tensor:
    """(B, C, T_span, H, W) latent frames of `span`: as the stream cut them, or cut from whole clips."""
    latents = batch["latents"]
    if "clip_shape" not in batch:
        return span.latent_rows(latents, pt)
    start, end = span.latent_frames(int(batch["clip_shape"][0]), pt)
    frames = end - start
    if latents.shape[2] != frames:  # cut for another span: a stream built for another layout
        raise ValueError(f"micro-batch latents hold {latents.shape[2]} frames but this rank's span of the "
                         f"clip {tuple(batch['clip_shape'].tolist())} has {frames}: the data stream was "
                         "cut for another sequence layout")
    return latents


class FlowMatchingObjective:
    """loss(model, micro_batch, step): noise the clean latents, predict the velocity, masked MSE.

    `sequence`: the model's sequence hook (which tokens this rank holds; default: all).
    """

    def __init__(self, cfg: Config, sequence: SequenceHook | None = None) -> None:
        self.diffusion = cfg.diffusion
        self.seed = cfg.train.seed
        pt, ph, pw = cfg.model.patch
        self.patch = (pt, ph, pw)
        self.sequence: SequenceHook = sequence or NoSequenceSharding()
        # Wan drops a caption to the empty string's embedding (stored by preprocess), not to zeros.
        null = dataset_null_caption(cfg)
        self.null_caption = None if null is None else (torch.from_numpy(null[0]), torch.from_numpy(null[1]))

    def span_cut(self) -> SpanCut:
        """The cut the data source makes for this rank, so its batches hold the span's frames only."""
        return SpanCut(self.sequence.span, self.patch)

    def tokens_per_sample(self, batch: dict[str, Any]) -> int:
        """Tokens of each whole clip (not of this rank's span): throughput counts the clip once per dp rank."""
        return math.prod(patch_grid(clip_shape(batch), self.patch))

    def inputs(self, batch: dict[str, Any], step: int, dtype: torch.dtype, device: torch.device) -> FlowInputs:
        """This rank's span of the micro-batch as model inputs and loss terms on `device`; noise and
        timesteps are drawn from (seed, sample id, step), so every rank and every call gets the same ones."""
        grid = patch_grid(clip_shape(batch), self.patch)
        span = self.sequence.span(grid)
        rows = span_rows(batch, span, self.patch[0]).to(device=device, dtype=dtype)  # before noising
        noised = noise_span(rows, batch["ids"], step, self.seed, self.diffusion, self.patch, span)
        del rows
        text, text_mask = batch["text_emb"].to(device=device, dtype=dtype), batch["text_mask"].to(device)
        drop = noised.drop_text
        if self.null_caption is not None:  # on the device: the (L, Dt) null caption is copied, nothing synced
            text, text_mask = with_null_caption(text, text_mask, drop, *self.null_caption)
            drop = torch.zeros_like(drop)
        return FlowInputs(noised.x_t, noised.t_tokens.to(dtype), text, text_mask, drop, noised.target,
                          noised.loss_mask, noised.loss_elements, grid, self.sequence)

    def __call__(self, model: nn.Module, batch: dict[str, Any], step: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        inputs = self.inputs(batch, step, dtype, device)
        return inputs.loss(model(*inputs.model_args(), **inputs.model_kwargs()))
