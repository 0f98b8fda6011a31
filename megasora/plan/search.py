"""Layout search: every layout config.check_layout accepts (degrees x ZeRO stage) x checkpointing x
micro-batch, the non-fitting dropped, the rest ranked by predicted throughput (samples/s).

Each data-parallel rank keeps the config's samples per step (train.micro_batch_size x
train.grad_accum, or the micro-batch data.tokens_per_microbatch gives); a micro-batch b splits
them into grad_accum = samples / b micro-batches (at least pp with a pipeline, which 1F1B needs).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from megasora.config import (
    AC_MODES,
    CheckpointingMode,
    Config,
    LayoutError,
    ModelShape,
    OffloadTarget,
    ParallelConfig,
    ZeroStage,
    check_layout,
)
from megasora.hardware import Hardware
from megasora.plan.memory import memory_breakdown
from megasora.plan.predict import Prediction, predict_workload
from megasora.plan.workload import Layout, Workload, layout_from_config, workload_from_config

ZERO_STAGES: tuple[ZeroStage, ...] = (0, 1, 2, 3)
AC_EVERY = (1, 2)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parallel_degrees(model: ModelShape, world: int,
                     offload_optimizer: OffloadTarget) -> Iterator[tuple[int, int, int, int, ZeroStage]]:
    """(tp, ulysses, ring, pp, zero_stage) of every layout of `world` ranks that check_layout accepts,
    as config validation and the trainer's start-up would. A pipeline gets at least pp micro-batches
    (see `candidates`), so the check is asked with grad_accum = pp."""
    for tp, ulysses, ring, pp in itertools.product(divisors(world), repeat=4):
        if world % (tp * ulysses * ring * pp):
            continue  # not a layout of this world; check_layout would say so
        parallel = ParallelConfig(tp=tp, ulysses=ulysses, ring=ring, pp=pp)
        for zero in ZERO_STAGES:
            try:
                check_layout(parallel, model, zero_stage=zero, grad_accum=pp, offload_optimizer=offload_optimizer,
                             world_size=world)
            except LayoutError:
                continue
            yield tp, ulysses, ring, pp, zero


def checkpointing_choices(depth: int) -> list[tuple[CheckpointingMode, int]]:
    out: list[tuple[CheckpointingMode, int]] = [("none", 1)]
    for mode in AC_MODES[1:]:
        out += [(mode, every) for every in AC_EVERY if every <= depth]
    return out


def candidates(work: Workload, world: int, offload_optimizer: OffloadTarget) -> Iterator[Layout]:
    samples = work.samples_per_rank
    micro_batches = [b for b in divisors(samples)]
    for tp, ulysses, ring, pp, zero in parallel_degrees(work.arch, world, offload_optimizer):
        dp = world // (tp * ulysses * ring * pp)
        for (mode, every), b in itertools.product(checkpointing_choices(work.arch.depth), micro_batches):
            yield Layout(tp=tp, ulysses=ulysses, ring=ring, pp=pp, dp=dp, zero_stage=zero,
                         activation_checkpointing=mode, ac_every=every, micro_batch_size=b,
                         grad_accum=max(samples // b, pp if pp > 1 else 1))


@dataclass
class SearchResult:
    ranked: list[Prediction]   # fitting layouts, fastest first
    considered: int            # layouts evaluated
    smallest_fit: Prediction | None = None  # least memory among all, fitting or not (for messages)


def search(cfg: Config, nodes: int, gpus_per_node: int, hardware: Hardware, tokens: int | None = None,
           top: int | None = None) -> SearchResult:
    """Rank every accepted layout of nodes x gpus_per_node GPUs that fits `hardware`."""
    work, _ = workload_from_config(cfg, tokens)
    world = nodes * gpus_per_node
    allowance = hardware.allowance
    fitting, considered, least = [], 0, None
    for layout in candidates(work, world, cfg.train.offload_optimizer):
        considered += 1
        memory = memory_breakdown(work, layout, allowance)
        if least is None or memory.total_bytes < least[1].total_bytes:
            least = (layout, memory)
        if memory.total_bytes <= hardware.memory_bytes:
            fitting.append(predict_workload(work, layout, hardware, gpus_per_node, memory))
    fitting.sort(key=lambda p: (-p.samples_per_s, p.memory.total_bytes))
    smallest = predict_workload(work, least[0], hardware, gpus_per_node, least[1]) if least else None
    return SearchResult(ranked=fitting[:top] if top else fitting, considered=considered, smallest_fit=smallest)


def fits_anywhere(work: Workload, world: int, hardware: Hardware, offload_optimizer: OffloadTarget) -> bool:
    allowance = hardware.allowance
    return any(memory_breakdown(work, layout, allowance).total_bytes <= hardware.memory_bytes
               for layout in candidates(work, world, offload_optimizer))


LINEAR_NODE_LIMIT = 256  # every node count up to here is tried; beyond it, powers of two


def smallest_fitting_nodes(cfg: Config, nodes: int, gpus_per_node: int, hardware: Hardware,
                           tokens: int | None = None, limit: int = 4096) -> tuple[int, bool] | None:
    """(node count, exact) of the fewest nodes above `nodes` on which some layout fits: exact when
    every count up to it was tried (<= LINEAR_NODE_LIMIT), else the first power of two beyond.
    None if nothing up to `limit` fits."""
    work, _ = workload_from_config(cfg, tokens)
    for n in range(nodes + 1, limit + 1):
        if n > LINEAR_NODE_LIMIT and n & (n - 1):
            continue
        if fits_anywhere(work, n * gpus_per_node, hardware, cfg.train.offload_optimizer):
            return n, n <= LINEAR_NODE_LIMIT
    return None


def best_layout(cfg: Config, nodes: int, gpus_per_node: int, hardware: Hardware,
                tokens: int | None = None) -> Prediction | None:
    result = search(cfg, nodes, gpus_per_node, hardware, tokens, top=1)
    return result.ranked[0] if result.ranked else None


def fit_warning(cfg: Config, nodes: int, gpus_per_node: int, hardware: Hardware) -> str | None:
    """For `megasora submit`: None when the config's own layout is predicted to fit, else one
    line naming its largest memory term and the planner's best layout that fits."""
    work, micro = workload_from_config(cfg)
    prediction = predict_workload(work, layout_from_config(cfg, nodes * gpus_per_node, micro), hardware,
                                  gpus_per_node)
    if prediction.fits:
        return None
    gib = 1024 ** 3
    term, size = prediction.memory.largest_term()
    best = best_layout(cfg, nodes, gpus_per_node, hardware)
    advice = (f"the planner's best layout that fits: {best.layout.describe()} "
              f"({best.memory.total_bytes / gib:.1f} GiB; --set " + " --set ".join(best.layout.as_overrides()) + ")"
              if best else "no layout fits this many nodes (see `megasora plan`)")
    return (f"this job's layout is predicted NOT to fit: {prediction.memory.total_bytes / gib:.1f} GiB per GPU > "
            f"{hardware.memory_bytes / gib:.1f} GiB of {hardware.name} (largest term: {term} "
            f"{size / gib:.1f} GiB); {advice}")
