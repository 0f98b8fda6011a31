"""Ring attention's dK/dV accumulators: fp32 vs bf16, against the single-device gradient.

In the ring backward each K/V block's dK/dV accumulator visits every rank once, picking up
that rank's share (block_attention.block_backward, one per query chunk) and travelling on:
P partial sums, each added to the running one. This replays that arithmetic in one process
for P = 4 and 8 (the same block kernel, the same hop order as megasora/parallel/ring.py;
only the dtype of the running sum changes) on bf16 inputs, and measures dK and dV against

- the oracle: full attention of the same bf16 inputs in fp64,
- and, for scale, the single-device bf16 kernel (CPU SDPA, autograd).

Error = ||g - oracle|| / ||oracle|| (Frobenius), and the max abs error over max |oracle|.

    OMP_NUM_THREADS=1 python bench/bench_ring_dkv_precision.py            # the table in docs/benchmarks.md
    OMP_NUM_THREADS=1 python bench/bench_ring_dkv_precision.py --chunk 64 # a quick look
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megasora import kernels  # noqa: E402
from megasora.parallel.block_attention import block_backward, block_forward  # noqa: E402

B, H, D = 1, 4, 64


def inputs(tokens: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, tokens, D, generator=g).to(torch.bfloat16) for _ in range(4)]  # q, k, v, dout


def oracle(q, k, v, dout) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
    F.scaled_dot_product_attention(q, k, v).backward(dout.double())
    return k.grad, v.grad


def single_device(q, k, v, dout) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    F.scaled_dot_product_attention(q, k, v).backward(dout)
    return k.grad, v.grad


def ring_forward(qs, ks, vs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each rank's global (out in bf16, lse in fp32), merged block by block as ring.py does."""
    world, result = len(qs), []
    for r in range(world):
        out = lse = None
        for step in range(world):
            j = (r - step) % world  # the block rank r holds at this step
            blk_out, blk_lse = block_forward(qs[r], ks[j], vs[j], None)
            if out is None:
                out, lse = blk_out.float(), blk_lse
            else:
                out, lse = kernels.merge_attention_partials(out, lse, blk_out, blk_lse)
        result.append((out.to(qs[r].dtype), lse))
    return result


def ring_dkv(qs, ks, vs, douts, acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV of every block after its accumulator's P hops (ranks j, j+1, ..., j+P-1)."""
    world = len(qs)
    global_out = ring_forward(qs, ks, vs)
    dks, dvs = [], []
    for j in range(world):
        dk = dv = None
        for hop in range(world):
            r = (j + hop) % world
            out, lse = global_out[r]
            _, dk_b, dv_b = block_backward(douts[r], qs[r], ks[j], vs[j], None, out, lse)
            dk = dk_b.to(acc_dtype) if dk is None else dk_b.to(acc_dtype) + dk  # as ring.py: dk_acc += received
            dv = dv_b.to(acc_dtype) if dv is None else dv_b.to(acc_dtype) + dv
        dks.append(dk.to(ks[j].dtype))  # the owner casts to the parameter dtype once home
        dvs.append(dv.to(vs[j].dtype))
    return torch.cat(dks, dim=2), torch.cat(dvs, dim=2)


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = got.double() - want
    return (diff.norm() / want.norm()).item(), (diff.abs().max() / want.abs().max()).item()


def measure(world: int, chunk: int, seed: int) -> dict[str, tuple[float, float, float, float]]:
    q, k, v, dout = inputs(world * chunk, seed)
    dk_o, dv_o = oracle(q, k, v, dout)
    split = lambda t: list(t.split(chunk, dim=2))  # noqa: E731
    qs, ks, vs, douts = split(q), split(k), split(v), split(dout)
    rows = {"single-device bf16 kernel": single_device(q, k, v, dout)}
    for name, dtype in (("ring, fp32 accumulators", torch.float32), ("ring, bf16 accumulators", torch.bfloat16)):
        rows[name] = ring_dkv(qs, ks, vs, douts, dtype)
    return {name: errors(dk, dk_o) + errors(dv, dv_o) for name, (dk, dv) in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[4, 8], help="ring sizes (hops)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per rank")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    print(f"B={B} H={H} head dim {D}, {args.chunk} tokens per rank, bf16 inputs; relative Frobenius error "
          f"(max abs error / max |oracle|), mean over {args.seeds} seeds")
    print("| hops | dK/dV path | dK error | dV error |\n|---|---|---|---|")
    for world in args.worlds:
        runs = [measure(world, args.chunk, seed) for seed in range(args.seeds)]
        for name in runs[0]:
            mean = [sum(r[name][i] for r in runs) / len(runs) for i in range(4)]
            print(f"| {world} | {name} | {mean[0]:.2e} ({mean[1]:.2e}) | {mean[2]:.2e} ({mean[3]:.2e}) |")


if __name__ == "__main__":
    main()
