"""Explicit FLOPs model of the DiT (a multiply-add = 2 FLOPs), for achieved FLOP/s, MFU and HFU.

Counts the matrix multiplications (linears and the two attention products); norms,
activations, RoPE and the residual arithmetic are O(N*D) and left out, as in the usual
6*params*tokens estimate. Timesteps are per sample (cond is one token): adaLN and the
timestep MLP then run once per sample. tests/test_flops.py checks this against a hand count
and against torch.utils.flop_counter.FlopCounterMode on the tiny model.

Model FLOPs (MFU) are forward + backward, backward = 2 x forward (grad of input and of
weight). With LoRA (train.lora.rank > 0) the base is frozen: its backward computes only the
input gradients (1 x forward), the adapters' low-rank products count forward + backward
(`lora_forward_flops`). What activation checkpointing re-runs on top (HFU) is train/recompute.py.
"""
from __future__ import annotations

import fnmatch
import math

from megasora.models.dit import DiTArch
from megasora.models.wan import MODULATIONS, WanArch, text_rows

TIMESTEP_FREQ_DIM = 256  # models/embeddings.py TimestepEmbedder's sinusoidal width


def attended_text_tokens(arch: DiTArch, caption_tokens: int) -> int:
    """Text tokens the blocks compute: the caption's; Wan's zero-padded text_len context costs the
    caption's tokens plus the one that stands for all the padding (models/wan.py text_rows)."""
    return text_rows(caption_tokens, arch.text_len) if isinstance(arch, WanArch) else caption_tokens


def ffn_width(arch: DiTArch) -> int:
    """The MLP's hidden width: hidden * mlp_ratio, or the Wan family's ffn_dim."""
    return arch.ffn_width if isinstance(arch, WanArch) else int(arch.hidden * arch.mlp_ratio)


def block_forward_flops(arch: DiTArch, tokens: int, text_tokens: int) -> dict[str, float]:
    """One block's forward FLOPs for one sample, split into `self_attention` (QK^T and AV of the
    spacetime attention: what selective checkpointing keeps) and `rest`."""
    d, n, l = arch.hidden, tokens, text_tokens
    mlp = ffn_width(arch)
    # adaLN modulation (per-sample conditioning); a Wan block adds its table to the shared projection
    adaln = 0 if isinstance(arch, WanArch) else 2 * d * 6 * d
    self_attention = 2 * 2 * n * n * d      # scores QK^T and weighted sum AV
    rest = (
        2 * n * 4 * d * d                   # self-attention q, k, v, out projections
        + 2 * n * 2 * d * d                 # cross-attention q and out projections on video tokens
        + 2 * l * 2 * d * d                 # cross-attention k, v projections on text tokens
        + 2 * 2 * n * l * d                 # cross-attention scores and weighted sum
        + 2 * n * 2 * d * mlp               # MLP fc1 + fc2
        + adaln
    )
    return {"self_attention": float(self_attention), "rest": float(rest)}


def embed_forward_flops(arch: DiTArch, tokens: int, text_tokens: int) -> float:
    """Everything outside the blocks: patch embedding, timestep MLP, caption projection(s), final layer.

    Wan: its own sinusoid width (freq_dim), the shared 6D time projection once per sample, no
    pooled caption, and an output head without a modulation linear (table + time embedding)."""
    d, n, l = arch.hidden, tokens, text_tokens
    patch_in = arch.in_channels * math.prod(arch.patch)
    if isinstance(arch, WanArch):
        return float(
            2 * n * patch_in * d                        # patch embedding (Conv3d = a linear per patch)
            + 2 * (arch.freq_dim * d + d * d)           # timestep MLP (per sample)
            + 2 * d * MODULATIONS * d                   # shared time projection (per sample)
            + 2 * l * (arch.text_dim * d + d * d)       # caption projection over text_len tokens
            + 2 * n * d * patch_in                      # proj_out
        )
    return float(
        2 * n * patch_in * d                            # patch embedding
        + 2 * (TIMESTEP_FREQ_DIM * d + d * d)           # timestep MLP (per sample)
        + 2 * l * (arch.text_dim * d + d * d)           # caption projection
        + 2 * (arch.text_dim * d + d * d) * arch.pooled_text  # pooled caption MLP (per sample)
        + 2 * d * 2 * d                                 # final adaLN (per sample)
        + 2 * n * d * patch_in                          # final linear
    )


