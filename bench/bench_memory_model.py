"""The planner's memory model (megasora/plan/memory.py) against exact live-tensor measurement.

    python bench/bench_memory_model.py            # every case of CASES, prints the markdown table
    python bench/bench_memory_model.py --case 0   # one case

Each case runs the real trainer (DeepSpeed engine, EMA, the real data stream) for 2 steps in
1, 2 or 4 gloo processes under megasora.train.memory_probe.LiveTensorBytes, which counts every
tensor storage ATen creates while it is alive. Measured, per rank:

- peak:   the largest live bytes during step 2 (optimizer state exists by then),
- data:   live bytes the data stream holds (the synthetic clips and their caption embeddings:
          not training state, so not in the model and subtracted),
- static: live bytes at the start of step 2 (weights, grads, optimizer, EMA; minus data).

Predicted: memory_breakdown(..., allowance=False).live_bytes (no allowance: that covers
the CUDA allocator and workspaces, which a tensor count does not see). The table shows the
worst rank. tests/test_plan_memory.py asserts |predicted / measured - 1| <= 10% on each case.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

# Synthetic data at the quickstart model's latent size (3 x 12 x 20 latents -> 180 tokens, MiniLM text):
# the quickstart itself reads shards, which need the VAE; the DiT is the same but for 3 input channels.
QUICKSTART = ["data.kind=synthetic", "data.frames=3", "data.height=12", "data.width=20", "data.num_samples=16",
              "model.in_channels=3", "vae.latent_channels=3"]  # the synthetic clips are RGB


# Rank-8 adapters on every block linear (the Wan LoRA presets' targets), base frozen, no EMA.
LORA = ("train.lora.rank=8", "train.ema_decay=0", "train.lora.targets=[attn.q,attn.k,attn.v,attn.out,cross_attn.q,"
        "cross_attn.k,cross_attn.v,cross_attn.out,mlp.fc1,mlp.fc2]")
# The Wan family (docs/wan.md) at a tiny width: its fp32 residual arithmetic, qk-norms and shared
# time projection are terms of their own in plan/memory.py.
WAN = ("model.family=wan", "model.hidden=64", "model.heads=4", "model.ffn_dim=256", "model.text_len=32",
       "model.freq_dim=64")


@dataclass(frozen=True)
class Case:
    name: str
    config: str
    world: int
    overrides: tuple[str, ...] = field(default_factory=tuple)


CASES = [
    Case("tiny single, ZeRO-2, none", "configs/tiny.yaml", 1),
    Case("tiny single, full AC", "configs/tiny.yaml", 1, ("train.activation_checkpointing=full",)),
    Case("tiny single, selective AC", "configs/tiny.yaml", 1, ("train.activation_checkpointing=selective",)),
    Case("tiny tp2, none", "configs/tiny.yaml", 2, ("parallel.tp=2",)),
    Case("tiny ulysses2, selective", "configs/tiny.yaml", 2,
         ("parallel.ulysses=2", "train.activation_checkpointing=selective")),
    Case("tiny ring2, full, ZeRO-1", "configs/tiny.yaml", 2,
         ("parallel.ring=2", "train.activation_checkpointing=full", "train.zero_stage=1")),
    Case("tiny dp2, ZeRO-2, none, mbs 4", "configs/tiny.yaml", 2, ("train.micro_batch_size=4",)),
    Case("tiny pp2, ZeRO-1, none, 4 micro-batches", "configs/tiny.yaml", 2,
         ("parallel.pp=2", "train.zero_stage=1", "train.micro_batch_size=1", "train.grad_accum=4")),
    Case("tiny single, bf16, ZeRO-2, selective", "configs/tiny.yaml", 1,
         ("train.precision=bf16", "train.activation_checkpointing=selective")),
    Case("tiny dp2, bf16, ZeRO-1, none", "configs/tiny.yaml", 2,
         ("train.precision=bf16", "train.zero_stage=1")),
    Case("quickstart single, none", "configs/quickstart.yaml", 1, QUICKSTART),
    Case("quickstart tp2, full every 2nd", "configs/quickstart.yaml", 2,
         QUICKSTART + ["parallel.tp=2", "train.activation_checkpointing=full", "train.ac_every=2"]),
    Case("tiny ulysses4, none", "configs/tiny.yaml", 4, ("parallel.ulysses=4",)),
    Case("tiny ring4, selective", "configs/tiny.yaml", 4,
         ("parallel.ring=4", "train.activation_checkpointing=selective")),
    Case("tiny ZeRO-3 x ulysses2, none", "configs/tiny.yaml", 2, ("parallel.ulysses=2", "train.zero_stage=3")),
    Case("tiny pp2 x ring2, ZeRO-1, 4 micro-batches", "configs/tiny.yaml", 4,
         ("parallel.pp=2", "parallel.ring=2", "train.zero_stage=1", "train.micro_batch_size=1",
          "train.grad_accum=4")),
    Case("tiny LoRA r8 (all block linears), none", "configs/tiny.yaml", 1, LORA),
    Case("tiny LoRA r8 tp2, selective", "configs/tiny.yaml", 2,
         LORA + ("parallel.tp=2", "train.activation_checkpointing=selective")),
    Case("tiny Wan single, none", "configs/tiny.yaml", 1, WAN),
    Case("tiny Wan tp2, none", "configs/tiny.yaml", 2, WAN + ("parallel.tp=2",)),
    Case("tiny Wan ulysses2, selective", "configs/tiny.yaml", 2,
         WAN + ("parallel.ulysses=2", "train.activation_checkpointing=selective")),
]


def bucket_bytes(probe) -> int:
    """Live bytes of DeepSpeed's fixed-size reduce buckets (reduce_bucket_size = 5e8 elements each,
    allocated whole whatever the model's size): the storages of at least that many 16-bit elements."""
    from megasora.plan.memory import REDUCE_BUCKET_ELEMENTS
    return sum(nbytes for nbytes in probe._live.values() if nbytes >= 2 * REDUCE_BUCKET_ELEMENTS)


