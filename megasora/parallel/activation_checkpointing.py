"""Activation checkpointing of DiT blocks, applied from outside like parallelize().

`apply_activation_checkpointing(model, mode, every)` sets the `checkpoint` hook of every
block whose global index is a multiple of `every` (pipeline stages hold the same block
objects, so calling it on the whole DiT before build_stage covers them). The hook is a plain
attribute, not a module: parameter names, the TP plan and checkpoints are unchanged, and
`checkpointing_summary` counts the modes from it.

- `full`: torch.utils.checkpoint (non-reentrant) of the whole block. Backward keeps only the
  block's inputs and re-runs the block, INCLUDING its tensor-parallel, Ulysses all-to-all and
  ring K/V communication. Every rank of a group recomputes the same blocks at the same point
  of its backward, so the recomputed collectives match across ranks.
- `selective`: the same checkpoint, except that the self-attention call (block.attn.attention:
  local SDPA, Ulysses, ring or USP, with its communication) is kept: its autograd saved
  tensors (q, k, v, output, log-sum-exp) escape the checkpoint, and when the checkpoint
  recomputes the block in backward the attention call returns the output of the first
  forward instead of running again. Norms, adaLN modulation, q/k/v/out projections (and
  their tp gathers / reduce-scatters), cross-attention and the MLP are recomputed.

Why the block inputs are unpacked: the DiT loop reuses one TokenState (`state.x = block(state,
...)`), so by backward time `state.x` holds a later block's output; the checkpointed function
receives the tensors themselves and rebuilds its own TokenState.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from megasora.config import AC_MODES
from megasora.models.attention import AttentionFn
from megasora.models.dit import BlockCheckpoint, DiT, DiTBlock, TokenState

log = logging.getLogger("megasora")


def checkpointed_blocks(depth: int, mode: str, every: int) -> list[int]:
    """Global indices of the blocks that `mode` / `every` checkpoint (the planner uses the same rule)."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {AC_MODES}")
    return [] if mode == "none" else list(range(0, depth, every))


def apply_activation_checkpointing(model: DiT, mode: str, every: int = 1) -> DiT:
    """Checkpoint blocks 0, every, 2*every, ... of `model` in place (call after parallelize())."""
    indices = checkpointed_blocks(len(model.blocks), mode, every)
    if indices:
        log.info("activation checkpointing: %s on %d of %d blocks (every %d)", mode, len(indices),
                 len(model.blocks), every)
    for index in indices:
        block = model.block(index)
        if mode == "selective":
            block.attn.attention = KeptAttention(block.attn.attention)
        block.checkpoint = CHECKPOINTS[mode]()
    return model


def _block_inputs(state: TokenState, text: torch.Tensor, text_mask: torch.Tensor) -> tuple:
    cos, sin = state.rope
    return state.x, state.cond, cos, sin, state.key_padding_mask, text, text_mask


def _block_body(block: DiTBlock, x: torch.Tensor, cond: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_padding_mask: torch.Tensor | None, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    state = TokenState(x=x, cond=cond, rope=(cos, sin), key_padding_mask=key_padding_mask)
    return block.body(state, text, text_mask)


class FullCheckpoint:
    """DiTBlock.checkpoint for `full`: backward re-runs the whole block."""
    mode = "full"

    def __call__(self, block: DiTBlock, state: TokenState, text: torch.Tensor,
                 text_mask: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # sampling / eval: nothing to save
            return block.body(state, text, text_mask)
        return checkpoint(_block_body, block, *_block_inputs(state, text, text_mask), use_reentrant=False)


class SelectiveCheckpoint:
    """DiTBlock.checkpoint for `selective`: backward re-runs the block but replays its self-attention
    (the block's attention is a KeptAttention)."""
    mode = "selective"

    def __call__(self, block: DiTBlock, state: TokenState, text: torch.Tensor,
                 text_mask: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return block.body(state, text, text_mask)
        kept = block.attn.attention
        assert isinstance(kept, KeptAttention), "apply_activation_checkpointing sets both"
        record = AttentionRecord()

        def run(*inputs: Any) -> torch.Tensor:
            # 1st call: the forward, attention runs and is recorded; 2nd call: the recompute
            # in backward, attention replays the recorded output.
            with kept.using(record):
                return _block_body(block, *inputs)

        return checkpoint(run, *_block_inputs(state, text, text_mask), use_reentrant=False)


CHECKPOINTS: dict[str, type[BlockCheckpoint]] = {"full": FullCheckpoint, "selective": SelectiveCheckpoint}


class AttentionRecord:
    """The self-attention output of one block forward, kept for that block's recompute."""

    def __init__(self) -> None:
        self.output: torch.Tensor | None = None


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class KeptAttention:
    """AttentionFn wrapper for `selective`: the inner attention's saved tensors bypass the
    enclosing checkpoint, and inside a recompute it returns the recorded output.

    Outside a selective block forward (no record set) it is the inner function unchanged.
    """

    def __init__(self, inner: AttentionFn) -> None:
        self.inner = inner
        self.record: AttentionRecord | None = None

    def using(self, record: AttentionRecord) -> "_Using":
        return _Using(self, record)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        record = self.record
        if record is None:
            return self.inner(q, k, v, key_padding_mask)
        if record.output is not None:  # recompute: the output of the original forward
            return record.output
        # Identity pack/unpack hooks shadow the checkpoint's: what attention saves for its
        # backward (q, k, v, out, lse; ring/Ulysses buffers) stays in memory.
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            record.output = self.inner(q, k, v, key_padding_mask)  # (B, H, N, Dh)
        return record.output


class _Using:
    def __init__(self, kept: KeptAttention, record: AttentionRecord) -> None:
        self.kept, self.record = kept, record

    def __enter__(self) -> None:
        self.previous, self.kept.record = self.kept.record, self.record

    def __exit__(self, *exc: Any) -> None:
        self.kept.record = self.previous


def checkpointing_summary(model: DiT) -> dict[str, int]:
    """Blocks per checkpointing mode of a DiT or a pipeline stage, for logs and tests."""
    counts: dict[str, int] = dict.fromkeys(AC_MODES, 0)
    for index in model.held_blocks():
        hook = model.block(index).checkpoint
        counts["none" if hook is None else hook.mode] += 1
    return counts
