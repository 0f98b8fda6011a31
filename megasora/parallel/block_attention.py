"""One block of attention that also returns its log-sum-exp, plus the matching backward.

Ring attention computes attention against one K/V block at a time and merges the partial
results with their LSE, so it needs kernels that expose the LSE and a backward that takes
the *global* output and LSE (flash-attention's recomputation form):

    P = exp(S - lse_global),  D = rowsum(dO * O_global),  dS = P * (dO V^T - D)

which gives each block's exact share of dQ and its exact dK, dV. The ring sums those dK/dV
shares hop by hop in fp32 accumulators and sends them in fp32. Chosen by measurement on the
ring's own arithmetic with bf16 inputs (bench/bench_ring_dkv_precision.py, docs/benchmarks.md):
fp32 accumulators keep dK/dV as close to the fp64 oracle as the single-device bf16 kernel
(3.5e-3 relative at 4 and at 8 hops), bf16 accumulators add error that grows with the hops
(+16% at 4, +37% at 8: 4.8e-3, past the single-device kernel's 3.9e-3), for half the bytes of
the dK/dV transfers. The planner counts those transfers at 4 bytes (plan/communication.py).

Kernels (`KERNELS`), each a forward returning (out, lse) and a backward from the global
(out, lse):

- CUDA, fastest first where the GPU runs several: `fa3` (FlashAttention-3's
  `flash_attn_interface`, Hopper only, when installed), `cudnn`
  (aten `_scaled_dot_product_cudnn_attention`, sm80+, fastest on sm90), `flash`
  (aten `_scaled_dot_product_flash_attention`, FlashAttention-2, sm80+), `efficient`
  (aten memory-efficient attention, sm50+, the only one that takes fp32).
- `cpu_flash`: aten `_scaled_dot_product_flash_attention_for_cpu` (a flash kernel with an LSE
  output and backward; it takes the padding as an attention mask, exactly).
- `reference`: plain PyTorch matmuls in fp32 on any device, the test oracle.

`auto` picks per device and GPU capability (`runnable_kernels`): sm90 -> fa3 or cudnn, sm80 ->
flash, older -> efficient, CPU -> cpu_flash; fp32 inputs on CUDA take `efficient`. A kernel the
GPU cannot run is one line naming the GPU and the kernels it runs (`choose_kernel`).

Padding. Masks are key-padding biases (B, Nk) in the input dtype: 0 for real keys, -inf for
padding (they travel with their K/V block around the ring). The CUDA kernels never see an
additive bias: a padded block runs the kernel's variable-length form, the keys of each sample
packed together (`pack_keys`: a device-side permutation, no host sync) and described by
cumulative lengths, so padded keys are simply absent; gradients are unpacked and padded keys
get zero. cuDNN has no such form here, so a padded block under `cudnn` runs FlashAttention-2's.
A block whose keys are all padding for a sample has lse = -inf for that sample (masked on the
device, never tested on the host), so the fp32 merge gives it zero weight.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megasora.config import ATTENTION_KERNELS
from megasora.errors import EnvironmentProblem

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
CUDA_KERNELS = ("fa3", "cudnn", "flash", "efficient")
KERNELS = CUDA_KERNELS + ("cpu_flash", "reference")
HALF_ONLY = ("fa3", "cudnn", "flash")  # fp16 / bf16 inputs only
assert set(ATTENTION_KERNELS) == {"auto", *KERNELS}, "config.ATTENTION_KERNELS lists these kernels"


class AttentionKernelUnavailable(EnvironmentProblem, ValueError):
    """model.attention_kernel names a kernel this GPU (or dtype) cannot run."""

    kind = "attention"


# ------------------------------------------------------------------ which kernel

@dataclass(frozen=True)
class Accelerator:
    """What decides the kernel: a GPU's name and compute capability, whether FA3 is installed.
    capability None = not a CUDA device."""
    name: str
    capability: tuple[int, int] | None = None
    fa3: bool = False

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def of(device: torch.device) -> Accelerator:
        if device.type != "cuda":
            return Accelerator(device.type)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Accelerator(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index),
                      importlib.util.find_spec("flash_attn_interface") is not None)

    def describe(self) -> str:
        return self.name if self.capability is None else f"{self.name} (sm{self.capability[0]}{self.capability[1]})"


def runnable_kernels(device: Accelerator) -> list[str]:
    """The kernels `device` runs, fastest first (the first is what `auto` takes for 16-bit inputs)."""
    cap = device.capability
    if cap is None:
        return ["cpu_flash", "reference"] if device.name == "cpu" else ["reference"]
    fastest = []
    if cap[0] == 9 and device.fa3:  # FA3's kernels are built for Hopper only
        fastest.append("fa3")
    if cap >= (9, 0):  # Hopper and later: cuDNN's fused attention beats FlashAttention-2
        fastest += ["cudnn", "flash"]
    elif cap >= (8, 0):
        fastest += ["flash", "cudnn"]
    return fastest + ["efficient", "reference"]


def choose_kernel(requested: str, device: Accelerator, dtype: torch.dtype = torch.bfloat16) -> str:
    """`requested` (a name or `auto`) resolved for `device` and the input dtype, or one line saying why not."""
    if requested not in ATTENTION_KERNELS:
        raise AttentionKernelUnavailable(f"unknown attention kernel {requested!r}",
                                         f"use one of {', '.join(ATTENTION_KERNELS)}")
    on_device = runnable_kernels(device)
    runnable = [k for k in on_device if dtype in (torch.float16, torch.bfloat16) or k not in HALF_ONLY]
    if requested == "auto":
        return runnable[0]
    if requested not in runnable:
        why = f" in {str(dtype).replace('torch.', '')}" if requested in on_device else ""  # the dtype is why
        raise AttentionKernelUnavailable(
            f"attention kernel {requested} cannot run on {device.describe()}{why}",
            f"it runs {', '.join(runnable)}; set model.attention_kernel to one of those or auto")
    return requested


def kernel_for(q: torch.Tensor, requested: str) -> str:
    return choose_kernel(requested, Accelerator.of(q.device), q.dtype)


# ------------------------------------------------------------------ forward / backward

def key_padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, Nk) bool True=real -> additive bias (B, Nk): 0 real, -inf padding."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))


def _mask_empty(out: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples whose keys in this block are all padding: out 0, lse -inf (device ops only:
    asking the host whether any exist would sync it on every ring step)."""
    if bias is None:
        return out, lse
    empty = torch.isneginf(bias).all(dim=-1)  # (B,)
    lse = lse.masked_fill(empty[:, None, None], float("-inf"))
    out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out, lse


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Nq, D), k/v (B, H, Nk, D), bias (B, Nk) -> out (B, H, Nq, D) q.dtype, lse (B, H, Nq) fp32."""
    kernel = kernel_for(q, backend)
    if kernel == "cpu_flash":
        mask = None if bias is None else bias[:, None, None, :]  # (B, 1, 1, Nk)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)
    elif kernel == "reference":
        out, lse = _reference_forward(q, k, v, bias)
    elif bias is None:
        out, lse = _DENSE[kernel].forward(q, k, v)
    else:
        out, lse = _varlen_forward(_VARLEN[kernel], q, k, v, bias)
    return _mask_empty(out, lse.float(), bias)


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                   backend: str = "auto") -> Grads:
    """Gradients of this block given the GLOBAL out (q.dtype) and lse (fp32) of the rows of q."""
    kernel = kernel_for(q, backend)
    if kernel == "cpu_flash":
        mask = None if bias is None else bias[:, None, None, :]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse.contiguous(), 0.0, False, attn_mask=mask)
    if kernel == "reference":
        return _reference_backward(dout, q, k, v, bias, out, lse)
    dout = dout.contiguous()  # cuDNN wants dO laid out like O (contiguous, as the ring saves it)
    if bias is None:
        return _DENSE[kernel].backward(dout, q, k, v, out, lse)
    return _varlen_backward(_VARLEN[kernel], dout, q, k, v, bias, out, lse)


class _BlockAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, backend: str):
        out, lse = block_forward(q, k, v, bias, backend)
        out = out.contiguous()
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, out, lse = ctx.saved_tensors
        dq, dk, dv = block_backward(dout.contiguous(), q, k, v, bias, out, lse, ctx.backend)
        return dq, dk, dv, None, None


class BlockAttention:
    """AttentionFn on one device through a chosen kernel (what the ring runs per block):
    q, k, v (B, H, N, Dh), key_padding_mask (B, N) bool."""

    def __init__(self, kernel: str = "auto") -> None:
        self.kernel = kernel

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        bias = key_padding_bias(key_padding_mask, q.dtype)
        return _BlockAttentionFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias, self.kernel)


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


# ------------------------------------------------------------------ CUDA: dense blocks

def _zero(q: torch.Tensor) -> torch.Tensor:
    """Dropout's philox seed / offset: unused at dropout 0, but the ops take tensors."""
    return torch.zeros((), dtype=torch.int64, device=q.device)


