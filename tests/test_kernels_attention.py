"""Block attention kernels (megasora/parallel/block_attention.py) without a GPU.

The CUDA kernels only run on a GPU (bench/gpu_check.sh tests each against the reference
there); what is tested here is everything around them: which kernel each GPU gets and the
one-line refusal, and the variable-length plumbing padded blocks take (key packing, the
packed layouts, unpacking the gradients, empty samples), through a stand-in packed kernel
with the same contract as FlashAttention's varlen form (lse (H, total_q), +inf for a sample
without keys, whatever it likes in the packed rows past the last sample). The plumbing also
runs on the meta device, where any host sync (bool(), .item(), data-dependent shapes) raises.
"""
from __future__ import annotations

import pytest
import torch

from megasora.parallel import block_attention as ba
from megasora.parallel.block_attention import (
    Accelerator,
    AttentionKernelUnavailable,
    VarlenKernel,
    block_forward,
    choose_kernel,
    key_padding_bias,
    pack_keys,
    runnable_kernels,
)

H100 = Accelerator("NVIDIA H100 80GB HBM3", (9, 0))
A100 = Accelerator("NVIDIA A100-SXM4-80GB", (8, 0))
T4 = Accelerator("Tesla T4", (7, 5))


def test_kernels_per_gpu_fastest_first():
    assert runnable_kernels(H100) == ["cudnn", "flash", "efficient", "reference"]
    assert runnable_kernels(Accelerator(H100.name, (9, 0), fa3=True))[0] == "fa3"
    assert runnable_kernels(A100) == ["flash", "cudnn", "efficient", "reference"]
    assert "fa3" not in runnable_kernels(Accelerator(A100.name, (8, 0), fa3=True))  # FA3 is Hopper-only
    assert runnable_kernels(T4) == ["efficient", "reference"]
    assert runnable_kernels(Accelerator("cpu")) == ["cpu_flash", "reference"]
    assert choose_kernel("auto", H100) == "cudnn" and choose_kernel("auto", A100) == "flash"
    assert choose_kernel("auto", H100, torch.float32) == "efficient"  # flash-style kernels are 16-bit only
    assert choose_kernel("flash", H100) == "flash"


@pytest.mark.parametrize("gpu,kernel,dtype", [(T4, "flash", torch.bfloat16), (A100, "fa3", torch.bfloat16),
                                              (H100, "cudnn", torch.float32)])
def test_a_kernel_the_gpu_cannot_run_is_one_line(gpu, kernel, dtype):
    with pytest.raises(AttentionKernelUnavailable) as err:
        choose_kernel(kernel, gpu, dtype)
    line = err.value.line()
    assert "\n" not in line and gpu.name in line and kernel in line
    runnable = runnable_kernels(gpu) if dtype == torch.bfloat16 else ["efficient", "reference"]
    assert f"it runs {', '.join(runnable)}" in line, line


def test_unknown_kernel_names_the_choices():
    with pytest.raises(AttentionKernelUnavailable, match="use one of auto, fa3, cudnn"):
        choose_kernel("flash2", H100)


# ------------------------------------------------------------------ padded blocks: the varlen plumbing

def masks() -> torch.Tensor:
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[0, 9:] = False                  # trailing padding (the sequence shard's)
    mask[1, torch.tensor([0, 3, 4, 10])] = False  # scattered
    mask[2] = False                      # no key at all in this block
    return mask


def test_pack_keys_is_a_permutation_that_groups_each_samples_keys():
    mask = masks()
    p = pack_keys(key_padding_bias(mask, torch.float32), nq=5)
    assert sorted(p.dest.tolist()) == list(range(mask.numel()))
    assert p.cu_k.tolist() == [0, 9, 17, 17, 29] and p.cu_q.tolist() == [0, 5, 10, 15, 20]
    assert p.cu_k.dtype == p.cu_q.dtype == torch.int32
    dest = p.dest.view(mask.shape)
    for b in range(mask.shape[0]):  # real keys in order inside their sample's range, padding after all
        real = dest[b][mask[b]].tolist()
        assert real == list(range(p.cu_k[b], p.cu_k[b + 1]))
        assert all(d >= p.cu_k[-1] for d in dest[b][~mask[b]].tolist())


def _segments(cu: torch.Tensor, total: int) -> torch.Tensor:
    """(total,): the sample each packed row belongs to; rows past the last sample get B."""
    return torch.searchsorted(cu[1:].long(), torch.arange(total, device=cu.device), right=True)


def _packed_probs(qp, kp, p):
    """(H, total_q, total_k) softmax over each query's own sample's keys, and lse (H, total_q)."""
    same = _segments(p.cu_q, qp.shape[0])[:, None] == _segments(p.cu_k, kp.shape[0])[None, :]
    s = torch.einsum("qhd,khd->hqk", qp.float(), kp.float()) * qp.shape[-1] ** -0.5
    s = s.masked_fill(~same, float("-inf"))
    lse = torch.logsumexp(s, -1)
    probs = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]).nan_to_num(0.0)
    return probs, lse


