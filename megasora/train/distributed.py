"""Process-group start-up, from whichever launcher started us (torchrun, srun, mpirun, deepspeed)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megasora.launcher.env import DistEnv, discover, export_torch_env


def init_distributed() -> DistEnv:
    """Discover rank/world from the launcher's environment and start the default process group."""
    env = discover()
    export_torch_env(env)
    if not dist.is_initialized():
        import deepspeed  # lazy: DeepSpeed takes ~1 s to import, and every `megasora` command imports this module
        from deepspeed.accelerator import get_accelerator
        backend = get_accelerator().communication_backend_name()  # nccl on CUDA, gloo on CPU
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   rank=env.rank, world_size=env.world_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    return env


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")
