"""`megasora train`: the DiT's training run. The start-up is megasora/train/startup.py, the
step loop megasora/train/loop.py (TrainingLoop), or pipeline_loop.py for parallel.pp > 1.

Order, every step of which is needed before the next:
config validated -> (startup.training_run: process groups -> model, same seed everywhere ->
parallelize -> DeepSpeed engine -> resume) -> data stream at the resumed global position.
"""
from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn

from megasora.config import Config
from megasora.data.sources import check_source
from megasora.launcher.env import DistEnv, discover
from megasora.models import DiT, build_dit
from megasora.models.prompt_extension import check_model_dir
from megasora.parallel import MeshMPU, init_parallel
from megasora.parallel.activation_checkpointing import apply_activation_checkpointing
from megasora.parallel.block_attention import Accelerator
from megasora.parallel.materialize import materialize
from megasora.parallel.mesh import validate_config_layout
from megasora.train.distributed import device_for
from megasora.train.engine import check_optimizer, zero3_partitioner
from megasora.train.loop import TrainingLoop, TrainResult
from megasora.train.objective import FlowMatchingObjective
from megasora.train.pipeline_loop import PipelineTrainingLoop, pipeline_stage
from megasora.train.pretrained import load_pretrained
from megasora.train.startup import DataParallel, check_attention_kernel, training_run
from megasora.train.throughput import DiTWork

log = logging.getLogger("megasora")


def setup_parallel(cfg: Config, model: DiT, world_size: int) -> DataParallel:
    """Mesh + tp/ulysses/ring applied to `model` (megasora/parallel), then activation checkpointing
    (it wraps the parallel attention); dp is what remains of the world."""
    mesh = init_parallel(model, cfg.parallel, world_size, cfg.train, cfg.model.attention_kernel)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
    return DataParallel(rank=mesh.rank_in("dp"), size=mesh.size("dp"), group=mesh.group("dp"), mpu=MeshMPU(mesh))


def build_parallel_dit(cfg: Config, env: DistEnv) -> tuple[nn.Module, DataParallel]:
    """This rank's part of the DiT (its tp shard; with parallel.pp > 1 only its stage, docs/pipeline.md):
    built, parallelized and cut on the meta device, then given the values of the seeded
    single-process init (megasora/parallel/materialize.py), so no rank holds the whole model."""
    with torch.device("meta"):
        model = build_dit(cfg)
    parallel = setup_parallel(cfg, model, env.world_size)
    local = pipeline_stage(cfg, model, parallel.mpu.mesh) if cfg.parallel.pp > 1 else model
    partition = zero3_partitioner(cfg, parallel.mpu) if cfg.train.zero_stage == 3 else None
    if cfg.model.pretrained:  # the checkpoint's weights instead of the seeded init
        load_pretrained(local, cfg, parallel.mpu.mesh.rank_in("tp"), partition)
    else:
        materialize(local, partial(build_dit, cfg), parallel.mpu.mesh.rank_in("tp"), partition)
    return local, parallel


def train(cfg: Config, resume: str | None = None) -> TrainResult:
    layout = validate_config_layout(cfg, discover().world_size)  # fails here, before any process group exists
    check_source(cfg)  # so does a data path that holds nothing
    check_optimizer(cfg)  # and an optimizer this machine cannot run
    check_attention_kernel(cfg, Accelerator.of(device_for(discover())))  # and an attention kernel its GPU cannot
    if cfg.train.sample_extend_prompt:  # and a preview prompt extender that is not a model directory
        check_model_dir(cfg.train.sample_extend_prompt, "train.sample_extend_prompt")
    with training_run(cfg, layout, resume, build_parallel_dit) as run:
        objective = FlowMatchingObjective(cfg, run.engine.module.sequence)  # each rank noises its span only
        loop_type = PipelineTrainingLoop if cfg.parallel.pp > 1 else TrainingLoop
        return loop_type(run, objective, DiTWork(cfg, objective)).run(run.step, run.samples)