def _bshd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # (B, H, N, D) -> (B, N, H, D) view, last dim contiguous


@dataclass(frozen=True)
class DenseKernel:
    """forward(q, k, v) -> (out (B, H, Nq, D), lse (B, H, Nq)); backward(dout, q, k, v, out, lse) -> grads."""
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., Grads]


def _cudnn_forward(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    return out, lse.reshape(q.shape[:3])  # cuDNN keeps a trailing 1: (B, H, Nq, 1)


def _cudnn_backward(dout, q, k, v, out, lse) -> Grads:
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.reshape(q.shape[:3] + (1,)).contiguous(), _zero(q), _zero(q), None, None, None,
        q.shape[2], k.shape[2], 0.0, False)
    return grads[0], grads[1], grads[2]


def _flash_forward(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    return out, lse


def _flash_backward(dout, q, k, v, out, lse) -> Grads:
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, False, _zero(q), _zero(q))
    return grads[0], grads[1], grads[2]


def _efficient_forward(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    return out, lse[..., :q.shape[2]]  # the kernel pads the LSE's row dim to a multiple of 32


def _pad_lse(lse: torch.Tensor) -> torch.Tensor:
    """(..., Nq) -> (..., Nq rounded up to 32): the memory-efficient backward reads the padded rows."""
    nq = lse.shape[-1]
    return F.pad(lse, (0, -nq % 32), value=float("inf"))


def _efficient_backward(dout, q, k, v, out, lse) -> Grads:
    grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, _pad_lse(lse), _zero(q), _zero(q), 0.0, [True, True, True, False], False)
    return grads[0], grads[1], grads[2]


