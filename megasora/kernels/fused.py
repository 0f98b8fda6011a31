"""Python face of the csrc/ ops (namespace `torch.ops.megasora`).

Loading `megasora._C` registers the op schemas and CPU kernels, `megasora._C_cuda` the
CUDA kernels. This module adds what torch needs around them: fake (meta) kernels so
`torch.compile` can trace the ops, and autograd formulas that call the fused backward
ops. The wrappers at the bottom have the same signatures and semantics as
`megasora.kernels.reference`; `supports_*` say whether given inputs can take this path.

Not supported: double backward (the backward ops have no autograd formula of their own).
"""
from __future__ import annotations

import torch

from megasora.kernels import extension

# The prebuilt extensions (setup.py) register torch.ops.megasora.* on import; a missing one is
# JIT-built on first use by ensure_loaded(), called when a backend is chosen (kernels/__init__.py).
_cpu = extension.import_prebuilt("megasora._C")
_cuda = extension.import_prebuilt("megasora._C_cuda") if _cpu.available else extension.Extension()
AVAILABLE, LOAD_ERROR, HOW = _cpu.available, _cpu.error or None, _cpu.how
CUDA_AVAILABLE, CUDA_LOAD_ERROR, CUDA_HOW = _cuda.available, _cuda.error or None, _cuda.how
_tried_jit = False


def ensure_loaded() -> None:
    """JIT-build whatever prebuilt extension is missing, once per process (extension.py)."""
    global AVAILABLE, LOAD_ERROR, HOW, CUDA_AVAILABLE, CUDA_LOAD_ERROR, CUDA_HOW, _tried_jit
    if _tried_jit:
        return
    _tried_jit = True
    if not AVAILABLE:
        cpu = extension.load_cpu()
        AVAILABLE, LOAD_ERROR, HOW = cpu.available, cpu.error or None, cpu.how
        if AVAILABLE:
            _register()
    if AVAILABLE and not CUDA_AVAILABLE:
        cuda = extension.load_cuda()
        CUDA_AVAILABLE, CUDA_LOAD_ERROR, CUDA_HOW = cuda.available, cuda.error or None, cuda.how

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The ops accumulate (and take weights, cos/sin and lse) in fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_acc(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(acc_dtype(dtype))


def _rows(x: torch.Tensor):
    return x.numel() // x.shape[-1]


# ------------------------------------------------------------------ fake kernels + autograd


def _register() -> None:
    lib = "megasora::"

    @torch.library.register_fake(lib + "modulated_norm_fwd")
    def _(x, shift, scale, weight, bias, eps, rms):
        acc = acc_dtype(x.dtype)
        return x.new_empty(x.shape), x.new_empty((_rows(x),), dtype=acc), x.new_empty((_rows(x),), dtype=acc)

    @torch.library.register_fake(lib + "modulated_norm_bwd")
    def _(grad_out, x, mean, rstd, scale, weight, bias, rms):
        def like(t, fallback):
            return t.new_empty(t.shape) if t is not None else fallback.new_empty((0,))
        return x.new_empty(x.shape), like(scale, x), like(scale, x), like(weight, mean), like(bias, mean)

    @torch.library.register_fake(lib + "gated_residual_fwd")
    def _(x, gate, y):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "gated_residual_bwd")
    def _(grad_h, gate, y):
        return gate.new_empty(gate.shape), y.new_empty(y.shape)

    @torch.library.register_fake(lib + "gated_residual_modulated_norm_fwd")
    def _(x, gate, y, shift, scale, weight, bias, eps, rms):
        acc = acc_dtype(x.dtype)
        stats = x.new_empty((_rows(x),), dtype=acc)
        return x.new_empty(x.shape), x.new_empty(x.shape), stats, stats.new_empty(stats.shape)

    @torch.library.register_fake(lib + "gated_residual_modulated_norm_bwd")
    def _(grad_h, grad_out, h, gate, y, mean, rstd, scale, weight, bias, rms):
        def like(t, fallback):
            return t.new_empty(t.shape) if t is not None else fallback.new_empty((0,))
        return (h.new_empty(h.shape), gate.new_empty(gate.shape), h.new_empty(h.shape),
                scale.new_empty(scale.shape), scale.new_empty(scale.shape), like(weight, mean), like(bias, mean))

    @torch.library.register_fake(lib + "apply_rope")
    def _(x, cos, sin, inverse):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "merge_attention_partials_fwd")
    def _(out_a, lse_a, out_b, lse_b):
        return out_a.new_empty(out_a.shape, dtype=lse_a.dtype), lse_a.new_empty(lse_a.shape)

    @torch.library.register_fake(lib + "merge_attention_partials_bwd")
    def _(grad_out, grad_lse, out_a, lse_a, out_b, lse_b, lse):
        return (out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape),
                out_b.new_empty(out_b.shape), lse_b.new_empty(lse_b.shape))

    torch.library.register_autograd(lib + "modulated_norm_fwd", _modulated_norm_bwd,
                                    setup_context=_modulated_norm_setup)
    torch.library.register_autograd(lib + "gated_residual_fwd", _gated_residual_bwd,
                                    setup_context=_gated_residual_setup)
    torch.library.register_autograd(lib + "gated_residual_modulated_norm_fwd", _grmn_bwd,
                                    setup_context=_grmn_setup)
    torch.library.register_autograd(lib + "apply_rope", _rope_bwd, setup_context=_rope_setup)
    torch.library.register_autograd(lib + "merge_attention_partials_fwd", _merge_bwd,
                                    setup_context=_merge_setup)


