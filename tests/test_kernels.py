"""csrc/ fused ops vs their pure-PyTorch references (megasora/kernels/reference.py).

Tolerances: fp32 outputs/grads within 1e-5 + 1e-5*max|ref| (1e-4 for summed modulation
grads); bf16/fp16 within 2e-2*max|ref| (the fused path rounds once, the reference after
every op, so they differ by a few ulps). fp64 gradcheck runs on the CPU ops directly.
CUDA cases run the same comparisons and skip without a GPU + CUDA extension.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import megasora.kernels as K
from megasora.kernels import fused, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and fused.CUDA_AVAILABLE), reason="needs a GPU and megasora._C_cuda"))]
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(2, 37, 53), (1, 1, 7), (3, 5, 130), (2, 70, 33)]  # odd sizes; 70 rows > one chunk


def test_cpu_extension_loaded():
    """setup.py always builds megasora._C; a broken build must fail here, not skip."""
    assert fused.AVAILABLE, f"megasora._C not importable ({fused.LOAD_ERROR}); run pip install --no-build-isolation -e ."
    assert K.backend() == "fused"


def tol(dtype: torch.dtype, summed: bool = False) -> float:
    if dtype == torch.float32:
        return 1e-4 if summed else 1e-5
    return 2e-2


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), f"{what}: inf/nan pattern differs"
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    scale = want[finite].abs().max().item() if finite.any() else 0.0
    assert err <= rel * (1 + scale), f"{what}: max err {err:.3g} vs scale {scale:.3g} (rel tol {rel})"


def leaves(tensors, requires_grad=True):
    return [None if t is None else t.detach().clone().requires_grad_(requires_grad and t.is_floating_point())
            for t in tensors]


def compare(fused_fn, ref_fn, inputs, dtype, summed_grad_idx=(), out_idx=None):
    """Run both on copies of `inputs`; compare outputs and the grads of every float input."""
    a_in, r_in = leaves(inputs), leaves(inputs)
    a_out, r_out = fused_fn(*a_in), ref_fn(*r_in)
    a_out = a_out if isinstance(a_out, tuple) else (a_out,)
    r_out = r_out if isinstance(r_out, tuple) else (r_out,)
    torch.manual_seed(1)
    grads = [torch.randn_like(o) for o in r_out]
    for i, (a, r) in enumerate(zip(a_out, r_out)):
        assert_close(a, r, tol(r.dtype if r.dtype != torch.float32 else dtype), f"out{i}")
    mask = out_idx(r_in) if out_idx else None

    def loss(outs):  # -inf outputs (masked merge rows) carry no gradient
        return sum((torch.where(torch.isfinite(o), o, 0.0) * g).sum() for o, g in zip(outs, grads))

    loss_a, loss_r = loss(a_out), loss(r_out)
    want = [t for t in r_in if t is not None and t.requires_grad]
    got = [t for t in a_in if t is not None and t.requires_grad]
    g_a = torch.autograd.grad(loss_a, got, allow_unused=True)
    g_r = torch.autograd.grad(loss_r, want, allow_unused=True)
    for i, (ga, gr) in enumerate(zip(g_a, g_r)):
        assert ga is not None and gr is not None, f"grad {i} missing"
        if mask is not None:
            ga, gr = ga[mask[i]], gr[mask[i]]
        assert_close(ga, gr, tol(dtype, summed=i in summed_grad_idx), f"grad{i}")


def make(shape, dtype, device, noncontig=False, scale=1.0, offset=0.0):
    if noncontig:  # a strided view: last two dims transposed, then every other column
        t = torch.randn(*shape[:-2], shape[-1] * 2, shape[-2], device=device).transpose(-1, -2)[..., ::2]
    else:
        t = torch.randn(*shape, device=device)
    return (t * scale + offset).to(dtype)


def norm_inputs(shape, dtype, device, per_token, noncontig, affine):
    B, N, D = shape
    mshape = (B, N, D) if per_token else (B, 1, D)
    x = make(shape, dtype, device, noncontig, scale=2.0, offset=0.5)  # non-zero mean exercises centring
    shift, scale = make(mshape, dtype, device), make(mshape, dtype, device, noncontig) * 0.5
    w = torch.randn(D, device=device) if affine else None
    b = torch.randn(D, device=device) if affine else None
    return x, shift, scale, w, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("per_token", [False, True])
def test_modulated_norm(device, dtype, shape, norm, per_token):
    torch.manual_seed(0)
    affine = shape[2] != 53  # cover both the affine and the plain norm
    x, shift, scale, w, b = norm_inputs(shape, dtype, device, per_token, noncontig=shape[1] == 37, affine=affine)
    compare(lambda *a: fused.modulated_norm(*a, 1e-6, norm), lambda *a: reference.modulated_norm(*a, 1e-6, norm),
            [x, shift, scale, w, b], dtype, summed_grad_idx=(1, 2, 3, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_normalize(device, dtype, norm):
    torch.manual_seed(0)
    x = make((3, 4, 5, 19), dtype, device, noncontig=True)
    w, b = torch.randn(19, device=device).to(dtype), torch.randn(19, device=device)  # mixed param dtypes
    compare(lambda *a: fused.normalize(*a, 1e-5, norm), lambda *a: reference.normalize(*a, 1e-5, norm),
            [x, w, b], dtype, summed_grad_idx=(1, 2))
    compare(lambda x: fused.normalize(x, None, None, 1e-5, norm),
            lambda x: reference.normalize(x, None, None, 1e-5, norm), [x], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residual(device, dtype, shape, per_token):
    torch.manual_seed(0)
    B, N, D = shape
    gate = make((B, N, D) if per_token else (B, 1, D), dtype, device)
    x, y = make(shape, dtype, device, noncontig=True), make(shape, dtype, device)
    compare(fused.gated_residual, reference.gated_residual, [x, gate, y], dtype, summed_grad_idx=(1,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residual_modulated_norm(device, dtype, shape, norm, per_token):
    torch.manual_seed(0)
    B, N, D = shape
    x, shift, scale, w, b = norm_inputs(shape, dtype, device, per_token, noncontig=False, affine=D != 53)
    gate = make(shift.shape, dtype, device)
    y = make(shape, dtype, device, noncontig=True)
    compare(lambda *a: fused.gated_residual_modulated_norm(*a, 1e-6, norm),
            lambda *a: reference.gated_residual_modulated_norm(*a, 1e-6, norm),
            [x, gate, y, shift, scale, w, b], dtype, summed_grad_idx=(1, 3, 4, 5, 6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norms_of_wide_rows(device, dtype, norm):
    """dit-30b's D = 6144 is past the rows the CUDA norms cache in shared memory (6080): the
    uncached kernels must give the same results (fused.* calls the op itself, no fallback)."""
    torch.manual_seed(0)
    B, N, D = 2, 3, 6144
    x, shift, scale, w, b = norm_inputs((B, N, D), dtype, device, per_token=False, noncontig=False, affine=True)
    compare(lambda *a: fused.modulated_norm(*a, 1e-6, norm), lambda *a: reference.modulated_norm(*a, 1e-6, norm),
            [x, shift, scale, w, b], dtype, summed_grad_idx=(1, 2, 3, 4))
    gate, y = make(shift.shape, dtype, device), make((B, N, D), dtype, device)
    compare(lambda *a: fused.gated_residual_modulated_norm(*a, 1e-6, norm),
            lambda *a: reference.gated_residual_modulated_norm(*a, 1e-6, norm),
            [x, gate, y, shift, scale, w, b], dtype, summed_grad_idx=(1, 3, 4, 5, 6))


def rope_tables(N, half, device):
    theta = torch.rand(N, half, device=device) * 6.3
    return theta.cos(), theta.sin()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 3, 10), (1, 13, 5, 2), (2, 4, 2, 66)])
@pytest.mark.parametrize("noncontig", [False, True])
def test_apply_rope(device, dtype, shape, noncontig):
    torch.manual_seed(0)
    B, N, H, Dh = shape
    x = make(shape, dtype, device, noncontig)
    if noncontig:  # the layout attention produces: (B, H, N, Dh) transposed to (B, N, H, Dh)
        x = make((B, H, N, Dh), dtype, device).transpose(1, 2)
    cos, sin = rope_tables(N, Dh // 2, device)
    compare(lambda x: fused.apply_rope(x, cos, sin), lambda x: reference.apply_rope(x, cos, sin), [x], dtype)


def merge_inputs(dtype, device, masked):
    B, H, N, D = 2, 3, 9, 17
    out_a, out_b = make((B, H, N, D), dtype, device), make((B, N, H, D), dtype, device).transpose(1, 2)
    lse_a, lse_b = torch.randn(B, H, N, device=device) * 3, torch.randn(B, H, N, device=device) * 3
    if masked:  # rows where one partial, or both, saw only masked keys
        lse_a[0, 0, :3] = float("-inf")
        lse_b[0, 0, 2:5] = float("-inf")
    return [out_a, lse_a, out_b, lse_b]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_merge_attention_partials(device, dtype, masked):
    torch.manual_seed(0)
    inputs = merge_inputs(dtype, device, masked)

    def live_rows(tensors):  # both -inf: the gradient is undefined (fused gives 0); skip those rows
        ok = ~(torch.isinf(tensors[1]) & torch.isinf(tensors[3]))
        return [ok, ok, ok, ok]

    compare(fused.merge_attention_partials, reference.merge_attention_partials, inputs, dtype,
            out_idx=live_rows if masked else None)
    out, lse = fused.merge_attention_partials(*inputs)
    if masked:
        assert torch.isneginf(lse[0, 0, 2]) and (out[0, 0, 2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_merge_mixed_dtypes(device):
    """Ring attention merges an fp32 running output with a bf16 block output."""
    torch.manual_seed(0)
    out_a, lse_a, out_b, lse_b = merge_inputs(torch.float32, device, masked=False)
    out_b = out_b.bfloat16()
    assert fused.supports_merge_attention_partials(out_a, lse_a, out_b, lse_b)
    compare(K.merge_attention_partials, reference.merge_attention_partials, [out_a, lse_a, out_b, lse_b],
            torch.bfloat16)


# ------------------------------------------------------------------ fp64 gradcheck (CPU ops)


def dbl(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("per_token", [False, True])
def test_gradcheck_norms(norm, per_token):
    torch.manual_seed(0)
    B, N, D = 2, 3, 5
    m = (B, N, D) if per_token else (B, 1, D)
    x, y, gate, shift, scale, w, b = dbl(B, N, D), dbl(B, N, D), dbl(*m), dbl(*m), dbl(*m), dbl(D), dbl(D)
    assert torch.autograd.gradcheck(lambda *a: fused.modulated_norm(*a, 1e-5, norm), (x, shift, scale, w, b))
    assert torch.autograd.gradcheck(lambda *a: fused.normalize(*a, 1e-5, norm), (x, w, None))
    assert torch.autograd.gradcheck(lambda *a: fused.gated_residual_modulated_norm(*a, 1e-5, norm),
                                    (x, gate, y, shift, scale, w, b))
    assert torch.autograd.gradcheck(fused.gated_residual, (x, gate, y))


def test_gradcheck_rope_and_merge():
    torch.manual_seed(0)
    cos, sin = (t.double() for t in rope_tables(3, 3, "cpu"))
    assert torch.autograd.gradcheck(lambda x: fused.apply_rope(x, cos, sin), (dbl(2, 3, 2, 6),))
    assert torch.autograd.gradcheck(fused.merge_attention_partials, (dbl(2, 3, 4), dbl(2, 3), dbl(2, 3, 4), dbl(2, 3)))


# ------------------------------------------------------------------ registration, tracing, dispatch


def opcheck_cases():
    torch.manual_seed(0)
    x, shift, scale, w, b = norm_inputs((2, 5, 8), torch.float32, "cpu", False, False, True)
    gate, y = torch.randn_like(shift), torch.randn_like(x)
    cos, sin = rope_tables(5, 3, "cpu")
    oa, la, ob, lb = merge_inputs(torch.float32, "cpu", masked=False)
    r = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    ops = torch.ops.megasora
    return [
        (ops.modulated_norm_fwd, (r(x), r(shift), r(scale), r(w), r(b), 1e-6, False)),
        (ops.modulated_norm_fwd, (r(x), None, None, None, None, 1e-6, True)),
        (ops.gated_residual_fwd, (r(x), r(gate), r(y))),
        (ops.gated_residual_modulated_norm_fwd, (r(x), r(gate), r(y), r(shift), r(scale), r(w), None, 1e-6, True)),
        (ops.apply_rope, (r(torch.randn(2, 5, 3, 6)), cos, sin, False)),
        (ops.merge_attention_partials_fwd, (r(oa), r(la), r(ob.contiguous()), r(lb))),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    """Schema, fake kernel, autograd registration and AOT dispatch agree with the real op."""
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    """torch.compile traces the custom ops and their autograd without graph breaks."""
    torch.manual_seed(0)
    x, shift, scale, w, b = norm_inputs((2, 6, 16), torch.float32, "cpu", False, False, True)
    gate, y = torch.randn_like(shift), torch.randn_like(x)
    cos, sin = rope_tables(6, 4, "cpu")

    def block(x, gate, y, shift, scale, w, b):
        h, n = K.gated_residual_modulated_norm(x, gate, y, shift, scale, w, b)
        q = K.apply_rope(n.view(2, 6, 2, 8), cos, sin)
        out, lse = K.merge_attention_partials(q.transpose(1, 2), q.sum(-1).transpose(1, 2).float(),
                                              q.transpose(1, 2), torch.zeros(2, 2, 6))
        return h.sum() + out.square().sum() + lse.sum() + K.modulated_norm(h, shift, scale).sum()

    args = leaves([x, gate, y, shift, scale, w, b])
    ref_args = leaves([x, gate, y, shift, scale, w, b])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    loss.backward()
    ref = block(*ref_args)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), 1e-5, "loss")
    for a, r in zip(args, ref_args):
        assert_close(a.grad, r.grad, 1e-4, "grad")


def test_compile_inductor_fullgraph():
    """inductor keeps the custom ops as extern kernels (forward and backward) and matches eager."""
    torch.manual_seed(0)
    x, shift, scale, _, _ = norm_inputs((2, 6, 16), torch.float32, "cpu", False, False, False)
    cos, sin = rope_tables(6, 4, "cpu")

    def f(x, shift, scale):
        h = K.modulated_norm(x, shift, scale, norm="rms")
        return K.apply_rope(h.view(2, 6, 2, 8), cos, sin).square().sum()

    args, ref_args = leaves([x, shift, scale]), leaves([x, shift, scale])
    torch.compile(f, fullgraph=True)(*args).backward()
    f(*ref_args).backward()
    for a, r in zip(args, ref_args):
        assert_close(a.grad, r.grad, 1e-5, "grad")


def test_backend_switch():
    x = torch.randn(2, 3, 8)
    shift, scale = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    try:
        K.set_backend("torch")
        assert K.backend() == "torch"
        ref = K.modulated_norm(x, shift, scale)
        K.set_backend("fused")
        assert K.backend() == "fused"
        assert_close(K.modulated_norm(x, shift, scale), ref, 1e-5, "fused vs torch backend")
        with pytest.raises(ValueError, match="auto"):
            K.set_backend("triton")
    finally:
        K.set_backend("auto")
    assert K.backend() == "fused"


def test_missing_extension_falls_back_with_one_warning():
    """With megasora._C unimportable, auto uses the reference (one warning); fused raises."""
    code = """
import logging, sys, torch
sys.modules["megasora._C"] = None  # makes `import megasora._C` raise ImportError
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
import megasora.kernels as K
x, s = torch.randn(2, 3, 4), torch.randn(2, 1, 4)
assert K.backend() == "torch"
K.modulated_norm(x, s, s); K.apply_rope(torch.randn(1, 3, 1, 2), torch.ones(3, 1), torch.zeros(3, 1))
try:
    K.set_backend("fused")
    raise SystemExit("no error")
except RuntimeError as e:
    print("RAISED", e)
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGASORA_JIT="0")  # JIT build off: the missing case stays missing
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("using the pure-PyTorch reference ops") == 1, res.stdout
    assert "RAISED" in res.stdout and "not importable" in res.stdout


def test_unsupported_inputs_take_reference_path():
    """fp64 and other broadcast shapes are not fused; the public op still matches the reference."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    s = torch.randn(1, 1, 4, dtype=torch.float64)  # broadcast over the batch: not a fused layout
    assert not fused.supports_modulated_norm(x, s, s, None, None)
    assert torch.equal(K.modulated_norm(x, s, s), reference.modulated_norm(x, s, s))
    oa, la = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    out, lse = K.merge_attention_partials(oa, la, oa, la)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
