"""Cost of the per-step accounting (megasora/train/accounting.py): step time with it on vs off.

One run per layout: `megasora.train.trainer.train` on 2 gloo processes, the accounting
switched on and off on alternating steps of the SAME run (pattern on, off, off, on, ... so
drift and other load hit both sides alike); `off` is the `train.accounting=false` path (the
wrappers stay installed and cost one attribute check per collective). Reports the median step
time of each side, their ratio, the median over on/off/off/on blocks of (on+on)/(off+off),
the main thread's CPU time per step on each side (what the accounting itself adds, which
other processes' load cannot inflate the way it inflates wall time), and the collectives per step.

Also the seam's own cost, free of communication noise: microseconds the wrapper adds to one
collective call (counting, and switched off), times the collectives per step.

    OMP_NUM_THREADS=1 python bench/bench_accounting.py --layouts dp2 tp2 ring2 --steps 40
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from parallel_utils import run_launched  # noqa: E402

MODEL = ["model.hidden=64", "model.heads=4", "model.depth=4", "model.mlp_ratio=4.0", "data.frames=4",
         "data.height=16", "data.width=16", "data.num_samples=512", "text.max_length=16", "train.ema_decay=0",
         "train.warmup_steps=0", "train.micro_batch_size=2", "train.grad_accum=1", "diffusion.cond_frames_prob=0"]
LAYOUTS = {"dp2": [], "tp2": ["parallel.tp=2"], "ulysses2": ["parallel.ulysses=2"], "ring2": ["parallel.ring=2"],
           "pp2": ["parallel.pp=2", "train.grad_accum=2"]}
PATTERN = (True, False, False, True)  # ABBA


def _train_worker(rank: int, world: int, layout: str, steps: int, root: str) -> list[dict]:
    from megasora.config import load_config
    from megasora.train import accounting
    from megasora.train.trainer import train
    original_step = accounting.StepAccounting.step
    switches = itertools.cycle(PATTERN)

    cpu = []

    @contextmanager
    def alternating(self):
        self.enabled = next(switches)
        start = time.thread_time()  # this thread's CPU time: what accounting adds, blind to other load
        with original_step(self):
            yield
        cpu.append(time.thread_time() - start)

    accounting.StepAccounting.step = alternating
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      MODEL + LAYOUTS[layout] + [f"train.steps={steps}", f"run.dir={root}/{layout}"])
    train(cfg)
    dist.barrier()
    if rank:
        return []
    records = [json.loads(line) for line in (Path(root) / layout / "metrics.jsonl").read_text().splitlines()]
    return [{**r, "cpu_s": c} for r, c in zip(records, cpu)]


def step_costs(layout: str, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        records = run_launched(_train_worker, 2, layout, steps, root)[0]
    records = records[warmup - warmup % len(PATTERN):]  # whole on/off/off/on blocks
    blocks = [records[i:i + 4] for i in range(0, len(records) - 3, 4)]
    paired = [(b[0]["step_time_s"] + b[3]["step_time_s"]) / (b[1]["step_time_s"] + b[2]["step_time_s"])
              for b in blocks]
    cpu_on = statistics.median(r["cpu_s"] for r in records if "mfu" in r)
    cpu_off = statistics.median(r["cpu_s"] for r in records if "mfu" not in r)
    on = [r["step_time_s"] for r in records if "mfu" in r]
    off = [r["step_time_s"] for r in records if "mfu" not in r]
    calls = statistics.median(sum(v for k, v in r.items() if k.startswith("comm_calls/")) for r in records if "mfu" in r)
    return {"layout": layout, "steps_on": len(on), "steps_off": len(off), "on_ms": 1e3 * statistics.median(on),
            "off_ms": 1e3 * statistics.median(off), "ratio": statistics.median(on) / statistics.median(off),
            "mean_ratio": statistics.fmean(on) / statistics.fmean(off), "paired": statistics.median(paired),
            "cpu_on_ms": 1e3 * cpu_on, "cpu_off_ms": 1e3 * cpu_off, "cpu_ratio": cpu_on / cpu_off,
            "calls": calls}


def seam_overhead(calls: int) -> dict:
    """Microseconds the wrapper adds to one collective call, counting and switched off, measured
    around a no-op stand-in for torch's function (no communication, so no noise from it)."""
    from megasora.parallel import comm_counter
    counter = comm_counter.COUNTER
    group = object()
    counter._names[id(group)] = "dp"  # what set_layout's naming would give this group

    def noop(tensor, op=None, group=None, async_op=False):
        return None

    wrapped = comm_counter._counted(noop, *comm_counter.WRAPPED["all_reduce"])
    x = torch.ones(16)

    def per_call(fn, counting: bool) -> float:
        best = float("inf")
        for _ in range(5):
            with counter.counting(counting):
                start = time.perf_counter()
                for _ in range(calls):
                    fn(x, group=group)
                best = min(best, (time.perf_counter() - start) / calls)
        return 1e6 * best

    raw, off, on = per_call(noop, False), per_call(wrapped, False), per_call(wrapped, True)
    counter.take()
    return {"off_us": off - raw, "on_us": on - raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=["dp2", "tp2", "ring2"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--seam-calls", type=int, default=20000)
    args = parser.parse_args()
    rows = []
    for layout in args.layouts:
        print(f"measuring {layout} ({args.steps} steps) ...", file=sys.stderr, flush=True)
        rows.append(step_costs(layout, args.steps, args.warmup))
    seam = seam_overhead(args.seam_calls)
    print(f"# {platform.node()} | {os.cpu_count()} CPUs | torch {torch.__version__} | gloo, 2 processes | "
          f"{time.strftime('%Y-%m-%d')} | load average {os.getloadavg()[0]:.1f}")
    print("| layout | collectives / step | step on (ms) | step off (ms) | on/off (medians) | on/off (means) | "
          "on/off (median of ABBA blocks) | step CPU on / off (ms) | CPU on/off |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['calls']:.0f} | {r['on_ms']:.1f} | {r['off_ms']:.1f} | {r['ratio']:.3f} | "
              f"{r['mean_ratio']:.3f} | {r['paired']:.3f} | {r['cpu_on_ms']:.1f} / {r['cpu_off_ms']:.1f} | "
              f"{r['cpu_ratio']:.3f} |")
    print(f"\nwrapper cost per collective call: {seam['on_us']:.2f} us counting, {seam['off_us']:.2f} us switched off")
    for r in rows:
        print(f"{r['layout']}: {r['calls']:.0f} calls x {seam['on_us']:.2f} us = "
              f"{100 * r['calls'] * seam['on_us'] * 1e-6 / (r['off_ms'] * 1e-3):.3f}% of the step")


if __name__ == "__main__":
    main()
