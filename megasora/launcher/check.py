"""`python -m megasora.launcher.check`: prove the ranks can rendezvous and talk.

Run it with the same launcher line as training (`srun ...`, `mpirun ...`, `torchrun ...`)
before a long job: every rank discovers its place, joins the process group with a short
timeout, and all-reduces its rank. A wrong MASTER_ADDR, a blocked port or a missing rank
shows up as an error within --timeout seconds instead of a silent hang at step 0.
"""
from __future__ import annotations

import argparse
import datetime
import socket
import sys

import torch
import torch.distributed as dist

from megasora.launcher.env import LaunchError, discover, export_torch_env


def check(backend: str, timeout_s: float) -> int:
    env = discover()
    export_torch_env(env)
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        total = torch.tensor([env.rank], dtype=torch.int64)
        dist.all_reduce(total)
        expected = env.world_size * (env.world_size - 1) // 2
        ok = int(total.item()) == expected
        print(f"rank {env.rank}/{env.world_size} local {env.local_rank}/{env.local_world_size} "
              f"on {socket.gethostname()} via {env.launcher} master "
              f"{env.master_addr}:{env.master_port}: all_reduce "
              f"{'ok' if ok else f'WRONG {int(total.item())} != {expected}'}", flush=True)
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPU)")
    parser.add_argument("--timeout", type=float, default=60.0, help="rendezvous timeout, s")
    args = parser.parse_args(argv)
    try:
        return check(args.backend, args.timeout)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
