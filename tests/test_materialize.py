"""Sharded initialisation (megasora/parallel/materialize.py): a rank built on the meta device and
materialised holds exactly its slice of the seeded single-process init, `manual_seed; build_dit`.

In one process: the whole model and each pipeline stage. On 2 gloo ranks: tp2 and pp2 through
the trainer's own builder, compared with the old start-up (whole model built, then parallelize
slices it and the pipeline keeps one stage) tensor by tensor, tp marks and gradient hooks too.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from megasora.config import load_config
from megasora.models import build_dit
from megasora.parallel.materialize import materialize
from megasora.parallel.pipeline import build_stage

from parallel_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
ARCHS = {"default": [], "pooled_no_qknorm": ["model.pooled_text=true", "model.qk_norm=false"]}
SEED = 3


def _cfg(overrides: list[str]):
    return load_config(REPO / "configs" / "tiny.yaml", [f"train.seed={SEED}", *overrides])


def _assert_same(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = dict(expected.named_parameters()), dict(actual.named_parameters())
    assert want.keys() == got.keys()
    for name, ref in want.items():
        assert not got[name].is_meta and got[name].shape == ref.shape, name
        assert torch.equal(got[name], ref), f"{name} differs from the seeded single-process init"
        assert got[name].__dict__ == ref.__dict__, f"{name}: tp marks differ"
        assert len(got[name]._backward_hooks or {}) == len(ref._backward_hooks or {}), f"{name}: gradient hooks"


def _materialized(cfg, stage: int | None) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = build_dit(cfg)
    local = model if stage is None else build_stage(model, stage, 2)
    materialize(local, partial(build_dit, cfg), tp_rank=0)
    return local


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("stage", [None, 0, 1], ids=["whole", "pp2_stage0", "pp2_stage1"])
def test_meta_build_equals_seeded_init(arch, stage):
    cfg = _cfg(ARCHS[arch])
    torch.manual_seed(cfg.train.seed)
    full = build_dit(cfg)
    rng_after = torch.get_rng_state()
    expected = full if stage is None else build_stage(full, stage, 2)
    _assert_same(expected, _materialized(cfg, stage))
    # Whatever draws from the global RNG after the model sees the same state as before.
    assert torch.equal(torch.get_rng_state(), rng_after)


def _old_startup(cfg, world: int) -> torch.nn.Module:
    """Start-up before materialize: every rank builds the whole model, parallelize slices it."""
    from megasora.train.pipeline_loop import pipeline_stage
    from megasora.train.trainer import setup_parallel
    torch.manual_seed(cfg.train.seed)
    model = build_dit(cfg)
    mesh = setup_parallel(cfg, model, world).mpu.mesh
    return pipeline_stage(cfg, model, mesh) if cfg.parallel.pp > 1 else model


def _both_startups(rank: int, world: int, overrides: list[str]):
    from megasora.launcher.env import DistEnv
    from megasora.plan.memory import startup_host_bytes, total_params
    from megasora.plan.workload import layout_from_config, workload_from_config
    from megasora.train.trainer import build_parallel_dit
    cfg = _cfg(overrides)
    old = _old_startup(cfg, world)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                  master_addr="127.0.0.1", master_port=29500, launcher="torchrun")  # only world_size is read
    torch.manual_seed(cfg.train.seed)
    new, _ = build_parallel_dit(cfg, env)
    _assert_same(old, new)
    work = workload_from_config(cfg)[0]
    held = sum(p.numel() for p in new.parameters()) * 4
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in build_dit(cfg).modules()) * 4
    return held, largest_module, startup_host_bytes(work, layout_from_config(cfg, world)), total_params(work) * 4


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2", "train.grad_accum=2"]], ids=["tp2", "pp2"])
def test_sharded_startup_equals_sliced_full_init(layout):
    results = run_distributed(_both_startups, 2, ARCHS["pooled_no_qknorm"] + layout)
    held = [r[0] for r in results]
    _, largest_module, predicted, whole = results[0]
    assert max(held) < whole  # a part of the model, not all of it
    # The planner's start-up term: the largest part a rank holds plus one full-size module.
    assert predicted == max(held) + largest_module
