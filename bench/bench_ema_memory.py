"""EMA bytes per rank: the full fp32 copy of the rank's tp/pp parameters (before) vs the EMA
sharded over dp x sp (train/ema.py, after), counted exactly with the live-tensor probe.

    python bench/bench_ema_memory.py              # every case: prints the markdown table
    python bench/bench_ema_memory.py --case dp2xulysses2

Each case starts a real training run (DeepSpeed engine, configs/tiny.yaml widened to hidden 256,
depth 4: 6.2 M parameters) in 4 gloo processes and, on every rank, builds both EMAs of the
engine's module under megasora/train/memory_probe.py's LiveTensorBytes and updates each once:
"held" is what stays live after construction, "peak" the most live during construction and the
update, both over the bytes live before (the weights, tracked first) (ZeRO-3: the old EMA gathered every parameter to copy and update it). "Before" is the
EMA class of commit b3b7326 (git show), loaded from its source beside today's.
"""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from bench_checkpoint_memory import run_cases  # noqa: E402  (bench/, the script's directory)

BEFORE_COMMIT = "b3b7326"  # the last commit with the EMA whole on every dp x sp rank
SMALL_DIT = ["model.hidden=256", "model.depth=4", "model.heads=4", "train.steps=1", "train.ema_decay=0.9",
             "train.sample_every=0", "train.micro_batch_size=1"]
CASES = {  # 4 processes each
    "dp4": [],
    "dp2xulysses2": ["parallel.ulysses=2"],
    "ring4": ["parallel.ring=4"],
    "tp2xulysses2": ["parallel.tp=2", "parallel.ulysses=2"],
    "dp4_zero3": ["train.zero_stage=3"],
    "dp2xulysses2_zero3": ["train.zero_stage=3", "parallel.ulysses=2"],
}


def old_ema_module() -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:megasora/train/ema.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("ema_before")
    sys.modules["ema_before"] = module  # dataclasses look their module up
    exec(compile(source, "ema_before.py", "exec"), module.__dict__)
    return module


def _measure(build, module) -> dict[str, int]:
    """Live bytes the EMA `build()` makes holds after construction, and the peak through one update."""
    from megasora.train.memory_probe import LiveTensorBytes
    probe = LiveTensorBytes(device="cpu")
    # the weights (and ZeRO-3's partitions) exist already: views of them are not the EMA's bytes
    probe.track([*module.parameters(), *(getattr(p, "ds_tensor", None) for p in module.parameters())])
    base = probe.current_bytes
    with probe:
        ema = build()
        held = probe.current_bytes - base
        ema.update(module, 1)
    return {"held": held, "peak": probe.peak_bytes - base}


def _worker(rank: int, world: int, overrides: list[str], run_dir: str) -> dict[str, dict[str, int]]:
    from megasora.config import load_config
    from megasora.parallel.mesh import validate_config_layout
    from megasora.train.ema import EMA, ShardPlace
    from megasora.train.startup import training_run
    from megasora.train.trainer import build_parallel_dit
    cfg = load_config(REPO / "configs" / "tiny.yaml", SMALL_DIT + overrides + [f"run.dir={run_dir}"])
    before = old_ema_module()
    with training_run(cfg, validate_config_layout(cfg, world), None, build_parallel_dit) as run:
        module, mesh, zero = run.engine.module, run.parallel.mpu.mesh, cfg.train.zero_stage
        return {"before": _measure(lambda: before.EMA(module, 0.9, zero, before.ShardPlace.of(mesh)), module),
                "after": _measure(lambda: EMA(module, 0.9, zero, ShardPlace.of(mesh)), module)}


MIB = 1024 ** 2
HEADER = ["| case | rank | before: held / peak (MiB) | after: held / peak (MiB) | after / before (held) |",
          "|---|---|---|---|---|"]


def _row(name: str, rank: int, m: dict[str, dict[str, int]]) -> str:
    b, a = m["before"], m["after"]
    return (f"| {name} | {rank} | {b['held'] / MIB:.2f} / {b['peak'] / MIB:.2f} | "
            f"{a['held'] / MIB:.2f} / {a['peak'] / MIB:.2f} | {a['held'] / b['held']:.3f} |")


def main() -> None:
    run_cases(__doc__, CASES, _worker, 4, HEADER, _row)


if __name__ == "__main__":
    main()
