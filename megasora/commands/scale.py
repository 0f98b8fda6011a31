"""`megasora scale`: scaling studies across node counts (Slurm) or process counts (local torchrun)."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from megasora.commands.submit import add_slurm_arguments, prepare_job, submit_script
from megasora.config import load_config
from megasora.data.sources import check_source
from megasora.scale.launch import run_points
from megasora.scale.markdown import table
from megasora.scale.predict import planned_layouts
from megasora.scale.report import report
from megasora.scale.status import DONE, point_status
from megasora.scale.study import Point, Study, StudyError, describe, plan_study

log = logging.getLogger("megasora")

EPILOG = """examples:
  megasora scale submit --config configs/dit-3b.yaml --nodes 1 2 4 8 --gpus-per-node 8 --mode weak \\
      --steps 40 --warmup 10 --out studies/3b-weak --partition gpu --time 01:00:00
  megasora scale run --config configs/tiny.yaml --procs 1 2 4 --mode strong --steps 8 --warmup 2 --out studies/tiny
  megasora scale status studies/3b-weak
  megasora scale report studies/3b-weak      # scaling.csv, scaling.md, *.png in the study directory

--set KEY=VALUE applies to every point, --set N:KEY=VALUE only to the point of size N (nodes for
submit, processes for run), e.g. --set 8:parallel.tp=2. Weak scaling keeps the batch per GPU,
strong scaling the global batch; both adjust train.grad_accum. Guide: docs/scaling.md."""


def _study_arguments(p: argparse.ArgumentParser, size_flag: str, size_help: str) -> None:
    p.add_argument("--config", required=True, help="YAML preset every point trains, e.g. configs/tiny.yaml")
    p.add_argument(size_flag, dest="sizes", type=int, nargs="+", required=True, metavar="N", help=size_help)
    p.add_argument("--mode", choices=("weak", "strong"), default="weak",
                   help="weak: keep the batch per GPU (global batch grows); strong: keep the global batch "
                        "(default weak)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps per point, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of every number (default 2)")
    p.add_argument("--out", required=True, help="study directory: study.json, points/<name>/, the report")
    p.add_argument("--global-batch", type=int, default=None,
                   help="strong: the global batch of every point; weak: the smallest point's (default: "
                        "the config's micro_batch_size x grad_accum x dp at the smallest point)")
    p.add_argument("--set", action="append", default=[], metavar="[N:]KEY=VALUE",
                   help="config override for every point, or with N: for the point of size N (repeatable)")
    p.add_argument("--gpu", default=None,
                   help="planner hardware (h100|h200|a100|b200|FILE) for --plan, the predictions and submit's fit "
                        "check; default: h100 for GPU jobs, this CPU (measured) for CPU jobs and local runs")
    p.add_argument("--plan", action="store_true",
                   help="take each point's layout (tp, ulysses, ring, pp, ZeRO, checkpointing) from the planner's "
                        "best; N:parallel.* overrides still win")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("scale", help="scaling studies: submit/run a config at several sizes, status, report",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="scale_command", metavar="ACTION", required=True)

    s = sub.add_parser("submit", help="one Slurm job per node count (through `megasora submit`)",
                       description="Plan the study, check every point, then sbatch one job per node count.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _study_arguments(s, "--nodes", "node counts, e.g. --nodes 1 2 4 8")
    add_slurm_arguments(s)
    s.add_argument("--dry-run", action="store_true", help="print every point's sbatch script, submit nothing")
    s.set_defaults(func=run_submit)

    r = sub.add_parser("run", help="the same study on this machine through torchrun, one point after another",
                       description="Plan the study and train each process count in turn with torchrun --standalone.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _study_arguments(r, "--procs", "process counts, e.g. --procs 1 2 4")
    r.add_argument("--timeout", type=float, default=3600, help="seconds per point before it is stopped "
                   "and reported as a timeout (default 3600)")
    r.set_defaults(func=run_local)

    st = sub.add_parser("status", help="pending / running / done / failed per point",
                        description="Each point's state from squeue/sacct (Slurm) or its run directory (local).")
    st.add_argument("dir", help="study directory (--out of submit/run)")
    st.set_defaults(func=run_status)

    rep = sub.add_parser("report", help="scaling.csv, scaling.md and PNG plots in the study directory",
                         description="Summarize every point after its warm-up steps; failed points are listed "
                                     "with their reason and the rest still reports.")
    rep.add_argument("dir", help="study directory (--out of submit/run)")
    rep.set_defaults(func=run_report)


def _plan(args: argparse.Namespace, launcher: str, procs_per_node: int, gpu: str | None):
    """Plan (or find again) the study; `gpu` None = CPU, predicted from measured numbers."""
    layouts = planned_layouts(args.config, args.sizes, procs_per_node, launcher, args.set, gpu) \
        if args.plan else None
    study = plan_study(args.config, args.sizes, procs_per_node, args.mode, args.steps, args.warmup, args.out,
                       args.set, launcher, args.global_batch, layouts)
    study.gpu = gpu
    if (Path(study.out) / "study.json").is_file():
        old = Study.load(study.out)
        if [p.overrides for p in old.points] != [p.overrides for p in study.points] or old.mode != study.mode:
            raise StudyError(f"{study.out} already holds a different study; choose another --out or remove it")
        study = old  # same study again: keep its job ids and finished points
    for line in describe(study):
        print(line, file=sys.stderr)
    return study


def run_submit(args: argparse.Namespace) -> int:
    study = _plan(args, "slurm", args.tasks_per_node or args.gpus_per_node or 1,
                  (args.gpu or "h100") if args.gpus_per_node else None)
    if any(p.job_id for p in study.points) and not args.dry_run:
        raise StudyError(f"{study.out} was submitted already (jobs {[p.job_id for p in study.points]}); "
                         f"follow it with `megasora scale status {study.out}` or use another --out")
    if not args.dry_run:
        study.save()
    submit_points(study, args, args.dry_run)
    if not args.dry_run:
        print(f"follow with: megasora scale status {study.out}; then: megasora scale report {study.out}",
              file=sys.stderr)
    return 0


def point_job_args(args: argparse.Namespace, study: Study, point: Point) -> argparse.Namespace:
    """`megasora submit`'s arguments for one point: its nodes, overrides, job name and log dir."""
    base_name = args.job_name or Path(study.config).stem
    log_dir = Path(args.log_dir) / point.name if args.log_dir else Path(point.run_dir) / "slurm"
    return argparse.Namespace(**{**vars(args), "config": study.config, "nodes": point.nodes,
                                 "tasks_per_node": point.procs_per_node, "set": list(point.overrides),
                                 "job_name": f"{base_name}-{point.name}", "log_dir": str(log_dir)})


