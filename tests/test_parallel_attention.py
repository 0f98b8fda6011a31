"""Ulysses, ring and USP attention (forward + backward) against full single-device attention."""
from __future__ import annotations

import pytest
import torch

from megasora.models.attention import local_attention
from megasora.parallel.block_attention import block_backward, block_forward, key_padding_bias
from megasora.parallel.mesh import ParallelLayout, build_mesh
from megasora.parallel.sequence import sequence_attention

from parallel_utils import run_distributed

B, H, N, D = 2, 4, 32, 8
# bf16: inputs, block outputs and gradients are rounded to 8 mantissa bits (rel. eps 2^-8 =
# 3.9e-3) at each of a few stages, on O(1) values; the single-device bf16 SDPA error vs the
# fp32 oracle on these inputs is ~1e-2, and we accept up to 3x that.
BF16_TOL = 3e-2


def make_inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, H, N, D, generator=g) for _ in range(4))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, N - N // 4:] = False  # sample 0: the whole last quarter is padding (empty blocks on 4 ranks)
    mask[1, torch.randperm(N, generator=g)[:5]] = False  # sample 1: scattered padded keys
    return [t.to(dtype) for t in (q, k, v, dout)], mask


def full_attention(q, k, v, dout, mask):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = local_attention(q, k, v, mask)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _sp_worker(rank: int, world: int, cases: list[tuple[int, int, torch.dtype]]):
    """All cases of one world size in one spawn (process start-up dominates on 2 cores)."""
    results = {}
    for ulysses, ring, dtype in cases:
        mesh = build_mesh(ParallelLayout(ulysses=ulysses, ring=ring))
        (q, k, v, dout), mask = make_inputs(dtype)
        c = mesh.rank_in("sp")
        chunk = slice(c * N // world, (c + 1) * N // world)  # sp chunk c = ring * ulysses_size + ulysses
        q, k, v = (t[:, :, chunk].clone().requires_grad_(True) for t in (q, k, v))
        out = sequence_attention(mesh)(q, k, v, mask[:, chunk])
        out.backward(dout[:, :, chunk])
        results[(ulysses, ring, dtype)] = (c, out.detach(), q.grad, k.grad, v.grad)
    return results


LAYOUTS = [(2, 1), (4, 1), (1, 2), (1, 4), (2, 2)]
BF16_LAYOUTS = [(2, 1), (1, 4), (2, 2)]
_CACHE: dict = {}


def run_sp(ulysses: int, ring: int, dtype: torch.dtype):
    world = ulysses * ring
    if world not in _CACHE:
        cases = [(u, r, torch.float32) for u, r in LAYOUTS if u * r == world]
        cases += [(u, r, torch.bfloat16) for u, r in BF16_LAYOUTS if u * r == world]
        _CACHE[world] = run_distributed(_sp_worker, world, cases)
    per_rank = sorted((r[(ulysses, ring, dtype)] for r in _CACHE[world]), key=lambda r: r[0])
    # out, dq, dk, dv reassembled along the sequence
    return [torch.cat([r[i + 1] for r in per_rank], dim=2) for i in range(4)]


@pytest.mark.parametrize("ulysses,ring", LAYOUTS, ids=[f"ulysses{u}xring{r}" for u, r in LAYOUTS])
def test_sequence_attention_fp32_matches_full(ulysses, ring):
    (q, k, v, dout), mask = make_inputs(torch.float32)
    expected = full_attention(q, k, v, dout, mask)
    got = run_sp(ulysses, ring, torch.float32)
    for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
        err = (e - g).abs().max().item()
        assert err <= 1e-5, f"{name}: max abs err {err:.2e} > 1e-5"


@pytest.mark.parametrize("ulysses,ring", BF16_LAYOUTS, ids=[f"ulysses{u}xring{r}" for u, r in BF16_LAYOUTS])
def test_sequence_attention_bf16_matches_full(ulysses, ring):
    (q, k, v, dout), mask = make_inputs(torch.bfloat16)
    oracle = full_attention(*(t.float() for t in (q, k, v, dout)), mask)
    single = full_attention(q, k, v, dout, mask)
    got = run_sp(ulysses, ring, torch.bfloat16)
    for name, o, s, g in zip(("out", "dq", "dk", "dv"), oracle, single, got):
        assert g.dtype == torch.bfloat16
        err = (o - g.float()).abs().max().item()
        single_err = (o - s.float()).abs().max().item()
        assert err <= BF16_TOL, f"{name}: bf16 max abs err {err:.2e} > {BF16_TOL} (single-device: {single_err:.2e})"


@pytest.mark.parametrize("backend", ["cpu_flash", "reference"])
def test_block_kernel_lse_and_backward(backend):
    """One block: output and LSE equal the full softmax; backward from (out, lse) equals autograd."""
    (q, k, v, dout), mask = make_inputs(torch.float32)
    bias = key_padding_bias(mask, q.dtype)
    out, lse = block_forward(q, k, v, bias, backend)
    expected = full_attention(q, k, v, dout, mask)
    scores = (q @ k.transpose(-1, -2)) * D ** -0.5 + bias[:, None, None, :]
    assert (out - expected[0]).abs().max() <= 1e-5
    assert (lse - torch.logsumexp(scores, -1)).abs().max() <= 1e-5
    grads = block_backward(dout, q, k, v, bias, out, lse, backend)
    for e, g in zip(expected[1:], grads):
        assert (e - g).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["cpu_flash", "reference"])
def test_block_kernel_fully_padded_block_has_no_weight(backend):
    (q, k, v, _), _ = make_inputs(torch.float32)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0] = False  # sample 0: every key in this block is padding
    out, lse = block_forward(q, k, v, key_padding_bias(mask, q.dtype), backend)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert torch.isfinite(lse[1]).all()
