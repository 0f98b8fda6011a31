"""Layout validation (config.check_layout, no process groups needed) and the groups build_mesh creates."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megasora.config import ModelConfig, ParallelConfig, check_layout, load_config
from megasora.models import build_dit
from megasora.parallel import LayoutError, MeshMPU, ParallelLayout, build_mesh, init_parallel
from megasora.parallel.mesh import validate_config_layout

from parallel_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]


def tiny_model(*overrides: str):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.hidden=48", "model.heads=6", "model.mlp_ratio=2.0",
                                                     *overrides])
    return cfg, build_dit(cfg)


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallel.tp=3"], 4, "world size 4 is not divisible by parallel.tp=3 * parallel.ulysses=1"),
    (["parallel.tp=4"], 4, "model.heads=6 is not divisible by parallel.tp*parallel.ulysses = 4*1"),
    (["parallel.tp=2", "parallel.ulysses=2"], 4, "model.heads=6 is not divisible by parallel.tp*parallel.ulysses"),
    (["parallel.ulysses=4"], 4, "model.heads=6 is not divisible by parallel.tp*parallel.ulysses = 1*4"),
    (["model.mlp_ratio=2.0625", "parallel.tp=2"], 2, "MLP width 99"),
])
def test_invalid_layout_rejected_before_any_process_group(overrides, world, needle):
    cfg, model = tiny_model(*overrides)
    with pytest.raises(LayoutError) as err:
        init_parallel(model, cfg.parallel, world, cfg.train)
    assert needle in str(err.value)
    assert not dist.is_initialized()  # failed fast: no group was ever created


def _check(world: int | None = 8, zero_stage: int = 2, grad_accum: int = 8, offload: str = "none",
           model: ModelConfig | None = None, **degrees: int) -> None:
    check_layout(ParallelConfig(**degrees), model or ModelConfig(hidden=32, heads=4, depth=2, mlp_ratio=4.0),
                 zero_stage=zero_stage, grad_accum=grad_accum, offload_optimizer=offload, world_size=world)


def test_error_messages_name_the_key_and_the_fix():
    with pytest.raises(LayoutError, match=r"parallel\.tp=3.*launch a multiple of 6"):
        _check(tp=3, ulysses=2)
    with pytest.raises(LayoutError, match=r"model\.hidden=30 is not divisible by parallel\.tp=4"):
        _check(world=4, tp=4, model=ModelConfig(hidden=30, heads=4, mlp_ratio=4.0))
    with pytest.raises(LayoutError, match=r"parallel\.ring=0 must be >= 1 \(1 = not split over ring\)"):
        _check(world=4, ring=0)
    with pytest.raises(LayoutError, match=r"train\.offload_optimizer=cpu is ZeRO-Offload .* train\.zero_stage=2"):
        _check(zero_stage=0, offload="cpu")


def test_pipeline_deeper_than_model_and_zero3_with_pp_rejected():
    with pytest.raises(LayoutError, match=r"parallel\.pp=3 exceeds model\.depth=2"):
        _check(world=3, pp=3)
    # The one ZeRO-3 layout the engine cannot shard: pipeline stages (one line, the limit and the fix).
    with pytest.raises(LayoutError, match=r"train\.zero_stage=3 with parallel\.pp=2: pipeline stages support ZeRO "
                                          r"stage 1 or 2 .*; set train\.zero_stage=1 or 2"):
        _check(zero_stage=3, pp=2)
    _check(zero_stage=2, ring=2)
    _check(zero_stage=3, tp=2)
    _check(zero_stage=3, ring=2, ulysses=2, tp=2)  # partitioned over dp x sp (tests/test_zero3_sp.py)


def test_config_loading_checks_what_needs_no_world_and_launch_checks_the_rest():
    """Loading runs check_layout without a world size; the trainer's and submit's check adds it."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["parallel.ring=2", "parallel.ulysses=2"])  # loads
    with pytest.raises(LayoutError, match=r"world size 2 is not divisible by .* = 4"):
        validate_config_layout(cfg, 2)
    assert validate_config_layout(load_config(REPO / "configs" / "tiny.yaml", ["parallel.ring=2"]), 4) == \
        ParallelLayout(dp=2, ring=2)
    with pytest.raises(LayoutError, match=r"train\.grad_accum=1 is the number of pipeline micro-batches"):
        load_config(REPO / "configs" / "tiny.yaml", ["parallel.pp=2"])


