"""A scaling study: one training run per world size, planned before anything launches.

Batch arithmetic (global batch = micro_batch_size x grad_accum x dp):
- weak scaling keeps the batch per GPU: the global batch grows with the GPUs,
  global(G) = global(G0) x G / G0, G0 = the smallest point;
- strong scaling keeps the global batch (the smallest point's, or --global-batch).
Both keep train.micro_batch_size and solve train.grad_accum = global / (micro_batch_size x dp);
a point where that is not a whole number is an error naming the global batch that works.

Every point is validated exactly as the trainer would at start-up (config + layout), so a
study that plans is a study whose jobs start.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megasora.config import Config, ConfigError, load_config
from megasora.errors import UserError
from megasora.parallel.mesh import LayoutError, validate_config_layout

MODES = ("weak", "strong")
STUDY_FILE = "study.json"
# A local point's run directory also holds (megasora/scale/launch.py writes, status.py reads):
LAUNCH_FILE = "launch.json"  # pid + command, while it runs
EXIT_FILE = "exit.json"      # return code + seconds, once it ended
LOCAL_LOG = "train.log"      # torchrun's output
TIMEOUT_RC = 124             # a point stopped at --timeout reports what coreutils' timeout returns
POINT_OVERRIDE = re.compile(r"^(\d+):(.+)$")  # "4:parallel.tp=2": only at the point of size 4


class StudyError(UserError, ValueError):
    """The study cannot be planned or read as asked; the message names the fix."""

    kind = "study"


@dataclass
class Point:
    name: str             # "n2" = 2 Slurm nodes, "p4" = 4 local processes
    count: int            # what the user listed: nodes (Slurm) or processes (local)
    nodes: int
    procs_per_node: int
    overrides: list[str]  # every --set this point's training run gets, run.dir included
    run_dir: str
    layout: dict[str, int]
    global_batch: int
    grad_accum: int
    job_id: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass
class Study:
    config: str
    mode: str
    launcher: str         # "slurm" or "local"
    steps: int
    warmup: int
    out: str
    overrides: list[str]
    points: list[Point] = field(default_factory=list)
    planned_layouts: bool = False
    gpu: str | None = None  # planner hardware name used for predictions (None: measured CPU)

    def save(self) -> Path:
        path = Path(self.out) / STUDY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(path)  # a status call never reads half a file
        return path

    @classmethod
    def load(cls, out: str | Path) -> "Study":
        path = Path(out) / STUDY_FILE
        if not path.is_file():
            raise StudyError(f"{path} not found; give the --out directory of `megasora scale submit|run`")
        data = json.loads(path.read_text())
        points = [Point(**p) for p in data.pop("points")]
        return cls(**data, points=points)


def split_overrides(overrides: list[str], counts: list[int]) -> tuple[list[str], dict[int, list[str]]]:
    """`key=value` applies to every point, `N:key=value` only to the point of size N."""
    common: list[str] = []
    per_point: dict[int, list[str]] = {c: [] for c in counts}
    for item in overrides:
        match = POINT_OVERRIDE.match(item)
        if not match:
            common.append(item)
            continue
        count = int(match.group(1))
        if count not in per_point:
            raise StudyError(f"--set {item!r} names size {count}, which is not in the study {counts}; "
                             f"use one of {counts} before the colon")
        per_point[count].append(match.group(2))
    return common, per_point


def point_shape(launcher: str, count: int, procs_per_node: int) -> tuple[int, int]:
    """(nodes, processes per node): Slurm sizes count nodes, local sizes count processes on one node."""
    return (count, procs_per_node) if launcher == "slurm" else (1, count)


def solve_grad_accum(global_batch: int, micro_batch_size: int, dp: int) -> int | None:
    """grad_accum with micro_batch_size x grad_accum x dp == global_batch, or None if none is whole."""
    per_step = micro_batch_size * dp
    if global_batch < per_step or global_batch % per_step:
        return None
    return global_batch // per_step


def _load(config: str, overrides: list[str], where: str) -> Config:
    try:
        return load_config(config, overrides)
    except ConfigError as err:
        raise StudyError(f"{where}: {err}") from err


def _layout(cfg: Config, world: int, where: str) -> dict[str, int]:
    try:
        layout = validate_config_layout(cfg, world)
    except LayoutError as err:
        raise StudyError(f"{where} (world {world}): {err}; or set the layout of this point alone with "
                         f"--set SIZE:parallel.KEY=VALUE") from err
    return {"dp": layout.dp, "tp": layout.tp, "ulysses": layout.ulysses, "ring": layout.ring,
            "pp": layout.pp, "zero_stage": cfg.train.zero_stage}


def target_batches(mode: str, worlds: list[int], base_global: int, global_batch: int | None) -> list[int]:
    """The global batch each point must train with."""
    if mode == "strong":
        return [global_batch or base_global] * len(worlds)
    start = global_batch or base_global
    targets = []
    for world in worlds:
        if (start * world) % worlds[0]:
            raise StudyError(f"weak scaling from global batch {start} at {worlds[0]} GPUs gives "
                             f"{start * world / worlds[0]:g} samples at {world} GPUs",
                             f"use --global-batch {math.lcm(start, worlds[0])} (a multiple of {worlds[0]}, the "
                             "smallest point's GPUs, always works)")
        targets.append(start * world // worlds[0])
    return targets


def _batch_error(mode: str, target: int, mbs: int, point: str, dp: int, needed: list[int]) -> StudyError:
    lcm = math.lcm(*needed)
    keep = "keeps the global batch" if mode == "strong" else "keeps the batch per GPU"
    return StudyError(
        f"{mode} scaling {keep}: {target} samples at {point} (dp {dp}) is not micro_batch_size "
        f"{mbs} x dp {dp} x a whole grad_accum; use --global-batch with a multiple of {lcm}"
        + (" at the smallest point" if mode == "weak" else "")
        + " or a smaller --set train.micro_batch_size")


def plan_study(config: str, counts: list[int], procs_per_node: int, mode: str, steps: int, warmup: int,
               out: str, overrides: list[str], launcher: str, global_batch: int | None = None,
               layouts: dict[int, list[str]] | None = None) -> Study:
    """Resolve every point's layout, batch and overrides; raise StudyError on the first bad one.

    Slurm (`launcher="slurm"`): `counts` are node counts of `procs_per_node` ranks each;
    local: `counts` are process counts on this machine (`procs_per_node` unused).

    `layouts` (from the planner, `--plan`) gives extra `parallel.*`/`train.*` overrides per
    size; explicit `N:key=value` overrides win over them.
    """
    if mode not in MODES:
        raise StudyError(f"--mode {mode!r} is not one of {MODES}")
    if not counts or any(c < 1 for c in counts) or len(set(counts)) != len(counts):
        raise StudyError(f"sizes {counts} must be distinct integers >= 1, e.g. --nodes 1 2 4 8")
    if steps <= warmup:
        raise StudyError(f"--steps {steps} must exceed --warmup {warmup}: warm-up steps are not measured")
    counts = sorted(counts)
    common, per_point = split_overrides(overrides, counts)
    prefix = "n" if launcher == "slurm" else "p"
    shapes = [point_shape(launcher, c, procs_per_node) for c in counts]
    worlds = [nodes * procs for nodes, procs in shapes]

    staged = []  # (count, world, overrides, cfg, layout) before the batch is known
    for count, world in zip(counts, worlds):
        point_sets = [*common, *(layouts or {}).get(count, []), *per_point[count]]
        cfg = _load(config, point_sets, f"point {prefix}{count}")
        staged.append((count, world, point_sets, cfg, _layout(cfg, world, f"point {prefix}{count}")))

    first_cfg, first_layout = staged[0][3], staged[0][4]
    base_global = first_cfg.train.micro_batch_size * first_cfg.train.grad_accum * first_layout["dp"]
    targets = target_batches(mode, worlds, base_global, global_batch)
    study = Study(config=str(Path(config).resolve()), mode=mode, launcher=launcher, steps=steps,
                  warmup=warmup, out=str(Path(out).resolve()), overrides=list(overrides),
                  planned_layouts=bool(layouts))
    for (count, _, point_sets, cfg, layout), target, (nodes, procs) in zip(staged, targets, shapes):
        name, mbs = f"{prefix}{count}", cfg.train.micro_batch_size
        grad_accum = solve_grad_accum(target, mbs, layout["dp"])
        if grad_accum is None:
            raise _batch_error(mode, target, mbs, name, layout["dp"],
                               [s[3].train.micro_batch_size * s[4]["dp"] for s in staged])
        run_dir = str(Path(study.out) / "points" / name)
        final = [*point_sets, f"train.steps={steps}", f"train.grad_accum={grad_accum}",
                 "train.log_every=1", f"run.dir={run_dir}"]
        _load(config, final, f"point {name}")  # e.g. pipeline stages need grad_accum >= pp
        study.points.append(Point(name=name, count=count, nodes=nodes, procs_per_node=procs,
                                  overrides=final, run_dir=run_dir, layout=layout, global_batch=target,
                                  grad_accum=grad_accum))
    return study


def point_config(study: Study, point: Point) -> Config:
    """The resolved config a point trains with (its run's config.yaml once it started)."""
    saved = Path(point.run_dir) / "config.yaml"
    if saved.is_file():
        return load_config(saved)
    return load_config(study.config, point.overrides)


def describe(study: Study) -> list[str]:
    """One line per point, printed before launching."""
    lines = []
    for p in study.points:
        lay = p.layout
        lines.append(f"{p.name}: {p.nodes} node(s) x {p.procs_per_node} = {p.world_size} ranks, dp {lay['dp']} "
                     f"tp {lay['tp']} ulysses {lay['ulysses']} ring {lay['ring']} pp {lay['pp']} "
                     f"zero {lay['zero_stage']}, global batch {p.global_batch} (grad_accum {p.grad_accum})")
    return lines
