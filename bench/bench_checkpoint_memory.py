"""Extra host memory a checkpoint save allocates over the steady state, per rank, counted exactly.

    python bench/bench_checkpoint_memory.py              # tp2 and pp2: prints the markdown table
    python bench/bench_checkpoint_memory.py --case pp2

Each case trains a small DiT (configs/tiny.yaml widened to hidden 256, depth 4: 6.2 M parameters,
24 MiB of fp32 EMA) for 2 steps in 2 gloo processes and measures inside TrainingLoop.save, which
is the whole save path (client state, EMA, CheckpointManager.save with DeepSpeed's files):

- torch:  the peak of torch's CPU allocations over the bytes live when the save began: every
          allocation and free of torch's CPU allocator, in order, from the profiler's memory
          events (tensors, storages torch.load or pickling creates, byte buffers of collectives);
- python: tracemalloc's peak of the Python heap over its level when the save began (the pickled
          buffers of object collectives);
- extra:  torch + python (an upper bound: the two peaks need not coincide);
- of it in DeepSpeed: torch's peak inside engine.save_checkpoint over the level when it began.

The table also gives the rank's EMA bytes (the steady-state size the save must not multiply).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SMALL_DIT = ["model.hidden=256", "model.depth=4", "model.heads=4", "train.steps=2", "train.save_every=0",
             "train.ema_decay=0.9", "train.sample_every=0"]
CASES = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2", "train.zero_stage=1", "train.grad_accum=2", "train.micro_batch_size=1"],
}


def torch_peak_bytes(prof, window: tuple[int, int] | None = None) -> int:
    """Peak of the running sum of the profiler's CPU memory events (in issue order) over its level
    when `window` (time.time_ns() bounds; default: the whole profile) began."""
    from torch.autograd import DeviceType
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU), key=lambda e: e.start_ns())
    start, end = window or (0, 2 ** 63)
    current, base, peak = 0, None, 0
    for event in events:
        if base is None and event.start_ns() >= start:
            base = peak = current
        current += event.nbytes()
        if base is not None and event.start_ns() <= end:
            peak = max(peak, current)
    return peak - (base or 0)


def _worker(rank: int, world: int, overrides: list[str], run_dir: str) -> dict[str, int]:
    import tracemalloc

    from deepspeed import DeepSpeedEngine
    from torch.profiler import ProfilerActivity, profile

    from megasora.config import load_config
    from megasora.train import trainer
    from megasora.train.loop import TrainingLoop

    measured: dict[str, int] = {}
    real_save, real_engine_save = TrainingLoop.save, DeepSpeedEngine.save_checkpoint
    window: list[int] = []

    def engine_save(*args, **kwargs):
        window.append(time.time_ns())
        try:
            return real_engine_save(*args, **kwargs)
        finally:
            window.append(time.time_ns())

    def measured_save(self: TrainingLoop, step: int, samples: int) -> None:
        measured["ema"] = self.ema.nbytes()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            real_save(self, step, samples)
        measured["python"] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        measured["torch"] = torch_peak_bytes(prof)
        measured["deepspeed"] = torch_peak_bytes(prof, (window[0], window[1]))

    TrainingLoop.save, DeepSpeedEngine.save_checkpoint = measured_save, engine_save
    cfg = load_config(REPO / "configs" / "tiny.yaml", SMALL_DIT + overrides + [f"run.dir={run_dir}"])
    trainer.train(cfg)
    return measured


MIB = 1024 ** 2
HEADER = ["| case | rank | EMA on the rank (MiB) | torch extra (MiB) | of it in DeepSpeed (MiB) | "
          "Python heap extra (MiB) | extra / EMA |", "|---|---|---|---|---|---|---|"]


def run_cases(doc: str, cases: dict[str, list[str]], worker, world: int, header: list[str], row) -> None:
    """The command line of these benchmarks: --case NAME (default all); each case runs `worker` in
    `world` gloo processes and prints row(name, rank, its result) under the markdown `header`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(cases), action="append", help="default: all")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from parallel_utils import run_launched
    print("\n".join(header), flush=True)
    for name in args.case or list(cases):
        with tempfile.TemporaryDirectory() as run_dir:
            ranks = run_launched(worker, world, cases[name], run_dir)
        for rank, result in enumerate(ranks):
            print(row(name, rank, result), flush=True)


def _row(name: str, rank: int, m: dict[str, int]) -> str:
    extra = m["torch"] + m["python"]
    return (f"| {name} | {rank} | {m['ema'] / MIB:.2f} | {m['torch'] / MIB:.2f} | {m['deepspeed'] / MIB:.2f} | "
            f"{m['python'] / MIB:.2f} | {extra / m['ema']:.2f} |")


def main() -> None:
    run_cases(__doc__, CASES, _worker, 2, HEADER, _row)


if __name__ == "__main__":
    main()