def submit_points(study: Study, args: argparse.Namespace, dry_run: bool) -> None:
    """One sbatch job per point; the job ids are saved in study.json as they are queued."""
    jobs = [(point, *prepare_job(point_job_args(args, study, point))) for point in study.points]
    for point, spec, script, notes in jobs:  # every point checked before the first is queued
        for note in notes:
            print(f"note: {point.name}: {note}", file=sys.stderr)
        if dry_run:
            print(f"# ---- {point.name}: {spec.job_name}\n{script}", end="")
            continue
        job_id, path = submit_script(spec, script)
        point.job_id = job_id
        study.save()
        print(f"{point.name}: submitted job {job_id} ({point.nodes} node(s)), script {path}", file=sys.stderr)


def run_local(args: argparse.Namespace) -> int:
    study = _plan(args, "local", 1, args.gpu)
    for point in study.points:  # one line now, rather than each point's torchrun failing into its log
        check_source(load_config(study.config, point.overrides))
    study.save()
    todo = [p for p in study.points if point_status(study, p).state != DONE]
    if len(todo) < len(study.points):
        log.info("%d of %d points already done in %s; running %s", len(study.points) - len(todo),
                 len(study.points), study.out, [p.name for p in todo])
    failed = run_points(replace(study, points=todo), args.timeout)
    print(f"{len(study.points) - failed}/{len(study.points)} points done; report: megasora scale report {study.out}",
          file=sys.stderr)
    return 1 if failed else 0


def run_status(args: argparse.Namespace) -> int:
    study = Study.load(args.dir)
    print(f"{'point':<7} {'ranks':>5}  {'job':<9} {'state':<8} {'steps':>9}  reason")
    for point in study.points:
        s = point_status(study, point)
        print(f"{point.name:<7} {point.world_size:>5}  {point.job_id or '-':<9} {s.state:<8} "
              f"{s.steps_done:>4}/{study.steps:<4}  {s.reason}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    rows, files = report(Study.load(args.dir))
    print("\n".join(table(rows)))
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0