def _modulated_norm_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, scale, weight, bias)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.rms = rms


def _modulated_norm_bwd(ctx, grad_out, _grad_mean, _grad_rstd):
    x, mean, rstd, scale, weight, bias = ctx.saved_tensors
    gx, gshift, gscale, gw, gb = torch.ops.megasora.modulated_norm_bwd(
        grad_out, x, mean, rstd, scale, weight, bias, ctx.rms)
    has_mod = scale is not None
    return (gx, gshift if has_mod else None, gscale if has_mod else None,
            gw if weight is not None else None, gb if bias is not None else None, None, None)


def _gated_residual_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gated_residual_bwd(ctx, grad_h):
    gate, y = ctx.saved_tensors
    ggate, gy = torch.ops.megasora.gated_residual_bwd(grad_h, gate, y)
    return grad_h, ggate, gy


def _grmn_setup(ctx, inputs, output):
    x, gate, y, shift, scale, weight, bias, eps, rms = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h, gate, y, mean, rstd, scale, weight, bias)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.rms = rms


def _grmn_bwd(ctx, grad_h, grad_out, _grad_mean, _grad_rstd):
    h, gate, y, mean, rstd, scale, weight, bias = ctx.saved_tensors
    gx, ggate, gy, gshift, gscale, gw, gb = torch.ops.megasora.gated_residual_modulated_norm_bwd(
        grad_h, grad_out, h, gate, y, mean, rstd, scale, weight, bias, ctx.rms)
    return (gx, ggate, gy, gshift, gscale, gw if weight is not None else None,
            gb if bias is not None else None, None, None)


def _rope_setup(ctx, inputs, output):
    x, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rope_bwd(ctx, grad_out):
    cos, sin = ctx.saved_tensors
    # A rotation's adjoint is the rotation by -theta. cos/sin get no gradient (buffers).
    return torch.ops.megasora.apply_rope(grad_out, cos, sin, not ctx.inverse), None, None, None


def _merge_setup(ctx, inputs, output):
    out_a, lse_a, out_b, lse_b = inputs
    _, lse = output
    ctx.save_for_backward(out_a, lse_a, out_b, lse_b, lse)


def _merge_bwd(ctx, grad_out, grad_lse):
    out_a, lse_a, out_b, lse_b, lse = ctx.saved_tensors
    return torch.ops.megasora.merge_attention_partials_bwd(
        grad_out.contiguous(), grad_lse.contiguous(), out_a, lse_a, out_b, lse_b, lse)


if AVAILABLE:
    _register()


# ------------------------------------------------------------------ input checks