def _fake_forward(qp, kp, vp, p):
    probs, lse = _packed_probs(qp, kp, p)
    out = torch.einsum("hqk,khd->qhd", probs, vp.float()).to(qp.dtype)
    return out, lse.masked_fill(torch.isneginf(lse), float("inf"))  # FlashAttention: +inf without keys


def _fake_backward(dout, qp, kp, vp, out, lse, p):
    """Recomputation backward from the given (global) out and lse, like the real kernels; rows
    of dK/dV past the last sample are left as garbage (NaN), which the caller must not read."""
    same = _segments(p.cu_q, qp.shape[0])[:, None] == _segments(p.cu_k, kp.shape[0])[None, :]
    scale = qp.shape[-1] ** -0.5
    s = torch.einsum("qhd,khd->hqk", qp.float(), kp.float()) * scale
    probs = torch.exp(s - lse[..., None]).masked_fill(~same, 0.0)  # (H, tq, tk)
    do = dout.float()
    dv = torch.einsum("hqk,qhd->khd", probs, do)
    dp = torch.einsum("qhd,khd->hqk", do, vp.float())
    delta = (do * out.float()).sum(-1).transpose(0, 1)[..., None]  # (H, tq, 1)
    ds = probs * (dp - delta)
    dq = torch.einsum("hqk,khd->qhd", ds, kp.float()) * scale
    dk = torch.einsum("hqk,qhd->khd", ds, qp.float()) * scale
    tail = _segments(p.cu_k, kp.shape[0]) == p.cu_k.numel() - 1
    dk, dv = (t.masked_fill(tail[:, None, None], float("nan")) for t in (dk, dv))
    return dq.to(qp.dtype), dk.to(kp.dtype), dv.to(vp.dtype)


FAKE = VarlenKernel(_fake_forward, _fake_backward)


def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 3, 5, 8, generator=g)   # (B, H, Nq, D)
    k, v = (torch.randn(4, 3, 12, 8, generator=g) for _ in range(2))
    dout = torch.randn(4, 3, 5, 8, generator=g)
    return [t.to(device) for t in (q, k, v, dout)]


def test_padded_block_through_the_varlen_plumbing_equals_the_reference():
    q, k, v, dout = _inputs()
    bias = key_padding_bias(masks(), q.dtype)
    want_out, want_lse = block_forward(q, k, v, bias, "reference")
    out, lse = ba._mask_empty(*ba._varlen_forward(FAKE, q, k, v, bias), bias)
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()  # the sample without keys has no weight
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=0)
    # the backward from a GLOBAL out/lse (another block's keys raised them), as the ring calls it
    glob_lse = torch.logaddexp(want_lse, torch.full_like(want_lse, 0.7))
    glob_out = (want_out * 0.5 + 0.1).contiguous()
    want = ba._reference_backward(dout, q, k, v, bias, glob_out, glob_lse)
    got = ba._varlen_backward(FAKE, dout, q, k, v, bias, glob_out, glob_lse)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=name)


def test_padded_block_plumbing_never_syncs_the_host():
    """On the meta device every host sync raises: the padded-block path and the empty-block
    masking run there end to end."""
    q, k, v, dout = _inputs("meta")
    bias = key_padding_bias(masks().to("meta"), q.dtype)
    out, lse = ba._mask_empty(*ba._varlen_forward(FAKE, q, k, v, bias), bias)
    grads = ba._varlen_backward(FAKE, dout, q, k, v, bias, out.contiguous(), lse)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and [g.shape for g in grads] == [q.shape, k.shape,
                                                                                              v.shape]
    block_forward(q, k, v, bias, "reference")  # the ring's per-block path, empty-block masking included


# ------------------------------------------------------------------ one device through a chosen kernel

def test_block_attention_function_matches_sdpa_with_padding():
    """model.attention_kernel without sequence parallelism: BlockAttention (autograd over
    block_forward / block_backward) against torch's SDPA, forward and gradients."""
    from megasora.models.attention import local_attention
    from megasora.parallel.block_attention import BlockAttention
    q, k, v, _ = _inputs()
    k, v = k[:, :, :5], v[:, :, :5]
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 1] = False
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (local_attention, BlockAttention("cpu_flash"), BlockAttention("reference")):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, mask)
        out.backward(dout)
        results.append([out.detach()] + [t.grad for t in leaves])
    for got in results[1:]:
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, results[0]):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=name)


def test_a_cuda_kernel_on_cpu_tensors_is_one_line():
    from megasora.parallel.block_attention import BlockAttention
    q, k, v, _ = _inputs()
    with pytest.raises(AttentionKernelUnavailable) as err:
        BlockAttention("cudnn")(q, k, v)
    assert err.value.line() == ("megasora: attention error: attention kernel cudnn cannot run on cpu; it runs "
                                "cpu_flash, reference; set model.attention_kernel to one of those or auto")
