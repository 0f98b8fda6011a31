"""The start-up every training command shares (`megasora train`, `megasora train-vae`).

`training_run(cfg, layout, resume, build)` does, in this order, each step needed by the next:
communication seam installed -> process groups -> run directory and the checkpoint to resume ->
model (same seed on every rank) and its data-parallel view, by the caller's `build` ->
DeepSpeed engine -> EMA -> resume. The caller has validated the config and picked the model;
it then runs a TrainingLoop (megasora/train/loop.py) on the TrainingRun it is given.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from megasora.config import Config, save_config
from megasora.launcher.env import DistEnv
from megasora.parallel import comm_counter, device_check
from megasora.parallel.block_attention import Accelerator, choose_kernel
from megasora.parallel.mesh import ParallelLayout
from megasora.train import checkpoint
from megasora.train.distributed import device_for, init_distributed
from megasora.train.ema import EMA, ShardPlace
from megasora.train.engine import build_engine
from megasora.train.universal import convert_to_universal, tp_rank_view, unshare_step_counters

log = logging.getLogger("megasora")


@dataclass
class DataParallel:
    rank: int
    size: int
    group: Any  # process group over which the logged loss is averaged (None: the whole world)
    mpu: Any = None

    @property
    def layout(self) -> ParallelLayout:
        """The mesh's layout; a run without a mesh (train-vae) is data parallel only."""
        return self.mpu.mesh.layout if self.mpu is not None else ParallelLayout(dp=self.size)


@dataclass
class TrainingRun:
    """What a training loop runs on: the started engine and where it resumes."""
    cfg: Config
    engine: Any
    ema: EMA | None
    parallel: DataParallel
    device: torch.device
    is_main: bool
    manager: checkpoint.CheckpointManager
    step: int      # optimizer steps already taken (0 unless resumed)
    samples: int   # global samples already seen


# (config, launcher env) -> (this rank's model, not yet on the device; its data-parallel view)
ModelBuilder = Callable[[Config, DistEnv], tuple[nn.Module, DataParallel]]


def check_attention_kernel(cfg: Config, device: Accelerator) -> str:
    """The attention kernel this run takes on `device` (the GPU's name and capability, so a test
    can describe one), or one line naming the GPU and the kernels it runs. Called before any
    process group exists: a kernel the GPU cannot run would otherwise fail at the first forward,
    after start-up (and every rank's model init) had been paid for."""
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return choose_kernel(cfg.model.attention_kernel, device, dtype)


def layout_record(cfg: Config, layout: ParallelLayout, world_size: int) -> dict[str, int]:
    """What a checkpoint remembers of how it was sharded; a mismatch on resume triggers resharding."""
    return {"world_size": world_size, "dp": layout.dp, "tp": layout.tp, "ulysses": layout.ulysses,
            "ring": layout.ring, "pp": layout.pp, "zero_stage": cfg.train.zero_stage}


def prepare_resume(resume: str | None, ckpt_dir: Path, layout: dict[str, int], is_main: bool
                   ) -> tuple[checkpoint.CheckpointInfo | None, bool]:
    """Find the checkpoint to resume and whether it must be resharded (converted to universal)."""
    info = checkpoint.resolve_resume(resume, ckpt_dir)
    if info is None or info.layout == layout:
        return info, False
    log.warning("checkpoint %s was saved with layout %s; resuming with %s: resharding through a "
                "DeepSpeed universal checkpoint", info.tag, info.layout, layout)
    universal = info.root / f"{info.tag}.universal"
    if is_main and not universal.is_dir():
        convert_to_universal(info.path, universal)
    dist.barrier()
    return info, True


def open_run(cfg: Config, rank: int, record: dict[str, int], resume: str | None
             ) -> tuple[Path, checkpoint.CheckpointInfo | None, bool]:
    """Create the run directory with its resolved config; find what to resume and whether to reshard."""
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    return (ckpt_dir, *prepare_resume(resume, ckpt_dir, record, rank == 0))


def restore(engine: Any, ema: EMA | None, resume_from: checkpoint.CheckpointInfo | None, reshard: bool,
            mpu: Any = None) -> tuple[int, int]:
    """Load engine (+ EMA) state from a checkpoint; returns (step, global samples seen)."""
    if resume_from is None:
        return 0, 0
    tag = f"{resume_from.tag}.universal" if reshard else resume_from.tag
    tp = mpu.get_tensor_model_parallel_world_size() if mpu is not None else 1
    if reshard and tp > 1 and engine.zero_optimization_partition_weights():  # ZeRO-3 cannot cut tp slices itself
        tp_rank = mpu.get_tensor_model_parallel_rank()
        if mpu.get_sequence_data_parallel_rank() == 0:  # one writer per tp rank
            tp_rank_view(resume_from.root / tag, engine.module, tp_rank, tp)
        dist.barrier()
        tag = f"{tag}.tp{tp}_{tp_rank:02d}"
    client = checkpoint.load_engine_state(engine, resume_from.root, tag)
    if reshard and engine.optimizer is not None:
        unshare_step_counters(engine.optimizer)  # DeepSpeed 0.19.8 ZeRO-3 gives all groups one step tensor
    if ema is not None:  # from the checkpoint's own files: the universal conversion does not touch the EMA
        checkpoint.load_ema(ema, resume_from.path, client)
    log.info("resumed from %s at step %d (%d samples seen)", resume_from.path, client["step"], client["samples"])
    return client["step"], client["samples"]


@contextmanager
def training_run(cfg: Config, layout: ParallelLayout, resume: str | None, build: ModelBuilder
                 ) -> Iterator[TrainingRun]:
    """Start a run (see the module docstring); inside the block, every collective's tensors are
    checked to be on the training device when MEGASORA_CHECK_COLLECTIVE_DEVICES is set."""
    comm_counter.install()  # before DeepSpeed creates its communication backend, which caches two collectives
    env = init_distributed()
    device = device_for(env)
    with device_check.checking_if_requested(device):
        record = layout_record(cfg, layout, env.world_size)
        ckpt_dir, resume_from, reshard = open_run(cfg, env.rank, record, resume)
        torch.manual_seed(cfg.train.seed)  # the seeded init on every rank (the DiT's builder keeps its shard)
        model, parallel = build(cfg, env)
        engine = build_engine(cfg, model.to(device), parallel.size, parallel.mpu, load_universal=reshard)
        place = ShardPlace.of(parallel.mpu.mesh if parallel.mpu is not None else None)
        ema = EMA(engine.module, cfg.train.ema_decay, cfg.train.zero_stage, place) if cfg.train.ema_decay > 0 else None
        manager = checkpoint.CheckpointManager(ckpt_dir, record, cfg.train.keep_last, cfg.train.keep_every)
        step, samples = restore(engine, ema, resume_from, reshard, parallel.mpu)
        yield TrainingRun(cfg, engine, ema, parallel, device, env.rank == 0, manager, step, samples)