def block_linears(arch: DiTArch) -> dict[str, tuple[int, int, bool, str]]:
    """A block's linears LoRA can adapt (both families name them alike): name -> (in, out, text, split);
    `text` when it runs on the caption tokens (cross-attention k, v), `split` its tensor-parallel cut
    (parallel/tensor.py TP_PLAN: column = output rows, row = input columns)."""
    d, m = arch.hidden, ffn_width(arch)
    out = {f"{attn}.{proj}": (d, d, attn == "cross_attn" and proj in ("k", "v"), "row" if proj == "out" else "column")
           for attn in ("attn", "cross_attn") for proj in ("q", "k", "v", "out")}
    out.update({"mlp.fc1": (d, m, False, "column"), "mlp.fc2": (m, d, False, "row")})
    return out


def lora_block_targets(arch: DiTArch, targets: tuple[str, ...]) -> list[str]:
    """The block linears train.lora.targets adapts (parallel/lora.py matches' rule: a full name or a
    dotted suffix, shell wildcards; judged on block 0's names). Adapters outside the blocks (patch
    embedding, caption, final layer) are not counted: a few tokens' worth, and no preset has them."""
    return [name for name in block_linears(arch)
            if any(fnmatch.fnmatchcase(f"blocks.0.{name}", p) or fnmatch.fnmatchcase(f"blocks.0.{name}", f"*.{p}")
                   for p in targets)]


def lora_forward_flops(arch: DiTArch, tokens: int, text_tokens: int, rank: int, targets: tuple[str, ...]) -> float:
    """Forward FLOPs of one sample's adapters over all blocks: B (A x), 2 r (in + out) per token."""
    linears = block_linears(arch)
    per_block = sum(2 * (text_tokens if linears[name][2] else tokens) * rank * (linears[name][0] + linears[name][1])
                    for name in lora_block_targets(arch, targets))
    return float(arch.depth * per_block)


def dit_forward_flops(arch: DiTArch, tokens: int, text_tokens: int) -> float:
    """Forward FLOPs of one sample with `tokens` video tokens and `text_tokens` caption tokens."""
    block = sum(block_forward_flops(arch, tokens, text_tokens).values())
    return arch.depth * block + embed_forward_flops(arch, tokens, text_tokens)


def dit_train_flops(arch: DiTArch, tokens: int, text_tokens: int, lora_rank: int = 0,
                    lora_targets: tuple[str, ...] = ()) -> float:
    """Model FLOPs of one training sample: forward + backward (backward = 2 x forward). With LoRA
    (`lora_rank` > 0) the frozen base's backward drops its weight-gradient products
    (frozen_backward_flops: about 1 x forward) and the adapters add 3 x their forward."""
    forward = dit_forward_flops(arch, tokens, text_tokens)
    if not lora_rank:
        return 3.0 * forward
    return forward + frozen_backward_flops(arch, tokens, text_tokens) + 3.0 * lora_forward_flops(
        arch, tokens, text_tokens, lora_rank, lora_targets)


def frozen_backward_flops(arch: DiTArch, tokens: int, text_tokens: int) -> float:
    """Backward FLOPs of the frozen base under LoRA: the input gradients the adapters need. Per block
    the linears' forward products once (no weight gradients) but for what only conditioning or the
    caption feeds (adaLN, the cross-attention k/v projections), self-attention's products twice (dQ,
    dK, dV, dS: as in full training) and the cross-attention's once (dQ and dS; the caption needs no
    dK, dV); the final linear's input gradient; none in the embeddings. (Block 0's cross-attention
    and q/k/v inputs, upstream of every adapter, need none either: counted anyway, < 1/depth.)"""
    d, l, n = arch.hidden, text_tokens, tokens
    block = block_forward_flops(arch, tokens, text_tokens)
    adaln = 0 if isinstance(arch, WanArch) else 2 * d * 6 * d
    text_side = 2 * l * 2 * d * d  # cross-attention k, v projections
    per_block = block["rest"] - adaln - text_side + 2 * block["self_attention"]
    return float(arch.depth * per_block + 2 * n * d * arch.in_channels * math.prod(arch.patch))
