"""`megasora submit`: render the sbatch script for a config and hand it to Slurm.

    megasora submit --config configs/tiny.yaml --nodes 4 --gpus-per-node 8 \
        --partition gpu --time 24:00:00 --set train.steps=100000 [--dry-run]

Everything checkable before the job queues is checked here (the config itself, world size
against the parallel layout, sbatch being present), so a bad launch fails in the terminal
in a second, not after hours in the queue.
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megasora.config import Config, load_config
from megasora.errors import PREEMPTED_EXIT_CODE, UserError
from megasora.parallel.mesh import LayoutError, validate_config_layout
from megasora.plan.hardware import load_hardware
from megasora.plan.search import fit_warning

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO_ROOT / "slurm" / "templates" / "train.sbatch"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class SubmitError(UserError, RuntimeError):
    """The job cannot be rendered or submitted; the message says what to change."""

    kind = "submit"


@dataclass
class JobSpec:
    config: Path
    nodes: int
    tasks_per_node: int
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str = "megasora"
    log_dir: Path = Path("slurm-logs")
    workdir: Path = Path(".")
    overrides: list[str] = field(default_factory=list)
    signal_seconds: int = 300
    max_restarts: int = 20
    omp_num_threads: int = 1
    sbatch_args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    python: str = sys.executable

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


# --- validation -----------------------------------------------------------------------

def model_parallel_size(cfg: Config) -> int:
    p = cfg.parallel
    return p.tp * p.ulysses * p.ring * p.pp


def check_layout(spec: JobSpec, cfg: Config) -> list[str]:
    """Raise if the world cannot hold the parallel layout; return warnings otherwise."""
    if spec.nodes < 1 or spec.tasks_per_node < 1:
        raise SubmitError(f"--nodes={spec.nodes} and tasks per node={spec.tasks_per_node} must be >= 1")
    p, mp = cfg.parallel, model_parallel_size(cfg)
    layout = f"tp({p.tp}) x ulysses({p.ulysses}) x ring({p.ring}) x pp({p.pp}) = {mp}"
    if spec.world_size % mp:
        # Smallest node count whose world the layout divides: mp / gcd(mp, tasks per node).
        step = mp // math.gcd(mp, spec.tasks_per_node)
        raise SubmitError(
            f"world size {spec.nodes} nodes x {spec.tasks_per_node} tasks = {spec.world_size} is "
            f"not divisible by the model-parallel size {layout}; with {spec.tasks_per_node} "
            f"tasks per node use a multiple of {step} nodes (e.g. --nodes {step * max(1, spec.nodes // step)})"
            f" or change parallel.* in the config")
    try:  # the model-dependent checks the trainer would make at start-up (heads, widths, ZeRO-3 x sp)
        validate_config_layout(cfg, spec.world_size)
    except LayoutError as err:
        raise SubmitError(str(err)) from err
    warnings = []
    if p.tp > spec.tasks_per_node:
        warnings.append(f"parallel.tp={p.tp} exceeds the {spec.tasks_per_node} tasks per node: "
                        "tensor-parallel all-reduces will cross the network on every layer")
    dp = spec.world_size // mp
    warnings.append(f"world {spec.world_size} = dp {dp} x tp {p.tp} x ulysses {p.ulysses} x ring "
                    f"{p.ring} x pp {p.pp}; global batch "
                    f"{cfg.train.micro_batch_size * cfg.train.grad_accum * dp} samples")
    return warnings


def check_spec(spec: JobSpec) -> None:
    if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", spec.time):
        raise SubmitError(f"--time={spec.time!r} is not a Slurm time (HH:MM:SS or D-HH:MM:SS)")
    if spec.gpus_per_node and spec.tasks_per_node != spec.gpus_per_node:
        raise SubmitError(f"--tasks-per-node={spec.tasks_per_node} differs from --gpus-per-node="
                          f"{spec.gpus_per_node}; MegaSora runs one rank per GPU")
    if spec.signal_seconds < 1:
        raise SubmitError("--signal-seconds must be >= 1 (time to save a checkpoint before the limit)")


# --- rendering ------------------------------------------------------------------------

def _directives(spec: JobSpec) -> str:
    lines = []
    if spec.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        lines.append(f"#SBATCH --account={spec.account}")
    lines += [f"#SBATCH {arg}" for arg in spec.sbatch_args]
    return "\n".join(lines)


def _env_exports(spec: JobSpec) -> str:
    lines = []
    for item in spec.env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise SubmitError(f"--env {item!r} must look like NAME=value")
        lines.append(f"export {key}={shlex.quote(value)}")
    return "\n".join(lines)


def render(spec: JobSpec, template: str) -> str:
    values = {
        "job_name": spec.job_name,
        "nodes": str(spec.nodes),
        "tasks_per_node": str(spec.tasks_per_node),
        "directives": _directives(spec),
        "time": spec.time,
        "workdir": shlex.quote(str(spec.workdir)),
        "log_dir": str(spec.log_dir),
        "signal_seconds": str(spec.signal_seconds),
        "preempted_exit_code": str(PREEMPTED_EXIT_CODE),
        "max_restarts": str(spec.max_restarts),
        "omp_num_threads": str(spec.omp_num_threads),
        "env_exports": _env_exports(spec),
        "python": shlex.quote(spec.python),
        "config": shlex.quote(str(spec.config)),
        "overrides": "".join(f" --set {shlex.quote(o)}" for o in spec.overrides),
    }
    unknown = sorted(set(PLACEHOLDER.findall(template)) - set(values))
    if unknown:
        raise SubmitError(f"template has unknown placeholders {unknown}; known: {sorted(values)}")
    if any(c.isspace() for c in str(spec.log_dir)):
        # #SBATCH lines are not parsed by a shell: no quoting, so no spaces.
        raise SubmitError(f"log directory {spec.log_dir} contains whitespace; Slurm cannot take it")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# --- submitting -----------------------------------------------------------------------

def sbatch(script: Path) -> str:
    """Submit and return the job id."""
    if shutil.which("sbatch") is None:
        raise SubmitError("`sbatch` not found on PATH: run on a Slurm login node (or with "
                          "SLURM_CONF set for the local test cluster), or use --dry-run to print "
                          "the script")
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch rejected the job: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def spec_from_args(args: argparse.Namespace, cfg: Config) -> JobSpec:
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    log_dir = Path(args.log_dir) if args.log_dir else Path(cfg.run.dir) / "slurm"
    return JobSpec(
        config=Path(args.config).resolve(), nodes=args.nodes, tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
        partition=args.partition, account=args.account,
        job_name=args.job_name or Path(args.config).stem, log_dir=log_dir.resolve(),
        workdir=Path.cwd(), overrides=list(args.set), signal_seconds=args.signal_seconds,
        max_restarts=args.max_restarts, omp_num_threads=args.omp_num_threads,
        sbatch_args=list(args.sbatch_arg), env=list(args.env),
    )


def prepare_job(args: argparse.Namespace) -> tuple[JobSpec, str, list[str]]:
    """Every check and the rendering `submit` does before queuing: (spec, script, notes).
    Raises a UserError; `megasora scale submit` calls this once per point."""
    cfg = load_config(args.config, list(args.set))
    spec = spec_from_args(args, cfg)
    check_spec(spec)
    notes = check_layout(spec, cfg) + fit_notes(spec, cfg, getattr(args, "gpu", None) or "h100")
    template = Path(args.template or DEFAULT_TEMPLATE)
    try:
        text = template.read_text()
    except OSError as err:  # the template: the user's --template path or a broken install
        raise SubmitError(f"cannot read the sbatch template: {err}", "pass --template PATH to an existing "
                          "file") from err
    return spec, render(spec, text), notes


def fit_notes(spec: JobSpec, cfg: Config, gpu: str) -> list[str]:
    """The planner's memory check (megasora/plan) of a GPU job's layout: a warning if it won't fit."""
    if not spec.gpus_per_node:
        return []
    warning = fit_warning(cfg, spec.nodes, spec.gpus_per_node, load_hardware(gpu))
    return [f"warning: {warning}"] if warning else []


