"""Pipeline bubble of the 1F1B schedule vs micro-batches m, next to the theory (p-1)/(m+p-1).

One process per stage (gloo, CPU), the real executor (megasora/parallel/pipeline_schedule.py)
and real point-to-point messages. Per step and stage, `busy` is the time spent inside
forward/backward compute and `wall` the step time (slowest stage); the measured bubble is 1 - mean(busy over stages)/wall,
reported as the median over the measured steps (the median resists preemption by other load).

Where the rest of the wall time goes, per stage (run_schedule's StageTimes): `recv` = blocked
waiting for an activation / gradient, `send` = waiting for the step's sends at its end. The
one-hop latency of a real-size message is measured in the same run (ping-pong between stage 0
and 1), and `sim` is the bubble an event model of the executor (blocking receives, async
sends, measured per-stage forward/backward times) predicts with that latency on every hop.
From the traced run itself: the in-run hop (sender's compute end to receiver's compute start,
for every message a stage sat idle for), the model with that hop, and the model replaying each
step's measured compute durations with no hop at all (the cost of compute-time jitter alone),
and with both.
`--prefetch on off` runs the executor with and without early-posted receives.

Two kinds of compute:
  model  a tiny DiT cut into p stages (megasora/parallel/pipeline.py), plain autograd, fp32;
  sleep  forward sleeps --sleep-ms, backward twice that, with real-size messages: isolates the
         schedule from the CPU, which matters when p exceeds the number of cores.

    OMP_NUM_THREADS=1 python bench/bench_pipeline.py --stages 2 4 --micro 1 2 4 8 16 --compute model sleep
    OMP_NUM_THREADS=1 python bench/bench_pipeline.py --stages 4 --micro 4 16 --compute sleep --sleep-ms 20 \
        --prefetch on off
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megasora.config import load_config
from megasora.models import build_dit
from megasora.parallel.pipeline import build_stage
from megasora.parallel.pipeline_schedule import StageFunctions, StageLink, one_f_one_b, run_schedule

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.hidden=64", "model.heads=4", "model.depth=8", "model.mlp_ratio=4.0", "text.dim=64"]
LATENTS = (1, 3, 2, 16, 16)  # (B, C, T, H, W): 2 x 8 x 8 = 128 tokens per micro-batch


def model_functions(stage, inputs, text_len: int) -> StageFunctions:
    latents, t, text, mask = inputs

    def forward(i, received):
        out = stage(latents, t, text, mask, None, received)
        return out.pow(2).mean() if stage.is_last else out  # stand-in loss on the last stage

    def backward(i, received, out, grad):
        out.backward() if grad is None else out.backward(grad)
        return None if received is None else received.grad

    return StageFunctions(forward, backward, lambda i: stage.message_shape(latents, t, text))


def sleep_functions(stage_index: int, stages: int, shape: tuple[int, ...], seconds: float) -> StageFunctions:
    def forward(i, received):
        time.sleep(seconds)
        return torch.zeros(()) if stage_index == stages - 1 else torch.zeros(shape)

    def backward(i, received, out, grad):
        time.sleep(2 * seconds)  # backward ~ 2x forward
        return None if received is None else torch.zeros(shape)

    return StageFunctions(forward, backward, lambda i: shape)


def traced(fns: StageFunctions, trace: dict) -> StageFunctions:
    """The same functions, recording (start, end) of every compute on the shared monotonic clock
    (perf_counter is CLOCK_MONOTONIC: comparable across the processes of one host)."""
    def timed(kind, fn):
        def call(i, *args):
            start = time.perf_counter()
            try:
                return fn(i, *args)
            finally:
                trace[(kind, i)] = (start, time.perf_counter())
        return call

    return StageFunctions(timed("F", fns.forward), timed("B", fns.backward), fns.message_shape, fns.after_backward)


def observed_hops(traces: list[dict], order_of) -> list[float]:
    """In-run message latency: for every input a stage was idle waiting for, the time from the
    sender's compute end (it sends right then) to the receiver's compute start."""
    hops = []
    for s, trace in enumerate(traces):
        previous_end = None
        for kind, i in order_of(s):
            start, end = trace[(kind, i)]
            sender = s - 1 if kind == "F" else s + 1
            if 0 <= sender < len(traces):
                sent = traces[sender][(kind, i)][1]
                if previous_end is None or previous_end < sent:  # idle when the message left
                    hops.append(start - sent)
            previous_end = end
    return hops


def hop_latency(rank: int, shape: tuple[int, ...], repeats: int = 20) -> float:
    """Median one-way time of one message between ranks 0 and 1 (half a ping-pong)."""
    x = torch.zeros(shape)
    rounds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(x, 1)
            dist.recv(x, 1)
        elif rank == 1:
            dist.recv(x, 0)
            dist.send(x, 0)
        rounds.append(time.perf_counter() - start)
    return statistics.median(rounds) / 2


def simulate_bubble(forward: list[float], backward: list[float], m: int, hop: float,
                    durations: dict | None = None) -> float:
    """Bubble of run_schedule's 1F1B under an event model: stage s computes forward[s] / backward[s]
    per micro-batch (or, with `durations`, {(s, kind, i): seconds} as measured), receives block,
    sends are asynchronous, every message takes `hop` seconds."""
    p = len(forward)
    cost = durations or {(s, k, i): (forward[s] if k == "F" else backward[s])
                         for s in range(p) for k in "FB" for i in range(m)}
    orders = [one_f_one_b(s, p, m) for s in range(p)]
    pos, clock, arrival = [0] * p, [0.0] * p, {}
    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            while pos[s] < len(orders[s]):
                kind, i = orders[s][pos[s]]
                needs = (s, kind, i) if (kind == "F" and s > 0) or (kind == "B" and s < p - 1) else None
                if needs is not None and needs not in arrival:
                    break
                clock[s] = max(clock[s], arrival.get(needs, 0.0)) + cost[(s, kind, i)]
                if kind == "F" and s < p - 1:
                    arrival[(s + 1, "F", i)] = clock[s] + hop
                if kind == "B" and s > 0:
                    arrival[(s - 1, "B", i)] = clock[s] + hop
                pos[s] += 1
                progressed = True
    return 1 - sum(cost.values()) / p / max(clock)


def stage_worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "tiny.yaml", MODEL)
    stage = build_stage(build_dit(cfg), rank, world)
    text_len = 16
    inputs = (torch.randn(LATENTS), torch.rand(LATENTS[0]), torch.randn(LATENTS[0], text_len, cfg.text.dim),
              torch.ones(LATENTS[0], text_len, dtype=torch.bool))
    link = StageLink.from_ranks(None, list(range(world)), rank)
    hop = hop_latency(rank, stage.message_shape(*inputs[:3]))
    results = []
    for compute, prefetch in itertools.product(args.compute, args.prefetch):
        fns = model_functions(stage, inputs, text_len) if compute == "model" else \
            sleep_functions(rank, world, stage.message_shape(*inputs[:3]), args.sleep_ms / 1000)
        for m in args.micro:
            order = one_f_one_b(rank, world, m)
            steps, traces = [], []
            for step in range(args.warmup + args.steps):
                dist.barrier()
                trace: dict = {}
                times = run_schedule(order, link, traced(fns, trace), torch.float32, torch.device("cpu"),
                                     prefetch == "on")
                stage.zero_grad(set_to_none=True)
                if step >= args.warmup:
                    steps.append(times)
                    traces.append(trace)
            results.append({"compute": compute, "prefetch": prefetch, "m": m, "hop": hop, "traces": traces,
                            **{key: [getattr(t, key) for t in steps]
                               for key in ("busy", "wall", "forward", "backward", "recv_wait", "send_wait")}})
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, Path(out_dir) / "results.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(stages: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(stage_worker, args=(stages, free_port(), args, out_dir), nprocs=stages, join=True)
        per_stage = torch.load(Path(out_dir) / "results.pt", weights_only=False)
    rows = []
    for k, first in enumerate(per_stage[0]):
        steps = len(first["wall"])
        # per step: wall = the slowest stage's step time; bubble = 1 - mean stage busy / wall
        bubbles, walls = [], []
        for j in range(steps):
            wall = max(stage[k]["wall"][j] for stage in per_stage)
            busy = sum(stage[k]["busy"][j] for stage in per_stage) / stages
            bubbles.append(1 - busy / wall)
            walls.append(wall)
        m = first["m"]
        med = lambda key, stage, k=k: statistics.median(stage[k][key])  # noqa: E731
        forward = [med("forward", stage) / m for stage in per_stage]
        backward = [med("backward", stage) / m for stage in per_stage]
        hop = statistics.median(stage[k]["hop"] for stage in per_stage[:2])
        in_run = [h for j in range(steps) for h in observed_hops([stage[k]["traces"][j] for stage in per_stage],
                                                                 lambda s, m=m: one_f_one_b(s, stages, m))]
        in_run_mean = statistics.fmean(in_run) if in_run else 0.0
        replay, replay_hop = [], []  # each measured step's own compute durations, without / with the hop
        for j in range(steps):
            durations = {(s, kind, i): end - start for s, stage in enumerate(per_stage)
                         for (kind, i), (start, end) in stage[k]["traces"][j].items()}
            replay.append(simulate_bubble(forward, backward, m, 0.0, durations))
            replay_hop.append(simulate_bubble(forward, backward, m, in_run_mean, durations))
        rows.append({"compute": first["compute"], "prefetch": first["prefetch"], "p": stages, "m": m,
                     "step_ms": 1000 * statistics.median(walls), "bubble": statistics.median(bubbles),
                     "theory": (stages - 1) / (m + stages - 1), "hop_ms": 1000 * hop,
                     "sim": simulate_bubble(forward, backward, m, hop),
                     "run_hop_ms": 1000 * in_run_mean, "run_hop_p90_ms": 1000 * _quantile(in_run, 0.9),
                     "sim_run": simulate_bubble(forward, backward, m, in_run_mean),
                     "sim_jitter": statistics.median(replay), "sim_both": statistics.median(replay_hop),
                     "recv_ms": [1000 * med("recv_wait", stage) for stage in per_stage],
                     "send_ms": [1000 * med("send_wait", stage) for stage in per_stage]})
    return rows


def _quantile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))] if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--compute", nargs="+", choices=["model", "sleep"], default=["model", "sleep"])
    parser.add_argument("--sleep-ms", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--prefetch", nargs="+", choices=["on", "off"], default=["on"],
                        help="post the next receive before computing (run_schedule's default: on)")
    parser.add_argument("--json", type=str, default="")
    args = parser.parse_args()
    rows = [row for p in args.stages for row in measure(p, args)]
    print(f"# {platform.node()} | {os.cpu_count()} CPUs | torch {torch.__version__} | gloo | "
          f"{time.strftime('%Y-%m-%d')} | load average {os.getloadavg()[0]:.1f}")
    print("| compute | prefetch | p | m | step (ms) | bubble measured | (p-1)/(m+p-1) | ping-pong hop (ms) | sim | "
          "in-run hop mean / p90 (ms) | sim with in-run hop | sim: measured durations, no hop | sim: both | "
          "recv wait per stage (ms) | send wait per stage (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        recv = " / ".join(f"{x:.0f}" for x in r["recv_ms"])
        send = " / ".join(f"{x:.1f}" for x in r["send_ms"])
        print(f"| {r['compute']} | {r['prefetch']} | {r['p']} | {r['m']} | {r['step_ms']:.1f} | {r['bubble']:.3f} | "
              f"{r['theory']:.3f} | {r['hop_ms']:.2f} | {r['sim']:.3f} | {r['run_hop_ms']:.2f} / "
              f"{r['run_hop_p90_ms']:.2f} | {r['sim_run']:.3f} | {r['sim_jitter']:.3f} | {r['sim_both']:.3f} | {recv} | {send} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