def test_rank_order_tp_innermost_then_ulysses_ring_dp_pp():
    layout = ParallelLayout(dp=2, pp=2, tp=2, ulysses=2, ring=2)
    assert layout.world_size == 32
    assert layout.coords(0) == dict(tp=0, ulysses=0, ring=0, dp=0, pp=0)
    assert layout.coords(1)["tp"] == 1 and layout.coords(2)["ulysses"] == 1
    assert layout.coords(4)["ring"] == 1 and layout.coords(8)["dp"] == 1 and layout.coords(16)["pp"] == 1
    for rank in range(32):
        assert layout.rank_of(layout.coords(rank)) == rank
    assert layout.groups_over(("tp",))[:2] == [[0, 1], [2, 3]]
    # sp groups list ranks ulysses-inner: their order is the sequence chunk order.
    assert layout.groups_over(("ulysses", "ring"))[0] == [0, 2, 4, 6]
    assert layout.groups_over(("tp", "ulysses", "ring"))[1] == [8, 9, 10, 11, 12, 13, 14, 15]
    assert layout.groups_over(("ulysses", "ring", "dp"))[0] == [0, 2, 4, 6, 8, 10, 12, 14]
    every = sorted(r for g in layout.groups_over(("dp",)) for r in g)
    assert every == list(range(32))


def _mesh_worker(rank: int, world: int):
    out = {}
    for name, layout in {"tp2xring2": ParallelLayout(tp=2, ring=2), "dp2xulysses2": ParallelLayout(dp=2, ulysses=2)}.items():
        mesh = build_mesh(layout)
        mpu = MeshMPU(mesh)
        sums = {}
        for group in ("tp", "ulysses", "ring", "sp", "tpsp", "dp", "dpsp", "mp"):
            t = torch.tensor([float(1 << rank)])
            dist.all_reduce(t, group=mesh.group(group))  # bitmask of the members, from a real collective
            sums[group] = int(t.item())
        out[name] = dict(sums=sums, tp=(mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()),
                         dp=(mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()),
                         sp=(mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_world_size()),
                         dpsp=mpu.get_sequence_data_parallel_world_size(), mp=mpu.get_model_parallel_rank())
    return out


def test_build_mesh_groups_and_mpu():
    res = run_distributed(_mesh_worker, 4)
    bits = lambda *ranks: sum(1 << r for r in ranks)  # noqa: E731
    # tp2 x ring2: rank = ring*2 + tp
    r3 = res[3]["tp2xring2"]
    assert r3["sums"]["tp"] == bits(2, 3) and r3["sums"]["ring"] == bits(1, 3) and r3["sums"]["sp"] == bits(1, 3)
    assert r3["sums"]["tpsp"] == bits(0, 1, 2, 3) and r3["sums"]["dp"] == bits(3) and r3["sums"]["dpsp"] == bits(1, 3)
    assert r3["tp"] == (1, 2) and r3["sp"] == (1, 2) and r3["dp"] == (0, 1) and r3["dpsp"] == 2 and r3["mp"] == 1
    # dp2 x ulysses2: rank = dp*2 + ulysses
    r2 = res[2]["dp2xulysses2"]
    assert r2["sums"]["ulysses"] == bits(2, 3) and r2["sums"]["dp"] == bits(0, 2)
    assert r2["sums"]["dpsp"] == bits(0, 1, 2, 3) and r2["sums"]["tp"] == bits(2)
    assert r2["dp"] == (1, 2) and r2["sp"] == (0, 2) and r2["dpsp"] == 4 and r2["mp"] == 0