def submit_script(spec: JobSpec, script: str) -> tuple[str, Path]:
    """Write the script next to the job's logs and sbatch it: (job id, script path)."""
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    path = spec.log_dir / f"{spec.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    return sbatch(path), path


def run(args: argparse.Namespace) -> int:
    try:
        spec, script, notes = prepare_job(args)
    except UserError as err:
        print(err.line(), file=sys.stderr)
        return 2
    for note in notes:
        print(note if note.startswith("warning:") else f"note: {note}", file=sys.stderr)
    if args.dry_run:
        print(script, end="")
        return 0
    try:
        job_id, path = submit_script(spec, script)
    except SubmitError as err:
        print(err.line(), file=sys.stderr)
        return 2
    print(f"submitted job {job_id}: script {path}, log {spec.log_dir}/{spec.job_name}-{job_id}.out",
          file=sys.stderr)
    print(job_id)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("submit", help="render an sbatch script for a config and submit it",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny.yaml)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, passed to every rank (repeatable)")
    add_slurm_arguments(p)
    p.add_argument("--gpu", default="h100", help="GPU model for the planner's fit check of GPU jobs: h100 | h200 "
                   "| a100 | b200 | a cluster YAML file (megasora/plan/hardware.py)")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.set_defaults(func=run)


def add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    """The job options of `megasora submit`, shared with `megasora scale submit`."""
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 = CPU job (no --gpus line)")
    p.add_argument("--tasks-per-node", type=int, default=0,
                   help="ranks per node; default: gpus per node, or 1")
    p.add_argument("--cpus-per-task", type=int, default=None, help="dataloader + host threads")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--job-name", default=None, help="default: the config file's name")
    p.add_argument("--log-dir", default=None, help="default: <run.dir>/slurm")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this long before the time limit: checkpoint, exit, requeue")
    p.add_argument("--max-restarts", type=int, default=20, help="stop requeueing after this many")
    p.add_argument("--omp-num-threads", type=int, default=1)
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra #SBATCH line, e.g. --sbatch-arg=--exclusive (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="export in the job, e.g. --env NCCL_SOCKET_IFNAME=ib0 (repeatable)")
    p.add_argument("--template", default=None, help=f"sbatch template (default {DEFAULT_TEMPLATE})")
