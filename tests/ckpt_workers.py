"""Spawned workers of tests/test_checkpoint.py (module-level functions, so they pickle)."""
from __future__ import annotations

import json
import os

# torch.distributed's collectives that ship Python objects (pickled, tensors included)
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list")


def _launcher_env(rank: int, world: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})


def _train(overrides: list[str]) -> None:
    from megasora.config import load_config
    from megasora.train.trainer import train
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    train(load_config(os.path.join(repo, "configs", "tiny.yaml"), overrides))


def train_and_die_during_save(rank: int, world: int, port: int, overrides: list[str], die_at_tag: str) -> None:
    _launcher_env(rank, world, port)
    import torch
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        # Rank 1 dies like a SIGKILLed process while writing its first shard of the doomed save.
        if rank == 1 and die_at_tag in str(f):
            with open(f, "wb") as partial:
                partial.write(b"\x00" * 100)
            os._exit(17)
        return real_save(obj, f, *args, **kwargs)

    torch.save = dying_save
    _train(overrides)


def train_recording_save_communication(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    """Train; every checkpoint save (TrainingLoop.save, client state included) records the object
    collectives it calls and the collectives the comm seam counts, into out/rank{rank}.json."""
    _launcher_env(rank, world, port)
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from megasora.parallel.comm_counter import COUNTER
    from megasora.train.loop import TrainingLoop
    real_save = TrainingLoop.save
    record: dict[str, list] = {"object_collectives": [], "collectives": []}

    def recording(name: str, original):
        def call(*args, **kwargs):
            record["object_collectives"].append(name)
            return original(*args, **kwargs)
        return call

    def save(self, step: int, samples: int) -> None:
        originals = {name: getattr(dist, name) for name in OBJECT_COLLECTIVES}
        for name, original in originals.items():
            setattr(dist, name, recording(name, original))
            setattr(c10d, name, getattr(dist, name))
        COUNTER.take()
        try:
            with COUNTER.counting():
                real_save(self, step, samples)
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)
                setattr(c10d, name, original)
        record["collectives"] += [[axis, kind, tally.calls, tally.bytes] for (axis, kind), tally in COUNTER.take().items()]

    TrainingLoop.save = save
    _train(overrides)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


def restored_ema(rank: int, world: int, overrides: list[str], resume: str) -> list[tuple]:
    """Start a run resuming `resume` (run_launched sets the launcher's environment) and return this
    rank's EMA as restored: (name, the Piece of the whole parameter, its EMA) per rectangle it keeps,
    and the bytes of its EMA buffer."""
    from megasora.config import load_config
    from megasora.parallel.mesh import validate_config_layout
    from megasora.train.startup import training_run
    from megasora.train.trainer import build_parallel_dit
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(repo, "configs", "tiny.yaml"), overrides)
    with training_run(cfg, validate_config_layout(cfg, world), resume, build_parallel_dit) as run:
        return [(name, piece, tensor.clone()) for name, piece, tensor, _ in run.ema.slices()], run.ema.nbytes()


def assert_ema_parts_are(whole: dict, ranks: list[list[tuple]], atol: float = 0.0) -> None:
    """Every rank's EMA rectangles (restored_ema's lists) equal `whole`'s (bit for bit at atol 0),
    and together they cover every element of every parameter."""
    import torch
    covered = {name: torch.zeros(t.shape, dtype=torch.bool) for name, t in whole.items()}
    for rank, slices in enumerate(ranks):
        for name, piece, tensor in slices:
            expected = whole[name][piece.region]
            same = torch.equal(tensor, expected) if atol == 0 else torch.allclose(tensor, expected, rtol=0, atol=atol)
            assert same, f"rank {rank}: EMA of {name}{list(piece.start)}: max diff {(tensor - expected).abs().max()}"
            covered[name][piece.region] = True
    assert all(c.all() for c in covered.values()), [n for n, c in covered.items() if not c.all()]
