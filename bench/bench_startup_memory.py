"""Peak host memory per rank at start-up: one process vs tp2 vs pp2 vs ZeRO-3 over dp2 or ulysses2,
whole-model build vs meta + materialize.

    python bench/bench_startup_memory.py                  # ~1B-parameter DiT, every case, markdown table
    python bench/bench_startup_memory.py --hidden 256     # a small model, for a quick look
    python bench/bench_startup_memory.py --cases "one process,ZeRO-3 dp2,ZeRO-3 ulysses2" --whole ""

Each case runs the real start-up (megasora/train/startup.py: training_run, gloo processes
launched like torchrun) with the trainer's model builder up to the DeepSpeed engine, and
records per rank the peak resident set (ru_maxrss) after the imports (baseline) and once the
model is built. It stops there: the engine's own state (fp32 master, Adam moments, ZeRO
buckets) goes to the GPU on a GPU run and is plan/memory.py's memory_breakdown; on this CPU
it would take the host and hide the start-up term. The `whole` builder is the start-up before
materialize: the whole model on every rank, then parallelize slices it and the pipeline keeps
one stage. Under ZeRO-3 (train/engine.py zero3_partitioner) a rank keeps each parameter's dp x sp
partition as soon as it is drawn; `params held` is then the partitions' bytes (ds_tensor).
Predicted: plan/memory.py startup_host_bytes (parameter bytes; the baseline is the interpreter,
torch and DeepSpeed).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

GIB = 1024 ** 3
CASES = {"one process": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2", "train.grad_accum=2"]),
         "ZeRO-3 dp2": (2, ["train.zero_stage=3"]),
         "ZeRO-3 ulysses2": (2, ["train.zero_stage=3", "parallel.ulysses=2"]),
         "ZeRO-3 dp2 x ulysses2": (4, ["train.zero_stage=3", "parallel.ulysses=2"])}


class StopBeforeEngine(Exception):
    """Raised by the measured builder: the start-up has built the model, the engine comes next."""


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def held_bytes(p) -> int:
    """Bytes a parameter holds on this rank: its ZeRO-3 partition if partitioned, else itself."""
    tensor = p.ds_tensor if hasattr(p, "ds_tensor") else p
    return tensor.numel() * tensor.element_size()


def whole_model_build(cfg, env):
    """The start-up before materialize (for the comparison): every rank builds the whole model."""
    from megasora.models import build_dit
    from megasora.train.pipeline_loop import pipeline_stage
    from megasora.train.trainer import setup_parallel
    model = build_dit(cfg)
    parallel = setup_parallel(cfg, model, env.world_size)
    return (pipeline_stage(cfg, model, parallel.mpu.mesh) if cfg.parallel.pp > 1 else model), parallel


def _worker(rank: int, world: int, overrides: list[str], builder: str) -> dict[str, int]:
    import deepspeed  # noqa: F401  (imported before the baseline: the engine needs it anyway)

    from megasora.config import load_config
    from megasora.parallel.mesh import validate_config_layout
    from megasora.train.startup import training_run
    from megasora.train.trainer import build_parallel_dit
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    build = build_parallel_dit if builder == "materialize" else whole_model_build
    marks = {"baseline": peak_rss()}

    def measured(cfg, env):
        model, _ = build(cfg, env)
        marks["built"] = peak_rss()
        marks["params"] = sum(held_bytes(p) for p in model.parameters())
        raise StopBeforeEngine

    try:
        with training_run(cfg, validate_config_layout(cfg, world), None, measured):
            pass
    except StopBeforeEngine:
        pass
    return marks


def run_case(name: str, arch: list[str], builder: str) -> dict:
    from megasora.config import load_config
    from megasora.plan.memory import startup_host_bytes, total_params
    from megasora.plan.workload import layout_from_config, workload_from_config

    from parallel_utils import run_launched
    world, parallel = CASES[name]
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = arch + parallel + [f"run.dir={run_dir}"]
        ranks = run_launched(_worker, world, overrides, builder)
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    work = workload_from_config(cfg)[0]
    return {"case": name, "builder": builder, "ranks": ranks, "total": total_params(work),
            "predicted": startup_host_bytes(work, layout_from_config(cfg, world))}


def table(rows: list[dict]) -> str:
    one = next(r for r in rows if r["case"] == "one process" and r["builder"] == "materialize")
    one_peak = max(m["built"] for m in one["ranks"])
    one_model = max(m["built"] - m["baseline"] for m in one["ranks"])
    lines = ["| case | build | params held (GiB) | predicted (GiB) | peak above baseline (GiB) | peak RSS "
             "(GiB) | ratio vs one process: RSS / above baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        worst = max(r["ranks"], key=lambda m: m["built"])
        above = worst["built"] - worst["baseline"]
        predicted = r["predicted"] if r["builder"] == "materialize" else r["total"] * 4
        lines.append(f"| {r['case']} | {r['builder']} | {worst['params'] / GIB:.2f} | {predicted / GIB:.2f} | "
                     f"{above / GIB:.2f} | {worst['built'] / GIB:.2f} | "
                     f"{worst['built'] / one_peak:.2f} / {above / one_model:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--cases", default="one process,tp2,pp2")
    parser.add_argument("--whole", default="tp2", help="cases also run with the whole-model build ('' for none)")
    args = parser.parse_args()
    arch = [f"model.hidden={args.hidden}", f"model.depth={args.depth}", f"model.heads={args.heads}"]
    rows = [run_case(name, arch, "materialize") for name in args.cases.split(",")]
    rows += [run_case(name, arch, "whole") for name in args.whole.split(",") if name]
    print(f"DiT hidden={args.hidden} depth={args.depth} heads={args.heads}: {rows[0]['total'] / 1e9:.2f} B parameters")
    print(table(rows))


if __name__ == "__main__":
    main()
