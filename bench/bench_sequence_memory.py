"""Whole-step peak live bytes per rank under sequence parallelism: one process vs P = 2, 4, 8.

    OMP_NUM_THREADS=1 python bench/bench_sequence_memory.py              # every world size
    OMP_NUM_THREADS=1 python bench/bench_sequence_memory.py --worlds 1 2 # a subset

One gloo spawn per world size runs each layout of that size (ring P, ulysses P, ulysses x
ring) under each activation-checkpointing mode (none, full): a DiT of depth 4 (hidden 64,
8 heads, fp32) built, parallelized and checkpointed as the trainer does, the real objective
(FlowMatchingObjective with the model's sequence hook: each rank noises its span only), a
forward, backward, the gradient sum over sp and an AdamW step. Each step runs under
megasora.train.memory_probe.LiveTensorBytes, which counts every tensor storage ATen creates
while it is alive; the clip's latents and caption features come from outside (the data).

The part that grows with tokens: the peak live bytes of forward + backward (above what was
live before the step) at N = 8192 tokens minus the same at N0 = 1024 tokens, scaled to N
(slope x N). Fixed terms (weights' gradients, the caption) cancel in the difference. The
gradient sum and the optimizer step come after backward and hold no token-sized tensor; their
peak is fixed (~7 MiB here), so at N0 with P >= 4 it is the whole step's peak and a difference
of whole-step peaks would understate the token part: the table shows the whole step's peak at N
next to it. A first step at N0 creates the optimizer state, so every measured step is a
steady-state step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

FRAME = (32, 32)      # token grid of one latent frame (64 x 64 latents, patch 1 x 2 x 2)
FRAMES, FRAMES0 = 8, 1  # N = 8 x 1024 = 8192 tokens, N0 = 1024
MODEL = ["model.hidden=64", "model.heads=8", "model.depth=4", "model.mlp_ratio=4.0", "model.in_channels=4",
         "model.patch=[1,2,2]", "text.max_length=8", "diffusion.cond_frames_prob=0.0", "train.precision=fp32"]
LAYOUTS = {1: [("single", 1, 1)], 2: [("ring2", 1, 2), ("ulysses2", 2, 1)],
           4: [("ring4", 1, 4), ("ulysses4", 4, 1), ("ulysses2xring2", 2, 2)],
           8: [("ring8", 1, 8), ("ulysses8", 8, 1), ("ulysses2xring4", 2, 4)]}
MODES = ("none", "full")


def _batch(frames: int, text_dim: int):
    import torch
    g = torch.Generator().manual_seed(frames)
    return {"latents": torch.randn(1, 4, frames, 2 * FRAME[0], 2 * FRAME[1], generator=g),
            "ids": torch.tensor([frames]), "text_emb": torch.randn(1, 8, text_dim, generator=g),
            "text_mask": torch.ones(1, 8, dtype=torch.bool)}


def _step_bytes(model, objective, optimizer, group, batch, step: int) -> dict[str, int]:
    """Peak live bytes of one training step above what was live before it: of forward + backward
    ("fwd_bwd"), and of the whole step ("step": also the gradient sum and the optimizer step)."""
    import torch
    import torch.distributed as dist

    from megasora.train.memory_probe import LiveTensorBytes
    optimizer.zero_grad(set_to_none=True)
    probe = LiveTensorBytes(device="cpu")
    with probe:
        loss = objective(model, batch, step, torch.float32, torch.device("cpu"))
        loss.backward()
        del loss
        fwd_bwd = probe.peak_bytes
        if group is not None:
            for p in model.parameters():  # what DeepSpeed does over sp (MeshMPU): sum the span's gradients
                dist.all_reduce(p.grad, group=group)
        optimizer.step()
    return {"fwd_bwd": fwd_bwd, "step": probe.peak_bytes}


def _worker(rank: int, world: int) -> dict[str, dict[str, dict[str, int]]]:
    import torch
    import torch.distributed as dist

    from megasora.config import load_config
    from megasora.models import build_dit
    from megasora.parallel import init_parallel
    from megasora.parallel.activation_checkpointing import apply_activation_checkpointing
    from megasora.train.objective import FlowMatchingObjective

    out: dict[str, dict[str, dict[str, int]]] = {}
    for name, u, r in LAYOUTS[world]:
        for mode in MODES:
            cfg = load_config(REPO / "configs" / "tiny.yaml", MODEL + [f"parallel.ulysses={u}", f"parallel.ring={r}",
                                                                     f"train.activation_checkpointing={mode}"])
            torch.manual_seed(0)
            model = build_dit(cfg)
            group = None
            if world > 1:
                mesh = init_parallel(model, cfg.parallel, world, cfg.train)
                group = mesh.communicating_group("tpsp")
            apply_activation_checkpointing(model, mode, 1)
            objective = FlowMatchingObjective(cfg, model.sequence)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
            small, big = _batch(FRAMES0, cfg.text.dim), _batch(FRAMES, cfg.text.dim)
            _step_bytes(model, objective, optimizer, group, small, 0)  # optimizer state exists from here on
            out[f"{name} {mode}"] = {"n0": _step_bytes(model, objective, optimizer, group, small, 1),
                                     "n": _step_bytes(model, objective, optimizer, group, big, 2)}
            if world > 1:
                dist.barrier()
    return out


def measure(world: int) -> dict[str, dict[str, int]]:
    """Per layout and mode: the worst rank's peaks ("n0"/"n": forward + backward, "step_n": whole step at N)."""
    from parallel_utils import run_distributed
    ranks = run_distributed(_worker, world) if world > 1 else [_worker(0, 1)]
    return {key: {"n0": max(r[key]["n0"]["fwd_bwd"] for r in ranks), "n": max(r[key]["n"]["fwd_bwd"] for r in ranks),
                  "step_n": max(r[key]["n"]["step"] for r in ranks)} for key in ranks[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    n, n0 = FRAMES * FRAME[0] * FRAME[1], FRAMES0 * FRAME[0] * FRAME[1]
    results: dict[str, dict[str, int]] = {}
    for world in sorted(set(args.worlds) | {1}):
        print(f"world {world} ...", file=sys.stderr, flush=True)
        results.update(measure(world))
    mib = 2 ** 20
    print(f"DiT depth 4, hidden 64, 8 heads, fp32, 1 sample of N = {n} tokens (N0 = {n0}); token part = "
          f"(peak(N) - peak(N0)) x N / (N - N0), worst rank\n")
    print("| layout | P | AC | whole-step peak at N (MiB) | fwd+bwd peak at N (MiB) | token part (MiB) | "
          "/ one process's | x P | limit x P |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        name, mode = key.split()
        p = int("".join(c for c in name.split("x")[-1] if c.isdigit()) or 1) * (
            int("".join(c for c in name.split("x")[0] if c.isdigit())) if "x" in name else 1)
        token = (r["n"] - r["n0"]) * n / (n - n0)
        single = results[f"single {mode}"]
        ratio = token / ((single["n"] - single["n0"]) * n / (n - n0))
        limit = 1.1 if mode == "none" else 1.15
        print(f"| {name} | {p} | {mode} | {r['step_n'] / mib:.1f} | {r['n'] / mib:.1f} | {token / mib:.1f} | {ratio:.4f} | {ratio * p:.3f} | "
              f"{limit if p > 1 else 1:.2f} |", flush=True)


if __name__ == "__main__":
    main()
