"""Hot-spot ops of the DiT. Model code calls these names; the backend is chosen by
`set_backend` ("auto" | "fused" | "torch"), so swapping never changes parameters.

- "torch": the pure-PyTorch twins in `reference.py` (they define the semantics).
- "fused": the csrc/ ops (`fused.py`); a one-line error if the compiled extension is missing.
- "auto" (default): fused when the extension loads, else the reference, saying so once at start.

A missing prebuilt extension is JIT-built on first use into TORCH_EXTENSIONS_DIR
(`extension.py`), so fused kernels never vanish silently; `megasora env` shows what runs.

Under "fused"/"auto", inputs the fused kernels do not cover (fp64, other broadcast shapes,
mixed dtypes, learnable RoPE angles) take the reference path; see docs/kernels.md.
`backend()` tells which backend is in effect.
"""
from __future__ import annotations

import logging

import torch

from megasora.errors import EnvironmentProblem
from megasora.kernels import fused, reference
from megasora.launcher.env import launcher_rank

__all__ = [
    "apply_rope",
    "backend",
    "gated_residual",
    "gated_residual_modulated_norm",
    "merge_attention_partials",
    "modulated_norm",
    "normalize",
    "set_backend",
]

BACKENDS = ("auto", "fused", "torch")
logger = logging.getLogger(__name__)

_requested = "auto"
_warned: set[str] = set()
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (details: `megasora env`)"


class KernelsUnavailable(EnvironmentProblem, RuntimeError):
    """model.kernels=fused, but the compiled ops can neither be imported nor JIT-built."""

    kind = "kernels"


def _warn_once(key: str, message: str, level: int = logging.WARNING) -> None:
    """Once per process, and on global rank 0 only: every rank would say the same."""
    if key not in _warned:
        _warned.add(key)
        if launcher_rank() == 0:
            logger.log(level, message)


def set_backend(name: str) -> None:
    """Select "auto", "fused" or "torch" for every op in this package (JIT-building csrc/ if needed)."""
    global _requested
    if name not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS}, got {name!r}")
    if name != "torch":
        fused.ensure_loaded()
    if name == "fused" and not fused.AVAILABLE:
        raise KernelsUnavailable(f"model.kernels=fused but the csrc ops are unavailable ({fused.LOAD_ERROR})",
                                 f"{BUILD_HINT}, or set model.kernels=auto or torch")
    _requested = name
    describe_once()


def describe() -> str:
    """Which implementation runs and why, in one line (the start-up log line and `megasora env`)."""
    if _requested == "torch":
        return "PyTorch reference ops (model.kernels=torch)"
    if not fused.AVAILABLE:
        return f"PyTorch reference ops: {fused.LOAD_ERROR}"
    if fused.CUDA_AVAILABLE:
        cuda = fused.CUDA_HOW
    elif not torch.cuda.is_available():
        cuda = "no CUDA device"
    else:
        cuda = f"reference ops on CUDA tensors ({fused.CUDA_LOAD_ERROR})"
    return f"fused csrc ops on CPU ({fused.HOW}); CUDA: {cuda}"


def describe_once() -> None:
    if backend() == "fused":
        _warn_once("describe", describe(), logging.INFO)  # logger name: megasora.kernels


def backend() -> str:
    """The backend in effect: "fused" or "torch"."""
    if _requested == "torch":
        return "torch"
    fused.ensure_loaded()
    if fused.AVAILABLE:
        return "fused"
    _warn_once("missing", f"megasora.kernels: model.kernels=auto is using the pure-PyTorch reference ops "
               f"({fused.LOAD_ERROR}); {BUILD_HINT}")
    return "torch"


def _fused(*tensors: torch.Tensor) -> bool:
    """Whether to try the fused path for tensors on this device."""
    if backend() != "fused":
        return False
    if tensors[0].device.type == "cuda" and not fused.CUDA_AVAILABLE:
        if _requested == "fused":
            raise KernelsUnavailable(f"model.kernels=fused on CUDA tensors but the CUDA ops are unavailable "
                                     f"({fused.CUDA_LOAD_ERROR})", "rebuild with MEGASORA_CUDA=1 pip install "
                                     "--no-build-isolation -e ., or set model.kernels=auto")
        _warn_once("cuda", "megasora.kernels: CUDA extension megasora._C_cuda not found "
                   f"({fused.CUDA_LOAD_ERROR}); CUDA tensors use the pure-PyTorch reference ops.")
        return False
    return True


def normalize(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              eps: float, norm: str) -> torch.Tensor:
    """LayerNorm ("layer") or RMSNorm ("rms") over the last dim, computed in fp32."""
    if _fused(x) and fused.supports_normalize(x, weight, bias):
        return fused.normalize(x, weight, bias, eps, norm)
    return reference.normalize(x, weight, bias, eps, norm)


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-6, norm: str = "layer") -> torch.Tensor:
    """adaLN: norm(x) * (1 + scale) + shift; x (B, N, D), shift/scale (B, 1, D) or (B, N, D)."""
    if _fused(x) and fused.supports_modulated_norm(x, shift, scale, weight, bias):
        return fused.modulated_norm(x, shift, scale, weight, bias, eps, norm)
    return reference.modulated_norm(x, shift, scale, weight, bias, eps, norm)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y, gate (B, 1, D) or (B, N, D)."""
    if _fused(x) and fused.supports_gated_residual(x, gate, y):
        return fused.gated_residual(x, gate, y)
    return reference.gated_residual(x, gate, y)


def gated_residual_modulated_norm(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    eps: float = 1e-6, norm: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + gate*y and modulated_norm(h), in one pass; returns (h, normed)."""
    if _fused(x) and fused.supports_gated_residual_modulated_norm(x, gate, y, shift, scale, weight, bias):
        return fused.gated_residual_modulated_norm(x, gate, y, shift, scale, weight, bias, eps, norm)
    return reference.gated_residual_modulated_norm(x, gate, y, shift, scale, weight, bias, eps, norm)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: (B, N, H, Dh); cos, sin: (N, Dh/2) in fp32."""
    if _fused(x) and fused.supports_apply_rope(x, cos, sin):
        return fused.apply_rope(x, cos, sin)
    return reference.apply_rope(x, cos, sin)


def merge_attention_partials(out_a: torch.Tensor, lse_a: torch.Tensor,
                             out_b: torch.Tensor, lse_b: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention partials (out (B, H, N, D), lse (B, H, N)) in fp32."""
    if _fused(out_a) and fused.supports_merge_attention_partials(out_a, lse_a, out_b, lse_b):
        return fused.merge_attention_partials(out_a, lse_a, out_b, lse_b)
    return reference.merge_attention_partials(out_a, lse_a, out_b, lse_b)
