"""Spawned worker for the crash-during-save test (a module-level function, so it pickles)."""
from __future__ import annotations

import os


def train_and_die_during_save(rank: int, world: int, port: int, overrides: list[str], die_at_tag: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
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
    from megasora.config import load_config
    from megasora.train.trainer import train
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    train(load_config(os.path.join(repo, "configs", "tiny.yaml"), overrides))
