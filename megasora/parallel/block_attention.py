"""One block of attention that also returns its log-sum-exp, plus the matching backward.

Ring attention computes attention against one K/V block at a time and merges the partial
results with their LSE, so it needs kernels that expose the LSE and a backward that takes
the *global* output and LSE (flash-attention's recomputation form):

    P = exp(S - lse_global),  D = rowsum(dO * O_global),  dS = P * (dO V^T - D)

which gives each block's exact share of dQ and its exact dK, dV.

Backends: CPU -> aten._scaled_dot_product_flash_attention_for_cpu (a flash kernel with an
LSE output and backward); CUDA -> aten._scaled_dot_product_efficient_attention (supports an
additive bias, returns LSE); `reference` -> plain PyTorch matmuls in fp32, used as the
fallback for other devices and as the test oracle.

Masks are key-padding biases (B, Nk) in the input dtype: 0 for real keys, -inf for padding.
A block whose keys are all padding for a sample has lse = -inf for that sample, so the
fp32 merge gives it zero weight.
"""
from __future__ import annotations

import torch

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def key_padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, Nk) bool True=real -> additive bias (B, Nk): 0 real, -inf padding."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))


def _empty_block_rows(bias: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) True where every key of this block is padding."""
    if bias is None:
        return None
    return torch.isneginf(bias).all(dim=-1)


def _mask_empty(out: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    empty = _empty_block_rows(bias)
    if empty is None or not bool(empty.any()):
        return out, lse
    lse = lse.masked_fill(empty[:, None, None], float("-inf"))
    out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out, lse


def pick_backend(device: torch.device, backend: str = "auto") -> str:
    if backend != "auto":
        return backend
    return {"cpu": "cpu_flash", "cuda": "cuda_efficient"}.get(device.type, "reference")


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Nq, D), k/v (B, H, Nk, D), bias (B, Nk) -> out (B, H, Nq, D) q.dtype, lse (B, H, Nq) fp32."""
    backend = pick_backend(q.device, backend)
    if backend == "cpu_flash":
        mask = None if bias is None else bias[:, None, None, :]  # (B, 1, 1, Nk)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)
    elif backend == "cuda_efficient":
        out, lse = _cuda_forward(q, k, v, bias)
    elif backend == "reference":
        out, lse = _reference_forward(q, k, v, bias)
    else:
        raise ValueError(f"unknown attention block backend {backend!r} (auto, cpu_flash, cuda_efficient, reference)")
    return _mask_empty(out, lse.float(), bias)


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                   backend: str = "auto") -> Grads:
    """Gradients of this block given the GLOBAL out (q.dtype) and lse (fp32) of the rows of q."""
    backend = pick_backend(q.device, backend)
    if backend == "cpu_flash":
        mask = None if bias is None else bias[:, None, None, :]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse.contiguous(), 0.0, False, attn_mask=mask)
    if backend == "cuda_efficient":
        return _cuda_backward(dout, q, k, v, bias, out, lse)
    if backend == "reference":
        return _reference_backward(dout, q, k, v, bias, out, lse)
    raise ValueError(f"unknown attention block backend {backend!r}")


# ------------------------------------------------------------------ reference (fp32 matmuls)

def _scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    if bias is not None:
        s = s + bias.float()[:, None, None, :]
    return s


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(s - finite[..., None]) * torch.isfinite(lse)[..., None]


def _reference_forward(q, k, v, bias):
    s = _scores(q, k, bias)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Nq), -inf for empty rows
    out = torch.matmul(_probs(s, lse), v.float())
    return out.to(q.dtype), lse


def _reference_backward(dout, q, k, v, bias, out, lse) -> Grads:
    scale = q.shape[-1] ** -0.5
    p = _probs(_scores(q, k, bias), lse.float())  # (B, H, Nq, Nk)
    do = dout.float()
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.float().transpose(-1, -2))
    delta = (do * out.float()).sum(-1, keepdim=True)  # (B, H, Nq, 1)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k.float()) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------ CUDA (memory-efficient SDPA)

def _cuda_bias(bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    if bias is None:
        return None
    b, h, nq, _ = q.shape
    return bias[:, None, None, :].expand(b, h, nq, bias.shape[-1])


def _cuda_forward(q, k, v, bias):
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, _cuda_bias(bias, q), True)
    return out, lse[..., :q.shape[2]]  # the kernel pads the LSE's row dim to a multiple of 32


def _cuda_backward(dout, q, k, v, bias, out, lse) -> Grads:
    nq = q.shape[2]
    padded = torch.full(lse.shape[:-1] + (-(-nq // 32) * 32,), float("inf"), device=lse.device)
    padded[..., :nq] = lse
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.contiguous(), q, k, v, _cuda_bias(bias, q), out, padded, zero, zero, 0.0,
        [True, True, True, False], False)
    return grads[0], grads[1], grads[2]
