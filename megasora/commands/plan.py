"""`megasora plan`: which layout to run a config with on a cluster, before anything runs.

    megasora plan --config configs/dit-7b-1m.yaml --nodes 4 --gpus-per-node 8 --gpu h100 --top 5

Enumerates every layout the trainer accepts (tp, ulysses, ring, pp, dp, ZeRO stage,
activation checkpointing, micro-batch), drops those the memory model says do not fit, ranks
the rest by predicted throughput and prints the memory and step-time breakdown of each
(docs/planning.md explains every term). Exit 2 with one line when nothing fits.
"""
from __future__ import annotations

import argparse
import json
import time

from megasora.config import load_config
from megasora.plan.hardware import PlanError, load_hardware
from megasora.plan.search import search, smallest_fitting_nodes
from megasora.plan.workload import workload_from_config

GIB = 1024 ** 3


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _header(hardware, nodes: int, gpus: int, work) -> str:
    return (f"{nodes} nodes x {gpus} {hardware.name} ({_gib(hardware.memory_bytes)} GiB, "
            f"{hardware.peak_flops / 1e12:.3g} TFLOP/s x efficiency {hardware.efficiency}, intra-node "
            f"{hardware.intra_bytes_per_s / 1e9:.3g} GB/s, network {hardware.inter_bytes_per_s / 1e9:.3g} GB/s per GPU "
            f"x link efficiency {hardware.link_efficiency}); {work.tokens} tokens/sample, "
            f"{work.samples_per_rank} samples per dp rank per step")


def format_table(predictions: list) -> str:
    head = ("#  tp uly ring pp   dp zero ac          mbs  ga | mem GiB  wts  grd  opt  ema  buf  act  tmp allow |"
            " step s  comp recomp   comm bubble |  MFU  samples/s")
    lines = [head, "-" * len(head)]
    for i, p in enumerate(predictions, 1):
        lay, m, t = p.layout, p.memory, p.time
        ac = lay.activation_checkpointing + (f"/{lay.ac_every}" if lay.ac_every > 1 else "")
        comm = sum(t.comm_s.values())
        lines.append(
            f"{i:<2} {lay.tp:>2} {lay.ulysses:>3} {lay.ring:>4} {lay.pp:>2} {lay.dp:>4} {lay.zero_stage:>4} {ac:<11} "
            f"{lay.micro_batch_size:>3} {lay.grad_accum:>3} | {_gib(m.total_bytes):>7} {_gib(m.weights):>4} "
            f"{_gib(m.grads):>4} {_gib(m.optimizer):>4} {_gib(m.ema):>4} {_gib(m.zero_buffers):>4} "
            f"{_gib(m.activations):>4} {_gib(m.transient):>4} {_gib(m.allowance):>5} | {t.total_s:>6.3g} "
            f"{t.compute_s:>5.3g} {t.recompute_s:>6.3g} {comm:>6.3g} {t.bubble_s:>6.3g} | {p.mfu:>4.0%} "
            f"{p.samples_per_s:>10.4g}")
    return "\n".join(lines)


def why_top_wins(ranked: list) -> str:
    """One sentence: the top layout against the fastest one that differs in structure, compared
    per sample (layouts with more dp ranks also train more samples per step)."""
    top = ranked[0]
    rival = next((p for p in ranked[1:] if _structure(p) != _structure(top)), None)
    fit = f"it fits in {_gib(top.memory.total_bytes)} GiB"
    if rival is None:
        return f"{top.layout.describe()} wins: {fit} and no layout of another structure does."
    gaps = _per_sample_terms(rival)
    for key, value in _per_sample_terms(top).items():
        gaps[key] = gaps.get(key, 0.0) - value
    term, gap = max(gaps.items(), key=lambda kv: kv[1])
    lower = 1 - rival.samples_per_s / top.samples_per_s
    return (f"{top.layout.describe()} wins: {fit}, and the next layout of another structure "
            f"({rival.layout.describe()}) has {lower:.1%} lower throughput, mostly from {gap:.3g} s more "
            f"{term} per sample.")


def _structure(p) -> tuple:
    lay = p.layout
    return lay.tp, lay.ulysses, lay.ring, lay.pp, lay.activation_checkpointing


def _per_sample_terms(p) -> dict[str, float]:
    samples = p.layout.micro_batch_size * p.layout.grad_accum * p.layout.dp
    terms = {"compute": p.time.compute_s, "recompute": p.time.recompute_s, "pipeline bubble": p.time.bubble_s}
    terms.update({f"{axis} communication": s for axis, s in p.time.comm_s.items()})
    return {k: v / samples for k, v in terms.items()}


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.set))
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise PlanError(f"--nodes={args.nodes} and --gpus-per-node={args.gpus_per_node} must be >= 1")
    if args.tokens is not None and args.tokens < 1:
        raise PlanError(f"--tokens={args.tokens} must be >= 1 (video tokens per sample)")
    hardware = load_hardware(args.gpu)
    start = time.perf_counter()
    result = search(cfg, args.nodes, args.gpus_per_node, hardware, args.tokens, args.top)
    elapsed = time.perf_counter() - start
    if not result.ranked:
        more = smallest_fitting_nodes(cfg, args.nodes, args.gpus_per_node, hardware, args.tokens)
        least = result.smallest_fit
        best = f" (least memory: {least.layout.describe()}, {_gib(least.memory.total_bytes)} GiB)" if least else ""
        if more is None:
            fix = "no node count up to 4096 fits; shorten the clips (--tokens, data.tokens_per_microbatch)"
        elif more[1]:
            fix = f"the smallest node count that fits is {more[0]} (--nodes {more[0]})"
        else:
            fix = f"nothing fits up to 256 nodes; {more[0]} nodes do (--nodes {more[0]})"
        raise PlanError(f"no layout of {args.config} fits {args.nodes} x {args.gpus_per_node} {hardware.name}{best}",
                        fix)
    if args.json:
        print(json.dumps([p.as_dict() for p in result.ranked], indent=1))
        return 0
    work, _ = workload_from_config(cfg, args.tokens)
    print(_header(hardware, args.nodes, args.gpus_per_node, work))
    print(f"{result.considered} layouts considered in {elapsed:.2f} s; the {len(result.ranked)} fastest that fit:")
    print(format_table(result.ranked))
    print(why_top_wins(result.ranked))
    print("run it with: " + " ".join(f"--set {o}" for o in result.ranked[0].layout.as_overrides()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="predict memory and step time of every layout; rank those that fit",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/dit-7b-1m.yaml)")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    p.add_argument("--gpu", default="h100",
                   help="h100 | h200 | a100 | b200 | cpu (measured here) | a cluster YAML file (default h100)")
    p.add_argument("--tokens", type=int, default=None,
                   help="video tokens per sample (default: the config's latent grid or data.tokens_per_microbatch)")
    p.add_argument("--top", type=int, default=10, help="how many layouts to print (default 10)")
    p.add_argument("--json", action="store_true", help="print the ranked layouts as a JSON list")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.set_defaults(func=run)
