"""Peak memory per rank and step time of activation checkpointing none / selective / full, in one run.

Every rank builds the same DiT (same seed), applies the layout (megasora/parallel: tp / ulysses /
ring over gloo on CPU, NCCL on GPU) and then each checkpointing mode on a fresh copy of the
model, and measures one training step (forward, backward, AdamW step) per mode:

  peak      exact live tensor bytes over the step (megasora/train/memory_probe.py on CPU;
            torch.cuda.max_memory_allocated on GPU), weights + grads + optimizer state included
  saved     bytes still alive at the end of the forward minus before it: the activations kept
            for backward (what checkpointing trades for recompute)
  step      median wall-clock step time over --steps timed steps, modes interleaved step by step
            so load drift on a shared machine hits every mode alike; probe off while timing
  cpu       median CPU time of this process per step (CPU runs only, 1 intra-op thread): what the
            step costs in compute, unaffected by other jobs time-sharing the cores (a wall-clock
            ratio on a loaded machine is mostly noise); it excludes time spent waiting for peers

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_activation_checkpointing.py            # 1 process
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_activation_checkpointing.py --world 2 --ulysses 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megasora.config import load_config
from megasora.models import build_dit
from megasora.parallel.activation_checkpointing import apply_activation_checkpointing
from megasora.parallel.mesh import build_mesh, validate_config_layout
from megasora.parallel.parallelize import parallelize
from megasora.train.memory_probe import LiveTensorBytes

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "selective", "full")


def bench_config(args: argparse.Namespace):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.hidden={args.hidden}", f"model.heads={args.heads}", f"model.depth={args.depth}",
        "model.mlp_ratio=4.0", "text.dim=64", f"data.frames={args.frames}", f"data.height={args.size}",
        f"data.width={args.size}", f"parallel.tp={args.tp}", f"parallel.ulysses={args.ulysses}",
        f"parallel.ring={args.ring}"])


def make_inputs(cfg, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    d = cfg.data
    latents = torch.randn(batch, cfg.model.in_channels, d.frames, d.height, d.width, generator=g)
    return (latents.to(device), torch.rand(batch, generator=g).to(device),
            torch.randn(batch, 16, cfg.text.dim, generator=g).to(device),
            torch.ones(batch, 16, dtype=torch.bool, device=device))


class ModeRun:
    """One checkpointing mode: its own copy of the parallelized model and optimizer."""

    def __init__(self, cfg, mesh, mode: str, device: torch.device) -> None:
        torch.manual_seed(cfg.train.seed)
        self.model = parallelize(build_dit(cfg), mesh).to(device)
        apply_activation_checkpointing(self.model, mode)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.mode = mode

    def step(self, inputs: tuple[torch.Tensor, ...], probe: LiveTensorBytes | None = None) -> dict[str, int]:
        before = probe.current_bytes if probe else 0
        loss = self.model(*inputs).pow(2).mean()
        saved = (probe.current_bytes - before) if probe else 0
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"saved": saved}


def measure_memory(run: ModeRun, inputs: tuple[torch.Tensor, ...], device: torch.device) -> dict[str, int]:
    run.step(inputs)  # creates the optimizer state, so the measured step is a steady-state one
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss = run.model(*inputs).pow(2).mean()
        saved = torch.cuda.memory_allocated(device) - before
        loss.backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        return {"peak": torch.cuda.max_memory_allocated(device), "saved": saved}
    probe = LiveTensorBytes(device=device)
    probe.track(list(run.model.parameters()) + [t for s in run.optimizer.state.values() for t in s.values()]
                + list(inputs))
    with probe:
        stats = run.step(inputs, probe)
    return {"peak": probe.peak_bytes, "saved": stats["saved"]}


def timed_step(run: ModeRun, inputs: tuple[torch.Tensor, ...], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    if dist.is_initialized():
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    run.step(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    cfg = bench_config(args)
    mesh = build_mesh(validate_config_layout(cfg, world))
    inputs = make_inputs(cfg, args.batch, device)
    runs = [ModeRun(cfg, mesh, mode, device) for mode in MODES]
    memory = {run.mode: measure_memory(run, inputs, device) for run in runs}
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for i in range(args.warmup + args.steps):
        for run in runs:  # interleaved: every mode sees the same machine load
            elapsed = timed_step(run, inputs, device)
            if i >= args.warmup:
                times[run.mode].append(elapsed)
        if rank == 0:
            print(f"step {i + 1}/{args.warmup + args.steps}", flush=True)
    result = {mode: {**memory[mode], "step_s": statistics.median(w for w, _ in times[mode]),
                     "cpu_s": statistics.median(c for _, c in times[mode])} for mode in MODES}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(per_rank: list[dict], args: argparse.Namespace) -> str:
    cfg = bench_config(args)
    tokens = cfg.data.frames * (cfg.data.height // 2) * (cfg.data.width // 2)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"{os.cpu_count()} CPUs"
    lines = [f"# {platform.node()} | {name} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')} | "
             f"load average {os.getloadavg()[0]:.1f}",
             f"# DiT hidden={args.hidden} heads={args.heads} depth={args.depth}, {tokens} tokens x batch "
             f"{args.batch}, world {args.world} (tp={args.tp} ulysses={args.ulysses} ring={args.ring}), fp32",
             "| mode | rank | peak (MiB) | peak / none | saved activations (MiB) | saved / none | step (ms) | "
             "step / none | cpu (ms) | cpu / none |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rank, result in enumerate(per_rank):
        ref = result["none"]
        for mode in MODES:
            r = result[mode]
            lines.append(f"| {mode} | {rank} | {r['peak'] / 2**20:.2f} | {r['peak'] / ref['peak']:.3f} | "
                         f"{r['saved'] / 2**20:.2f} | {r['saved'] / ref['saved']:.3f} | {1000 * r['step_s']:.1f} | "
                         f"{r['step_s'] / ref['step_s']:.3f} | {1000 * r['cpu_s']:.1f} | "
                         f"{r['cpu_s'] / ref['cpu_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4, help="latent frames T")
    parser.add_argument("--size", type=int, default=32, help="latent H = W (patch 2x2: (size/2)^2 tokens a frame)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--world", type=int, default=1, help="processes (one per GPU on a GPU machine)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    parser.add_argument("--json", type=str, default="", help="also write the per-rank results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(args.world, free_port(), args, out_dir), nprocs=args.world, join=True)
        per_rank = json.loads(Path(out_dir, "results.json").read_text())
    print(report(per_rank, args))
    if args.json:
        Path(args.json).write_text(json.dumps(per_rank, indent=1))


if __name__ == "__main__":
    main()
