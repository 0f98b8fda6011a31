"""bf16 training with gradients reduced in fp32 vs in bf16, each against the fp32 run.

Three runs of the same config, seed and data at dp4 (4 gloo processes, the real trainer):
fp32 training (the reference), bf16 with train.grad_reduce_dtype=fp32 (the default) and bf16
with train.grad_reduce_dtype=bf16. Per bf16 run, against the fp32 run:

- loss: mean over the steps of |loss - loss_fp32| (the logged global-batch loss),
- weights: ||w - w_fp32|| / ||w_fp32 - w_init|| after the last step (the distance relative to
  how far training moved the weights; w are the fp32 master weights the optimizer updates),
- and the collective alone: 2^20 bf16 values per rank summed over the ranks, in bf16 vs in fp32
  (then rounded to bf16), mean |error| / mean |sum| against the fp64 sum.

    OMP_NUM_THREADS=1 python bench/bench_grad_reduce.py              # tiny, 50 steps: docs/benchmarks.md
    OMP_NUM_THREADS=1 python bench/bench_grad_reduce.py --steps 10
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

RUNS = {
    "fp32": ["train.precision=fp32"],
    "bf16, fp32 reduction": ["train.precision=bf16", "train.grad_reduce_dtype=fp32"],
    "bf16, bf16 reduction": ["train.precision=bf16", "train.grad_reduce_dtype=bf16"],
}


def _weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def _master_weights(engine) -> torch.Tensor:
    """The fp32 master weights (a bf16 run's module holds them rounded to bf16, which would
    hide the differences); a collective under ZeRO: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param
    return torch.cat([safe_get_full_fp32_param(p).detach().double().flatten() for p in engine.module.parameters()])


def _sum_error(rank: int, world: int) -> dict[str, float]:
    """The collective alone: bf16 gradient-like tensors (one per rank) summed in bf16 vs in fp32
    then rounded to bf16; mean |error| / mean |exact sum| against the fp64 sum."""
    import torch.distributed as dist
    torch.manual_seed(rank)
    grad = torch.randn(1 << 20).to(torch.bfloat16)
    parts = [torch.empty_like(grad) for _ in range(world)]
    dist.all_gather(parts, grad)
    exact = sum(p.double() for p in parts)
    in_bf16, in_fp32 = grad.clone(), grad.float()
    dist.all_reduce(in_bf16)
    dist.all_reduce(in_fp32)
    err = lambda t: ((t.to(torch.bfloat16).double() - exact).abs().mean() / exact.abs().mean()).item()  # noqa: E731
    return {"bf16, fp32 reduction": err(in_fp32), "bf16, bf16 reduction": err(in_bf16)}


def _worker(rank: int, world: int, config: str, overrides: list[str], root: str) -> dict:
    """Every run in one spawn (start-up dominates on CPU); rank 0 returns losses and weights."""
    import deepspeed
    import torch.distributed as dist

    from megasora.config import load_config
    from megasora.models import build_dit
    from megasora.train.trainer import train

    engines = []
    initialize = deepspeed.initialize

    def keep_engine(*args, **kwargs):  # the trainer's engine, whatever builds it
        result = initialize(*args, **kwargs)
        engines.append(result[0])
        return result

    deepspeed.initialize = keep_engine
    out = {}
    for name, extra in RUNS.items():
        run_dir = f"{root}/{name.replace(' ', '').replace(',', '_')}"
        cfg = load_config(config, overrides + extra + [f"run.dir={run_dir}", "train.save_every=0"])
        torch.manual_seed(cfg.train.seed)  # the trainer's init: the same seed on every rank
        init = _weights(build_dit(cfg)) if name == "fp32" else None
        result = train(cfg)
        out[name] = {"losses": [result.losses[s] for s in sorted(result.losses)], "weights": _master_weights(engines[-1])}
        if init is not None:
            out["init"] = init
        dist.barrier()
    out["sum_error"] = _sum_error(rank, world)  # the trainer has left the default group up
    return out if rank == 0 else {}


def measure(config: str, steps: int, world: int) -> dict:
    from parallel_utils import run_launched
    overrides = [f"train.steps={steps}", "train.ema_decay=0", "train.accounting=false"]
    with tempfile.TemporaryDirectory() as root:
        return run_launched(_worker, world, config, overrides, root)[0]


def compare(runs: dict) -> dict[str, tuple[float, float, float]]:
    ref, moved = runs["fp32"], (runs["fp32"]["weights"] - runs["init"]).norm().item()
    result = {}
    for name in ("bf16, fp32 reduction", "bf16, bf16 reduction"):
        loss = sum(abs(a - b) for a, b in zip(runs[name]["losses"], ref["losses"])) / len(ref["losses"])
        weights = (runs[name]["weights"] - ref["weights"]).norm().item() / moved
        result[name] = (loss, weights, runs["sum_error"][name])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--world", type=int, default=4, help="data-parallel processes")
    args = parser.parse_args()
    result = compare(measure(args.config, args.steps, args.world))
    print(f"{Path(args.config).name}, dp{args.world}, {args.steps} steps, against the fp32 run")
    print("| run | mean abs loss difference | weight distance / distance moved | error of the sum alone |\n"
          "|---|---|---|---|")
    for name, (loss, weights, alone) in result.items():
        print(f"| {name} | {loss:.3e} | {weights:.3e} | {alone:.2e} |")


if __name__ == "__main__":
    main()
