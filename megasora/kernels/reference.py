"""Pure-PyTorch reference implementations of the DiT's memory-bound ops.

These define the semantics. Fused csrc implementations must match them and keep the
same parameter layout, so checkpoints are identical whichever backend runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              eps: float, norm: str) -> torch.Tensor:
    """LayerNorm ("layer") or RMSNorm ("rms") over the last dim, computed in fp32."""
    dtype = x.dtype
    x32 = x.float()
    if norm == "layer":
        y = F.layer_norm(x32, (x.shape[-1],), eps=eps)
    elif norm == "rms":
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-6, norm: str = "layer") -> torch.Tensor:
    """adaLN: norm(x) * (1 + scale) + shift.

    x: (B, N, D); shift, scale: (B, 1, D) per-sample or (B, N, D) per-token.
    """
    return normalize(x, weight, bias, eps, norm) * (1 + scale) + shift


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y, gate (B, 1, D) or (B, N, D)."""
    return x + gate * y


def gated_residual_modulated_norm(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    eps: float = 1e-6, norm: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's seam between sublayers: h = x + gate*y, then modulated_norm(h).

    Returns (h, modulated_norm(h)); h is the residual stream, the second feeds the next sublayer.
    """
    h = gated_residual(x, gate, y)
    return h, modulated_norm(h, shift, scale, weight, bias, eps, norm)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: (B, N, H, Dh); cos, sin: (N, Dh/2) in fp32.

    Pair i is (x[..., i], x[..., i + Dh/2]) rotated by angle theta[n, i].
    """
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    c = cos[None, :, None, :]  # (1, N, 1, Dh/2)
    s = sin[None, :, None, :]
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return out.to(x.dtype)


def merge_attention_partials(out_a: torch.Tensor, lse_a: torch.Tensor,
                             out_b: torch.Tensor, lse_b: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two softmax-attention partials over disjoint key sets, in fp32.

    out_*: (B, H, N, D); lse_*: (B, H, N) log-sum-exp of the scores of each partial.
    Stable form: lse = lse_a + log1p(exp(lse_b - lse_a)) written with max/min so the
    exponent is never positive; fully masked rows (lse = -inf) contribute nothing.
    Returns (out fp32, lse fp32).
    """
    lse_a32, lse_b32 = lse_a.float(), lse_b.float()
    hi = torch.maximum(lse_a32, lse_b32)
    lo = torch.minimum(lse_a32, lse_b32)
    hi_safe = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    lse = hi + torch.log1p(torch.exp(lo - hi_safe))
    lse = torch.where(torch.isfinite(hi), lse, hi)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a32 - lse_safe).unsqueeze(-1)
    w_b = torch.exp(lse_b32 - lse_safe).unsqueeze(-1)
    out = w_a * out_a.float() + w_b * out_b.float()
    return out, lse
