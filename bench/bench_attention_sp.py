"""Sequence-parallel attention: bytes sent and peak memory per rank vs sequence length.

Runs Ulysses, ring and USP (ulysses2 x ring2) at world 4 on CPU (gloo) and full
single-device attention at world 1, one training step (forward + backward) of one
attention layer per configuration, and prints a markdown table next to the analytic figures:

  ulysses (per rank, fwd+bwd): 2 x [4 * B*N*h/P * (P-1)/P] elements  (q,k,v,out and their grads)
  ring    (per rank, fwd):     2 * B*N*h/P * (P-1)            elements (K,V blocks, (P-1)/P of K/V)
          (per rank, bwd):     the same again + dK,dV fp32 accumulators for P hops
  usp     ulysses part over U on N/(U*R) tokens + ring part over R on h/U channels

Bytes are counted where they are handed to torch.distributed (all_to_all_single: the
(P-1)/P that leaves the rank; isend: the whole tensor). Peak memory is the process's peak
RSS during the step minus its RSS before it; MALLOC_MMAP_THRESHOLD_ makes glibc mmap (and
return on free) every allocation over 64 KiB, so RSS tracks live tensors; lengths run in
increasing order so each step sets a new peak.

    OMP_NUM_THREADS=1 python bench/bench_attention_sp.py --tokens 4096 8192 16384 32768
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megasora.models.attention import local_attention  # noqa: E402
from megasora.parallel.mesh import ParallelLayout, build_mesh  # noqa: E402
from megasora.parallel.sequence import sequence_attention  # noqa: E402

B, H, D = 1, 4, 16
ELT = 4  # fp32
SENT = {"bytes": 0}


def _count(fn, nbytes):
    def wrapped(*args, **kwargs):
        SENT["bytes"] += nbytes(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapped


def instrument() -> None:
    """Count bytes leaving this rank at the torch.distributed calls the SP code makes."""
    a2a, batch = dist.all_to_all_single, dist.batch_isend_irecv

    def a2a_bytes(out, inp, *a, group=None, **k):
        p = dist.get_world_size(group)
        return inp.numel() * inp.element_size() * (p - 1) // p

    def p2p_bytes(ops):
        return sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)

    dist.all_to_all_single = _count(a2a, a2a_bytes)
    dist.batch_isend_irecv = _count(batch, p2p_bytes)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def analytic_bytes(mode: str, n: int, u: int, r: int) -> int:
    h = H * D
    ulysses = 2 * 4 * B * (n // (u * r)) * h * (u - 1) // u * ELT if u > 1 else 0
    ring = 0
    if r > 1:
        kv = 2 * B * (n // r) * (h // u) * ELT
        ring = kv * (r - 1) * 2 + 2 * B * (n // r) * (h // u) * 4 * r  # fwd K/V, bwd K/V, bwd dK/dV fp32
    return ulysses + ring


def step(rank: int, world: int, port: int, out_dir: str, tokens: list[int], u: int, r: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    attention = local_attention
    if world > 1:
        mesh = build_mesh(ParallelLayout(ulysses=u, ring=r))
        attention = sequence_attention(mesh)
        instrument()
    rows = []
    for n in [256 * world] + tokens:  # the first, small step pays one-off library/allocator set-up
        g = torch.Generator().manual_seed(n)
        local = n // world
        q, k, v = (torch.randn(B, H, local, D, generator=g).requires_grad_(True) for _ in range(3))
        dist.barrier()
        SENT["bytes"], before = 0, rss_bytes()
        attention(q, k, v, None).backward(torch.ones(B, H, local, D))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        rows.append((n, SENT["bytes"], peak))
        del q, k, v
    torch.save(rows[1:], Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run(world: int, tokens: list[int], u: int, r: int) -> list[tuple[int, int, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(step, args=(world, port, out, tokens, u, r), nprocs=world, join=True)
        per_rank = [torch.load(Path(out) / f"rank{i}.pt") for i in range(world)]
    # report the max over ranks (they are symmetric; max is what a cluster must provision)
    return [(n, max(pr[i][1] for pr in per_rank), max(pr[i][2] for pr in per_rank))
            for i, n in enumerate(tokens)]


MODES = (("ulysses2", 2, 1), ("ring2", 1, 2), ("ulysses4", 4, 1), ("ring4", 1, 4), ("ulysses2xring2", 2, 2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    args = ap.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned ranks
    single = {n: mem for n, _, mem in run(1, args.tokens, 1, 1)}
    print(f"B={B} H={H} Dh={D} fp32, one attention layer fwd+bwd (gloo, CPU)\n")
    print("| mode | P | N | sent MiB/rank | analytic MiB | sent/analytic | peak MiB/rank | single-device MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, u, r in MODES:
        for n, sent, mem in run(u * r, args.tokens, u, r):
            ana = analytic_bytes(mode, n, u, r)
            print(f"| {mode} | {u * r} | {n} | {sent / 2**20:.2f} | {ana / 2**20:.2f} | {sent / ana:.3f} | "
                  f"{mem / 2**20:.1f} | {single[n] / 2**20:.1f} | {mem / single[n]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
