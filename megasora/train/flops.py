"""Explicit FLOPs model of the DiT (a multiply-add = 2 FLOPs), for achieved FLOP/s and MFU."""
from __future__ import annotations

from megasora.models.dit import DiTArch


def dit_forward_flops(arch: DiTArch, tokens: int, text_tokens: int) -> float:
    """Forward FLOPs of one sample with `tokens` video tokens and `text_tokens` caption tokens."""
    d, n, l = arch.hidden, tokens, text_tokens
    mlp = int(d * arch.mlp_ratio)
    patch_in = arch.in_channels * arch.patch[0] * arch.patch[1] * arch.patch[2]
    per_block = (
        2 * n * 4 * d * d          # self-attention q, k, v, out projections
        + 2 * 2 * n * n * d        # self-attention scores QK^T and weighted sum AV
        + 2 * n * 2 * d * d        # cross-attention q and out projections on video tokens
        + 2 * l * 2 * d * d        # cross-attention k, v projections on text tokens
        + 2 * 2 * n * l * d        # cross-attention scores and weighted sum
        + 2 * n * 2 * d * mlp      # MLP fc1 + fc2
        + 2 * 6 * d * d            # adaLN modulation (per-sample conditioning)
    )
    embed = 2 * n * patch_in * d + 2 * n * d * patch_in + 2 * l * (arch.text_dim * d + d * d)
    return float(arch.depth * per_block + embed)


def dit_train_flops(arch: DiTArch, tokens: int, text_tokens: int) -> float:
    """Forward + backward (backward ~ 2x forward)."""
    return 3.0 * dit_forward_flops(arch, tokens, text_tokens)
