"""Starting a training run; the step loops live in loop.py (TrainingLoop) and pipeline_loop.py (pp > 1).

Order of start-up, every step of which is needed before the next:
config validated -> launcher env -> process groups -> model (same seed everywhere) ->
parallelize -> DeepSpeed engine -> resume -> data stream at the resumed global position.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megasora.config import Config, save_config
from megasora.data.sources import check_source
from megasora.launcher.env import discover
from megasora.models import build_dit
from megasora.parallel.mesh import validate_config_layout
from megasora.train import checkpoint
from megasora.train.distributed import device_for, init_distributed
from megasora.train.ema import EMA
from megasora.train.engine import build_engine, check_optimizer
from megasora.train.loop import DataParallel, TrainingLoop, TrainResult
from megasora.train.pipeline_loop import PipelineTrainingLoop, pipeline_stage
from megasora.train.universal import shard_full_state

log = logging.getLogger("megasora")


def setup_parallel(cfg: Config, model: torch.nn.Module, world_size: int, rank: int) -> DataParallel:
    """Mesh + tp/ulysses/ring applied to `model` (megasora/parallel), then activation checkpointing
    (it wraps the parallel attention); dp is what remains of the world."""
    from megasora.parallel import MeshMPU, init_parallel
    from megasora.parallel.activation_checkpointing import apply_activation_checkpointing
    mesh = init_parallel(model, cfg.parallel, world_size, cfg.train.zero_stage)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
    return DataParallel(rank=mesh.rank_in("dp"), size=mesh.size("dp"), group=mesh.group("dp"), mpu=MeshMPU(mesh),
                        tp_group=mesh.group("tp"))


def layout_record(cfg: Config, layout: Any, world_size: int) -> dict[str, int]:
    """What a checkpoint remembers of how it was sharded; a mismatch on resume triggers resharding."""
    return {"world_size": world_size, "dp": layout.dp, "tp": layout.tp, "ulysses": layout.ulysses,
            "ring": layout.ring, "pp": layout.pp, "zero_stage": cfg.train.zero_stage}


def prepare_resume(resume: str | None, ckpt_dir: Path, layout: dict[str, int], is_main: bool
                   ) -> tuple[checkpoint.CheckpointInfo | None, bool]:
    """Find the checkpoint to resume and whether it must be resharded (converted to universal)."""
    info = checkpoint.resolve_resume(resume, ckpt_dir)
    if info is None or info.layout == layout:
        return info, False
    from megasora.train.universal import convert_to_universal
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
            tp_group: Any = None) -> tuple[int, int]:
    """Load engine (+ EMA) state from a checkpoint; returns (step, global samples seen)."""
    if resume_from is None:
        return 0, 0
    tag = f"{resume_from.tag}.universal" if reshard else resume_from.tag
    client = checkpoint.load_engine_state(engine, resume_from.root, tag)
    if ema is not None and client.get("ema") is not None:
        ema.load_state_dict(shard_full_state(client["ema"], engine.module, tp_group))
    log.info("resumed from %s at step %d (%d samples seen)", resume_from.path, client["step"], client["samples"])
    return client["step"], client["samples"]


def train(cfg: Config, resume: str | None = None) -> TrainResult:
    env = discover()
    layout = validate_config_layout(cfg, env.world_size)  # fails here, before any process group exists
    check_source(cfg)  # so does a data path that holds nothing
    check_optimizer(cfg)  # and an optimizer this machine cannot run
    env = init_distributed()
    device = device_for(env)
    record = layout_record(cfg, layout, env.world_size)
    ckpt_dir, resume_from, reshard = open_run(cfg, env.rank, record, resume)

    torch.manual_seed(cfg.train.seed)  # identical init on every rank; parallelize slices it
    model = build_dit(cfg)
    parallel = setup_parallel(cfg, model, env.world_size, env.rank)
    if cfg.parallel.pp > 1:  # this rank keeps only its pipeline stage (docs/pipeline.md)
        model = pipeline_stage(cfg, model, parallel.mpu.mesh)
    engine = build_engine(cfg, model.to(device), parallel.size, parallel.mpu, load_universal=reshard)
    ema = EMA(engine.module, cfg.train.ema_decay, cfg.train.zero_stage) if cfg.train.ema_decay > 0 else None
    manager = checkpoint.CheckpointManager(ckpt_dir, record, cfg.train.keep_last, cfg.train.keep_every)

    step, samples = restore(engine, ema, resume_from, reshard, parallel.tp_group)

    loop_type = PipelineTrainingLoop if cfg.parallel.pp > 1 else TrainingLoop
    loop = loop_type(cfg, engine, ema, parallel, device, env.rank == 0, manager)
    return loop.run(step, samples)
