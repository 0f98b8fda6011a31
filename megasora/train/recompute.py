"""Hardware FLOPs (HFU) on top of the model's (models/flops.py): what activation checkpointing
re-runs in backward. `full` repeats a checkpointed block's whole forward, `selective` all of it
except the self-attention products (its output and log-sum-exp are kept).
"""
from __future__ import annotations

from megasora.models.dit import DiTArch
from megasora.models.flops import block_forward_flops
from megasora.parallel.activation_checkpointing import checkpointed_blocks


def dit_recompute_flops(arch: DiTArch, tokens: int, text_tokens: int, mode: str, every: int = 1) -> float:
    """Forward FLOPs re-run in backward by activation checkpointing, for one sample."""
    blocks = len(checkpointed_blocks(arch.depth, mode, every))
    block = block_forward_flops(arch, tokens, text_tokens)
    return blocks * (block["rest"] + (block["self_attention"] if mode == "full" else 0.0))