def _fa3():
    import flash_attn_interface  # lazy: optional, FlashAttention 3 exists only on Hopper GPUs
    return flash_attn_interface


def _fa3_forward(q, k, v):
    out, lse = _fa3()._flash_attn_forward(_bshd(q), _bshd(k), _bshd(v), softmax_scale=q.shape[-1] ** -0.5)[:2]
    return out.transpose(1, 2), lse  # (B, Nq, H, D) -> (B, H, Nq, D); lse (B, H, Nq)


def _fa3_backward(dout, q, k, v, out, lse) -> Grads:
    dq, dk, dv = (torch.empty_like(_bshd(t).contiguous()) for t in (q, k, v))
    _fa3()._flash_attn_backward(_bshd(dout), _bshd(q), _bshd(k), _bshd(v), _bshd(out), lse.contiguous(),
                                dq=dq, dk=dk, dv=dv, softmax_scale=q.shape[-1] ** -0.5)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


_DENSE = {
    "cudnn": DenseKernel(_cudnn_forward, _cudnn_backward),
    "flash": DenseKernel(_flash_forward, _flash_backward),
    "efficient": DenseKernel(_efficient_forward, _efficient_backward),
    "fa3": DenseKernel(_fa3_forward, _fa3_backward),
}


# ------------------------------------------------------------------ CUDA: padded blocks (variable length)

@dataclass(frozen=True)
class PackedKeys:
    """The keys of a (B, Nk) block with each sample's real keys packed together.

    dest (B*Nk,): packed row of key (b, j); real keys fill rows [0, cu_k[B]) sample by sample,
    padded keys the rest, which no sample's range covers. cu_q / cu_k (B+1,) int32 cumulative
    lengths (queries are never packed: sample b's rows are [b*Nq, (b+1)*Nq))."""
    dest: torch.Tensor
    real: torch.Tensor     # (B, Nk) bool
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def pack_keys(bias: torch.Tensor, nq: int) -> PackedKeys:
    """The packing of a block's keys from its (B, Nk) padding bias, computed on the device."""
    b, nk = bias.shape
    real = ~torch.isneginf(bias)  # (B, Nk)
    before = real.long().cumsum(1)  # real keys of the sample up to and including j
    cu_k = F.pad(before[:, -1].cumsum(0), (1, 0))  # (B+1,)
    flat = torch.arange(b * nk, device=bias.device).view(b, nk)
    start = cu_k[:-1, None]
    # real key: its sample's start + its rank among the sample's real keys; padded key: after
    # every real key, in order (padded keys before it: flat - real keys up to it and in earlier samples)
    dest = torch.where(real, start + before - 1, cu_k[-1] + flat - start - before).reshape(-1)
    cu_q = torch.arange(b + 1, device=bias.device, dtype=torch.int32) * nq
    return PackedKeys(dest, real, cu_q, cu_k.to(torch.int32), nq, nk)


