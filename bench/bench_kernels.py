"""Fused csrc/ ops vs the pure-PyTorch reference (eager and torch.compile).

CPU: wall time of forward and forward+backward, and the ratio reference / fused.
CUDA (--device cuda): the same, plus achieved bandwidth (minimal bytes moved / time) and
its fraction of the measured device-to-device copy bandwidth.

    OMP_NUM_THREADS=2 python bench/bench_kernels.py --device cpu --dtype bf16 fp32 --compile
    python bench/bench_kernels.py --device cuda --dtype bf16 --compile --tokens 32768 --dim 1152
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from megasora.kernels import fused, reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    name: str
    inputs: list  # tensors (requires_grad where they get a gradient) and plain args
    fused: Callable
    reference: Callable
    bytes_fwd: int  # minimal bytes moved: activations read + written once
    bytes_bwd: int


def build_cases(B: int, N: int, D: int, heads: int, dtype: torch.dtype, device: str) -> list[Case]:
    es = torch.tensor([], dtype=dtype).element_size()
    act = B * N * D

    def t(*shape, dt=dtype, grad=True):
        return torch.randn(*shape, device=device, dtype=dt).requires_grad_(grad)

    x, y = t(B, N, D), t(B, N, D)
    shift, scale, gate = t(B, 1, D), t(B, 1, D), t(B, 1, D)
    w, b = t(D, dt=torch.float32), t(D, dt=torch.float32)
    dh = D // heads
    q = t(B, N, heads, dh)
    theta = torch.rand(N, dh // 2, device=device) * 6.28
    cos, sin = theta.cos(), theta.sin()
    oa, ob = t(B, heads, N, dh), t(B, heads, N, dh)
    la, lb = t(B, heads, N, dt=torch.float32), t(B, heads, N, dt=torch.float32)
    return [
        Case("modulated_norm (layer, affine)", [x, shift, scale, w, b],
             fused.modulated_norm, reference.modulated_norm, 2 * act * es, 3 * act * es),
        Case("modulated_norm (rms)", [x, shift, scale, None, None, 1e-6, "rms"],
             fused.modulated_norm, reference.modulated_norm, 2 * act * es, 3 * act * es),
        Case("gated_residual", [x, gate, y], fused.gated_residual, reference.gated_residual,
             3 * act * es, 3 * act * es),
        Case("gated_residual_modulated_norm", [x, gate, y, shift, scale, w, b],
             fused.gated_residual_modulated_norm, reference.gated_residual_modulated_norm,
             4 * act * es, 6 * act * es),
        Case("apply_rope", [q, cos, sin], fused.apply_rope, reference.apply_rope, 2 * act * es, 2 * act * es),
        Case("merge_attention_partials", [oa, la, ob, lb], fused.merge_attention_partials,
             reference.merge_attention_partials, act * (2 * es + 4), act * (4 + 4 * es)),
    ]


def timer(device: str) -> Callable[[Callable], float]:
    """Seconds for one call of fn, on the device clock for CUDA."""
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return run

    def run(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def measure(fns: dict[str, Callable], device: str, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Seconds per call of each fn. The fns are interleaved within every repeat so that a
    shared machine's load hits all of them alike; CPU reports the minimum (the least
    disturbed run), CUDA the median."""
    clock = timer(device)
    for fn in fns.values():
        for _ in range(warmup):
            clock(fn)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(clock(fn))
    pick = min if device == "cpu" else statistics.median
    return {k: pick(v) for k, v in samples.items()}


def fwd_and_step(op: Callable, inputs: list) -> tuple[Callable, Callable]:
    """Closures for forward only (no grad) and forward+backward."""
    leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]

    def fwd():
        with torch.no_grad():
            op(*inputs)

    def step():
        outs = op(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum(o.float().sum() for o in outs)
        torch.autograd.grad(loss, leaves)
    return fwd, step


def copy_bandwidth(device: str, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / measure({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    args = p.parse_args()
    if not fused.AVAILABLE or (args.device == "cuda" and not fused.CUDA_AVAILABLE):
        raise SystemExit(f"fused extension not available: {fused.LOAD_ERROR or fused.CUDA_LOAD_ERROR}")
    torch.manual_seed(0)
    print(f"# device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"B={args.batch} N={args.tokens} D={args.dim} heads={args.heads} repeats={args.repeats}")
    if args.device == "cuda":
        args.copy_bw = copy_bandwidth("cuda", 1 << 30, args.repeats)
        print(f"# {torch.cuda.get_device_name()}; d2d copy bandwidth {args.copy_bw / 1e9:.0f} GB/s")
    cols = ["op", "dtype", "pass", "fused ms", "eager ms", "eager/fused"]
    if args.compile:
        cols += ["compiled ms", "compiled/fused"]
    if args.device == "cuda":
        cols += ["fused GB/s", "% of copy"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for dname in args.dtype:
        for case in build_cases(args.batch, args.tokens, args.dim, args.heads, DTYPES[dname], args.device):
            report(case, dname, args)


def report(case: Case, dname: str, args: argparse.Namespace) -> None:
    ops = {"fused": case.fused, "eager": case.reference}
    if args.compile:
        ops["compiled"] = torch.compile(case.reference)
    fns = {}
    for name, op in ops.items():
        fns[name, 0], fns[name, 1] = fwd_and_step(op, case.inputs)
    t = measure(fns, args.device, args.repeats)
    times = {name: (t[name, 0], t[name, 1]) for name in ops}
    for i, pass_name in enumerate(["fwd", "fwd+bwd"]):
        f = times["fused"][i]
        row = [case.name, dname, pass_name, f"{f * 1e3:.3f}", f"{times['eager'][i] * 1e3:.3f}",
               f"{times['eager'][i] / f:.2f}"]
        if args.compile:
            row += [f"{times['compiled'][i] * 1e3:.3f}", f"{times['compiled'][i] / f:.2f}"]
        if args.device == "cuda":
            nbytes = case.bytes_fwd if i == 0 else case.bytes_fwd + case.bytes_bwd
            row += [f"{nbytes / f / 1e9:.0f}", f"{100 * nbytes / f / args.copy_bw:.0f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
