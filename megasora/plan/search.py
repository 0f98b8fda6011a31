"""Layout search: every layout the trainer's validator accepts x ZeRO stage x checkpointing x
micro-batch, the non-fitting dropped, the rest ranked by predicted throughput (samples/s).

Each data-parallel rank keeps the config's samples per step (train.micro_batch_size x
train.grad_accum, or the micro-batch data.tokens_per_microbatch gives); a micro-batch b splits
them into grad_accum = samples / b micro-batches (at least pp with a pipeline, which 1F1B needs).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterator

from megasora.config import AC_MODES
from megasora.parallel.mesh import LayoutError, validate_config_layout
from megasora.plan.hardware import Hardware
from megasora.plan.memory import memory_breakdown
from megasora.plan.predict import Prediction, predict_workload
from megasora.plan.workload import Layout, Workload, workload_from_config

ZERO_STAGES = (0, 1, 2, 3)
AC_EVERY = (1, 2)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_accepted(cfg: Any, world: int, tp: int, ulysses: int, ring: int, pp: int, zero_stage: int) -> bool:
    """What the trainer would accept: mesh.validate_config_layout plus the pipeline rules of
    config.validate (ZeRO 1/2 with pp > 1)."""
    view = SimpleNamespace(parallel=SimpleNamespace(tp=tp, ulysses=ulysses, ring=ring, pp=pp),
                           model=cfg.model, train=SimpleNamespace(zero_stage=zero_stage))
    try:
        validate_config_layout(view, world)
    except LayoutError:
        return False
    return pp == 1 or zero_stage in (1, 2)


def parallel_degrees(cfg: Any, world: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(tp, ulysses, ring, pp, zero_stage) of every accepted layout of `world` ranks."""
    for tp, ulysses, ring, pp in itertools.product(divisors(world), repeat=4):
        if world % (tp * ulysses * ring * pp) == 0:
            for zero in ZERO_STAGES:
                if layout_accepted(cfg, world, tp, ulysses, ring, pp, zero):
                    yield tp, ulysses, ring, pp, zero


def checkpointing_choices(depth: int) -> list[tuple[str, int]]:
    out = [("none", 1)]
    for mode in AC_MODES[1:]:
        out += [(mode, every) for every in AC_EVERY if every <= depth]
    return out


def candidates(cfg: Any, work: Workload, world: int) -> Iterator[Layout]:
    samples = work.samples_per_rank
    micro_batches = [b for b in divisors(samples)]
    for tp, ulysses, ring, pp, zero in parallel_degrees(cfg, world):
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


def search(cfg: Any, nodes: int, gpus_per_node: int, hardware: Hardware, tokens: int | None = None,
           top: int | None = None) -> SearchResult:
    """Rank every accepted layout of nodes x gpus_per_node GPUs that fits `hardware`."""
    work, _ = workload_from_config(cfg, tokens)
    world = nodes * gpus_per_node
    allowance = hardware.allowance
    fitting, considered, least = [], 0, None
    for layout in candidates(cfg, work, world):
        considered += 1
        memory = memory_breakdown(work, layout, allowance)
        if least is None or memory.total_bytes < least[1].total_bytes:
            least = (layout, memory)
        if memory.total_bytes <= hardware.memory_bytes:
            fitting.append(predict_workload(cfg, work, layout, hardware, gpus_per_node, memory))
    fitting.sort(key=lambda p: (-p.samples_per_s, p.memory.total_bytes))
    smallest = predict_workload(cfg, work, least[0], hardware, gpus_per_node, least[1]) if least else None
    return SearchResult(ranked=fitting[:top] if top else fitting, considered=considered, smallest_fit=smallest)


def fits_anywhere(cfg: Any, work: Workload, world: int, hardware: Hardware) -> bool:
    allowance = hardware.allowance
    return any(memory_breakdown(work, layout, allowance).total_bytes <= hardware.memory_bytes
               for layout in candidates(cfg, work, world))


LINEAR_NODE_LIMIT = 256  # every node count up to here is tried; beyond it, powers of two


def smallest_fitting_nodes(cfg: Any, nodes: int, gpus_per_node: int, hardware: Hardware,
                           tokens: int | None = None, limit: int = 4096) -> tuple[int, bool] | None:
    """(node count, exact) of the fewest nodes above `nodes` on which some layout fits: exact when
    every count up to it was tried (<= LINEAR_NODE_LIMIT), else the first power of two beyond.
    None if nothing up to `limit` fits."""
    work, _ = workload_from_config(cfg, tokens)
    for n in range(nodes + 1, limit + 1):
        if n > LINEAR_NODE_LIMIT and n & (n - 1):
            continue
        if fits_anywhere(cfg, work, n * gpus_per_node, hardware):
            return n, n <= LINEAR_NODE_LIMIT
    return None


def best_layout(cfg: Any, nodes: int, gpus_per_node: int, hardware: Hardware,
                tokens: int | None = None) -> Prediction | None:
    result = search(cfg, nodes, gpus_per_node, hardware, tokens, top=1)
    return result.ranked[0] if result.ranked else None
