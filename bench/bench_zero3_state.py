"""Model state per rank (weights + gradients + optimizer + EMA) under ZeRO-3 over dp x sp at P = 4,
against one process (issue 22: <= 0.30 x), DeepSpeed's fixed-size reduce buckets apart.

    python bench/bench_zero3_state.py

Each case runs the real trainer (train/trainer.py: ZeRO-3 partitioned at initialisation over
dp x sp by train/engine.py zero3_partitioner, the EMA sharded over dp x sp by train/ema.py) for
2 steps under the live-tensor probe (bench/bench_memory_model.py's worker), and reads per rank
the live bytes at the start of step 2: everything the step does not free, i.e. the model state,
DeepSpeed's buckets and the data stream's clips (subtracted). The buckets (5e8 elements each,
allocated whole) are reported apart: they do not shrink with P and would hide the model state of
a model this size. The DiT is large enough (hidden 512) that its matrices exceed DeepSpeed's
param_persistence_threshold (1e5 elements): smaller ones stay gathered on every rank after use.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

import bench_memory_model as bench  # noqa: E402

MIB = 1024 ** 2
MODEL = ("model.hidden=512", "model.heads=8", "model.depth=4", "data.frames=3", "data.height=8", "data.width=8",
         "data.num_samples=16", "train.micro_batch_size=1", "train.ema_decay=0.99", "train.zero_stage=3")
CASES = [
    bench.Case("one process, ZeRO-3", "configs/tiny.yaml", 1, MODEL),
    bench.Case("ZeRO-3 dp2 x ulysses2", "configs/tiny.yaml", 4, (*MODEL, "parallel.ulysses=2")),
    bench.Case("ZeRO-3 ulysses2 x ring2", "configs/tiny.yaml", 4, (*MODEL, "parallel.ulysses=2", "parallel.ring=2")),
    bench.Case("ZeRO-3 ulysses4", "configs/tiny.yaml", 4, (*MODEL, "parallel.ulysses=4")),
]


def model_state_bytes(rank: dict[str, int]) -> int:
    return rank["static"] - rank["data"] - rank["buckets"]


def main() -> None:
    rows = [(case, bench.measure(case)) for case in CASES]
    one = max(model_state_bytes(r) for r in rows[0][1])
    print("| case | P = dp x sp | model state per rank, worst (MiB) | ratio vs one process | "
          "predicted (MiB) | buckets per rank (MiB) |")
    print("|---|---|---|---|---|---|")
    for case, ranks in rows:
        worst = max(model_state_bytes(r) for r in ranks)
        pred = bench.predict(case)
        predicted = pred.weights + pred.grads + pred.optimizer + pred.ema
        print(f"| {case.name} | {case.world} | {worst / MIB:.2f} | {worst / one:.3f} | {predicted / MIB:.2f} | "
              f"{max(r['buckets'] for r in ranks) / MIB:.0f} |")


if __name__ == "__main__":
    main()