def device_ok(*tensors: torch.Tensor) -> bool:
    """All on one device that has a compiled kernel."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False
    return dev.type == "cpu" or (dev.type == "cuda" and CUDA_AVAILABLE)


def _dtype_ok(x: torch.Tensor, *same: torch.Tensor) -> bool:
    return x.dtype in FUSED_DTYPES and all(t.dtype == x.dtype for t in same)


def _param_ok(t: torch.Tensor | None, x: torch.Tensor) -> bool:
    return t is None or (t.dim() == 1 and t.shape[0] == x.shape[-1] and t.device == x.device)


def _mod_ok(x: torch.Tensor, *mods: torch.Tensor) -> bool:
    """(B, 1, D) or (B, N, D) modulation, all the same shape, for x (B, N, D)."""
    if x.dim() != 3:
        return False
    B, N, D = x.shape
    shape = mods[0].shape
    return all(m.shape == shape for m in mods) and tuple(shape) in ((B, 1, D), (B, N, D))


def supports_normalize(x, weight, bias) -> bool:
    if x.dim() == 0 or x.shape[-1] == 0:
        return False
    return AVAILABLE and _dtype_ok(x) and device_ok(x) and _param_ok(weight, x) and _param_ok(bias, x)


def supports_modulated_norm(x, shift, scale, weight, bias) -> bool:
    return (supports_normalize(x, weight, bias) and _dtype_ok(x, shift, scale)
            and device_ok(x, shift, scale) and _mod_ok(x, shift, scale))


def supports_gated_residual(x, gate, y) -> bool:
    return (AVAILABLE and _dtype_ok(x, gate, y) and device_ok(x, gate, y)
            and y.shape == x.shape and _mod_ok(x, gate))


def supports_gated_residual_modulated_norm(x, gate, y, shift, scale, weight, bias) -> bool:
    return (supports_gated_residual(x, gate, y) and supports_modulated_norm(x, shift, scale, weight, bias)
            and _mod_ok(x, gate, shift, scale))


def supports_apply_rope(x, cos, sin) -> bool:
    if not (AVAILABLE and x.dim() == 4 and x.shape[-1] % 2 == 0 and _dtype_ok(x) and device_ok(x, cos, sin)):
        return False
    want = (x.shape[1], x.shape[-1] // 2)
    # The fused backward gives cos/sin no gradient, so learnable angles take the reference path.
    return (tuple(cos.shape) == want and tuple(sin.shape) == want
            and not (cos.requires_grad or sin.requires_grad))


def supports_merge_attention_partials(out_a, lse_a, out_b, lse_b) -> bool:
    # out_a and out_b may differ in dtype (ring attention: fp32 running output, bf16 block).
    return (AVAILABLE and out_a.dim() >= 1 and _dtype_ok(out_a) and _dtype_ok(out_b)
            and device_ok(out_a, lse_a, out_b, lse_b)
            and out_a.shape == out_b.shape and lse_a.shape == out_a.shape[:-1] and lse_b.shape == lse_a.shape)


# ------------------------------------------------------------------ wrappers (reference signatures)


def _rms(norm: str) -> bool:
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    return norm == "rms"


def normalize(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              eps: float, norm: str) -> torch.Tensor:
    rms = _rms(norm)
    return torch.ops.megasora.modulated_norm_fwd(
        x, None, None, _to_acc(weight, x.dtype), _to_acc(bias, x.dtype), eps, rms)[0]


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-6, norm: str = "layer") -> torch.Tensor:
    rms = _rms(norm)
    return torch.ops.megasora.modulated_norm_fwd(
        x, shift, scale, _to_acc(weight, x.dtype), _to_acc(bias, x.dtype), eps, rms)[0]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.ops.megasora.gated_residual_fwd(x, gate, y)


def gated_residual_modulated_norm(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    eps: float = 1e-6, norm: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    rms = _rms(norm)
    h, out, _, _ = torch.ops.megasora.gated_residual_modulated_norm_fwd(
        x, gate, y, shift, scale, _to_acc(weight, x.dtype), _to_acc(bias, x.dtype), eps, rms)
    return h, out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    acc = acc_dtype(x.dtype)
    return torch.ops.megasora.apply_rope(x, cos.to(acc), sin.to(acc), False)


def merge_attention_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                             lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = acc_dtype(out_a.dtype)
    if out_a.dtype != out_b.dtype:  # the kernel takes one activation dtype: merge in fp32
        out_a, out_b = out_a.to(acc), out_b.to(acc)
    return torch.ops.megasora.merge_attention_partials_fwd(out_a, lse_a.to(acc), out_b, lse_b.to(acc))