def _pack(t: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B*N, H, D) with row i of the flat (b, n) order at packed row dest[i]."""
    flat = t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])
    return torch.empty_like(flat).index_copy_(0, dest, flat)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B*N, H, D): the query-side layout (never permuted)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


def _unrows(t: torch.Tensor, b: int) -> torch.Tensor:
    """(B*N, H, D) -> (B, H, N, D) view."""
    return t.view(b, -1, t.shape[1], t.shape[2]).transpose(1, 2)


@dataclass(frozen=True)
class VarlenKernel:
    """Packed form: forward(qp, kp, vp, packed) -> (out (B*Nq, H, D), lse (H, B*Nq));
    backward(dout_p, qp, kp, vp, out_p, lse (H, B*Nq), packed) -> (dq (B*Nq, H, D), dk, dv (B*Nk, H, D) packed)."""
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., Grads]


def _varlen_forward(kernel: VarlenKernel, q, k, v, bias):
    b, h, nq, _ = q.shape
    packed = pack_keys(bias, nq)
    out, lse = kernel.forward(_rows(q), _pack(k, packed.dest), _pack(v, packed.dest), packed)
    return _unrows(out, b), lse.view(h, b, nq).transpose(0, 1)  # (B, H, Nq, D), (B, H, Nq)


def _varlen_backward(kernel: VarlenKernel, dout, q, k, v, bias, out, lse) -> Grads:
    b, h, nq, _ = q.shape
    packed = pack_keys(bias, nq)
    lse_p = lse.transpose(0, 1).reshape(h, b * nq).contiguous()  # (H, B*Nq)
    dq, dk, dv = kernel.backward(_rows(dout), _rows(q), _pack(k, packed.dest), _pack(v, packed.dest),
                                 _rows(out), lse_p, packed)
    pad = ~packed.real[:, None, :, None]  # (B, 1, Nk, 1): the kernel never wrote these rows
    dk, dv = (_unrows(t.index_select(0, packed.dest), b).masked_fill(pad, 0.0) for t in (dk, dv))
    empty = ~packed.real.any(dim=1)  # (B,): no key, no share of dQ
    return _unrows(dq, b).masked_fill(empty[:, None, None, None], 0.0), dk, dv


def _flash_varlen_forward(qp, kp, vp, p: PackedKeys):
    out, lse = torch.ops.aten._flash_attention_forward(qp, kp, vp, p.cu_q, p.cu_k, p.max_q, p.max_k, 0.0,
                                                       False, False)[:2]
    return out, lse


def _flash_varlen_backward(dout, qp, kp, vp, out, lse, p: PackedKeys) -> Grads:
    return torch.ops.aten._flash_attention_backward(dout, qp, kp, vp, out, lse, p.cu_q, p.cu_k, p.max_q, p.max_k,
                                                    0.0, False, _zero(qp), _zero(qp))


def _efficient_varlen_forward(qp, kp, vp, p: PackedKeys):
    """The memory-efficient kernel's varlen form: (1, total, H, D) inputs, lse (B, H, Nq padded to 32)."""
    out, lse = torch.ops.aten._efficient_attention_forward(qp[None], kp[None], vp[None], None, p.cu_q, p.cu_k,
                                                           p.max_q, p.max_k, 0.0, 0, True)[:2]
    b, h = lse.shape[:2]
    return out[0], lse[..., :p.max_q].transpose(0, 1).reshape(h, b * p.max_q)


def _efficient_varlen_backward(dout, qp, kp, vp, out, lse, p: PackedKeys) -> Grads:
    h = lse.shape[0]
    lse_b = _pad_lse(lse.view(h, -1, p.max_q).transpose(0, 1)).contiguous()  # (B, H, Nq padded)
    grads = torch.ops.aten._efficient_attention_backward(
        dout[None], qp[None], kp[None], vp[None], None, out[None], p.cu_q, p.cu_k, p.max_q, p.max_k, lse_b, 0.0,
        _zero(qp), _zero(qp), 0, False)
    return grads[0][0], grads[1][0], grads[2][0]


def _fa3_varlen_forward(qp, kp, vp, p: PackedKeys):
    out, lse = _fa3()._flash_attn_forward(qp, kp, vp, cu_seqlens_q=p.cu_q, cu_seqlens_k=p.cu_k,
                                          max_seqlen_q=p.max_q, max_seqlen_k=p.max_k,
                                          softmax_scale=qp.shape[-1] ** -0.5)[:2]
    return out, lse


def _fa3_varlen_backward(dout, qp, kp, vp, out, lse, p: PackedKeys) -> Grads:
    dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
    _fa3()._flash_attn_backward(dout, qp, kp, vp, out, lse, cu_seqlens_q=p.cu_q, cu_seqlens_k=p.cu_k,
                                max_seqlen_q=p.max_q, max_seqlen_k=p.max_k, dq=dq, dk=dk, dv=dv,
                                softmax_scale=qp.shape[-1] ** -0.5)
    return dq, dk, dv


_FLASH_VARLEN = VarlenKernel(_flash_varlen_forward, _flash_varlen_backward)
_VARLEN = {
    "cudnn": _FLASH_VARLEN,  # no varlen form here; every GPU that runs cuDNN attention runs FlashAttention-2
    "flash": _FLASH_VARLEN,
    "efficient": VarlenKernel(_efficient_varlen_forward, _efficient_varlen_backward),
    "fa3": VarlenKernel(_fa3_varlen_forward, _fa3_varlen_backward),
}
