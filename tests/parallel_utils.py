"""Start helpers for multi-process gloo tests on CPU.

`run_distributed(fn, world_size, *args)` starts `world_size` processes, initialises a gloo process
group in each, calls fn(rank, world, *args) and returns the list of per-rank return values
(anything torch.save can store). `fn` must be a module-level function so the children can import it.

The processes are forked from one server process per test session that has already imported
torch, DeepSpeed and what a first training step pulls in (torch._dynamo, inductor, matplotlib):
on 2 cores those imports cost more than most tests that start processes. The server imports no
megasora module, so each child imports the code under test itself; it starts from the environment
of the test that started it, and its output is printed into that test's output, as a spawned
child's would be.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "deepspeed", "torch._dynamo",
                                        "torch._inductor.compile_fx", "matplotlib.pyplot"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(worker: Callable, world: int, fn: Callable, args: tuple) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(worker, args=(world, free_port(), out_dir, dict(os.environ), fn, args), nprocs=world,
                               start_method="forkserver")
        finally:
            for rank in range(world):
                log = Path(out_dir) / f"rank{rank}.log"
                if log.exists():
                    sys.stdout.write(log.read_text(errors="replace"))
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _enter(rank: int, out_dir: str, env: dict[str, str], launcher: dict[str, str]) -> None:
    """The child takes the starting test's environment and writes its output where _start prints it."""
    os.environ.clear()
    os.environ.update({**env, "OMP_NUM_THREADS": "1", **launcher})
    torch.set_num_threads(1)
    log = os.open(Path(out_dir) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(log, stream.fileno())
    os.close(log)


def _worker(rank: int, world: int, port: int, out_dir: str, env: dict[str, str], fn: Callable, args: tuple) -> None:
    _enter(rank, out_dir, env, {})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    return _start(_worker, world_size, fn, args)


def _launched_worker(rank: int, world: int, port: int, out_dir: str, env: dict[str, str], fn: Callable,
                     args: tuple) -> None:
    _enter(rank, out_dir, env, {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                                "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                "MASTER_PORT": str(port)})
    try:
        torch.save(fn(rank, world, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_launched(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Like run_distributed, but only sets torchrun's environment: the code under test
    (e.g. megasora.train.trainer.train) starts the process group itself."""
    return _start(_launched_worker, world_size, fn, args)


def _train_runs(rank: int, world: int, runs: list[tuple[str, list[str], str | None]]) -> None:
    from megasora.config import load_config
    from megasora.train.trainer import train
    for run_dir, overrides, resume in runs:
        train(load_config(REPO / "configs" / "tiny.yaml", [*overrides, f"run.dir={run_dir}"]), resume=resume)
        dist.barrier()  # every rank's shards are written before a later run resumes from them


def train_runs(world_size: int, runs: list[tuple[str, list[str], str | None]]) -> None:
    """Train each (run.dir, configs/tiny.yaml overrides, resume) in turn, as `megasora train` would
    under torchrun, in one group of `world_size` processes."""
    run_launched(_train_runs, world_size, runs)