def _worker(rank: int, world: int, config: str, overrides: list[str], run_dir: str) -> dict[str, int]:
    """One rank: 2 training steps under the live-tensor probe; returns its measured bytes."""
    from megasora.config import load_config
    from megasora.train import loop, trainer
    from megasora.train.memory_probe import LiveTensorBytes

    cfg = load_config(config, list(overrides) + [f"run.dir={run_dir}", "train.steps=2", "train.save_every=0"])
    probe = LiveTensorBytes(device="cpu")
    measured: dict[str, int] = {}
    build_stream = loop.build_stream

    def counted_stream(*args, **kwargs):
        before = probe.current_bytes
        stream = build_stream(*args, **kwargs)
        measured["data"] = probe.current_bytes - before
        return stream

    def probed(train_step):
        def probed_step(self, micro_batches, step):
            if step == 1:
                measured["static"] = probe.current_bytes
                measured["buckets"] = bucket_bytes(probe)
                probe.reset_peak()
            out = train_step(self, micro_batches, step)
            if step == 1:
                measured["peak"] = probe.peak_bytes
            return out
        return probed_step

    loop.build_stream = counted_stream
    loop.TrainingLoop.train_step = probed(loop.TrainingLoop.train_step)  # every loop's one step
    loop.TrainingLoop.save = lambda self, step, samples: None  # checkpoints are not the step's memory
    with probe:
        trainer.train(cfg)
    return measured


def measure(case: Case) -> list[dict[str, int]]:
    """Per-rank measured bytes of one case (spawns case.world processes)."""
    from parallel_utils import run_launched
    with tempfile.TemporaryDirectory() as run_dir:
        return run_launched(_worker, case.world, case.config, list(case.overrides), run_dir)


def predict(case: Case):
    from megasora.config import load_config
    from megasora.plan.memory import memory_breakdown
    from megasora.plan.workload import layout_from_config, workload_from_config
    cfg = load_config(case.config, list(case.overrides))
    work, micro = workload_from_config(cfg)
    return memory_breakdown(work, layout_from_config(cfg, case.world, micro), allowance=False)


def compare(case: Case) -> dict[str, float]:
    ranks = measure(case)
    worst = max(ranks, key=lambda r: r["peak"] - r["data"])
    pred = predict(case)
    measured = worst["peak"] - worst["data"]
    return {"measured": measured, "predicted": pred.live_bytes, "ratio": pred.live_bytes / measured,
            "static_measured": worst["static"] - worst["data"],
            "dynamic_measured": worst["peak"] - worst["static"],
            "dynamic_predicted": pred.live_bytes - pred.weights - pred.grads - pred.optimizer - pred.ema,
            "zero_buffers": pred.zero_buffers}


MIB = 1024 ** 2
HEADER = ["| case | procs | measured peak (MiB) | predicted (MiB) | pred/meas | without the reduce bucket: "
          "meas / pred (MiB) | ratio |", "|---|---|---|---|---|---|---|"]


def row(case: Case, r: dict[str, float]) -> str:
    bucket = r["zero_buffers"]
    rest_m, rest_p = r["measured"] - bucket, r["predicted"] - bucket
    return (f"| {case.name} | {case.world} | {r['measured'] / MIB:.2f} | {r['predicted'] / MIB:.2f} | "
            f"{r['ratio']:.3f} | {rest_m / MIB:.2f} / {rest_p / MIB:.2f} | {rest_p / rest_m:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", type=int, action="append", help="index into CASES (repeatable); default all")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    chosen = [CASES[i] for i in args.case] if args.case else CASES
    print("\n".join(HEADER), flush=True)
    for i, case in enumerate(chosen):
        print(f"[{i + 1}/{len(chosen)}] {case.name} ...", file=sys.stderr, flush=True)
        print(row(case, compare(case)), flush=True)


if __name__ == "__main__":
    main()
