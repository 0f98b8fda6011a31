"""Per-step accounting: the torch.distributed counting seam, and metrics.jsonl's per-axis
communication bytes held EXACTLY equal to the analytic model (megasora/plan/communication.py)
for dp2, tp2, ulysses2, ring2 and pp2 (fp32, no padding), with activation checkpointing too."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megasora.parallel.mesh import ParallelLayout
from megasora.plan.communication import bus_factor, comm_volume, stage_block_counts, transfer_seconds
from megasora.plan.workload import layout_from_config, workload_from_config

from parallel_utils import run_distributed, run_launched

REPO = Path(__file__).resolve().parents[1]
TOKENS, TEXT = 32, 8  # 2 x 8 x 8 latents, patch (1, 2, 2): 32 tokens, divisible by every degree
BASE = ["model.hidden=32", "model.heads=4", "model.depth=2", "model.mlp_ratio=2.0",
        "data.frames=2", "data.height=8", "data.width=8", "data.num_samples=16", f"text.max_length={TEXT}",
        "train.steps=2", "train.warmup_steps=0", "train.ema_decay=0", "train.micro_batch_size=2",
        "train.grad_accum=2", "diffusion.cond_frames_prob=0", "train.zero_stage=2"]
CASES = {  # name -> overrides (world size 2 for all)
    "dp2": [],
    "tp2": ["parallel.tp=2"],
    "ulysses2": ["parallel.ulysses=2"],
    "ring2": ["parallel.ring=2"],
    "pp2": ["parallel.pp=2"],
    "dp2_zero0": ["train.zero_stage=0"],
    "dp2_zero1": ["train.zero_stage=1"],
    "dp2_zero3": ["train.zero_stage=3"],  # every tiny parameter is below the persistence threshold
    "ring2_full_ac": ["parallel.ring=2", "train.activation_checkpointing=full"],
    "ulysses2_full_ac": ["parallel.ulysses=2", "train.activation_checkpointing=full"],
    "tp2_selective_ac": ["parallel.tp=2", "train.activation_checkpointing=selective"],
    "dp2_off": ["train.accounting=false"],
}


# ------------------------------------------------------------------ the seam, call by call


def _seam_worker(rank: int, world: int) -> dict:
    from megasora.parallel.comm_counter import COUNTER, install
    install()
    COUNTER.set_layout(ParallelLayout(dp=2))
    singles = [dist.new_group(ranks=[r]) for r in range(world)]
    x = torch.ones(6, 4)
    out = {}
    with COUNTER.counting(False):
        dist.all_reduce(x.clone())
    out["off"] = COUNTER.take()
    with COUNTER.counting():
        dist.all_reduce(x.clone())                                   # 96 bytes
        dist.all_gather_single(torch.empty(12, 4), x)                # output: 192
        dist.reduce_scatter_single(torch.empty(3, 4), x)             # input: 96
        dist.all_to_all_single(torch.empty(6, 4), x)                 # input: 96
        dist.broadcast(x.clone(), src=0)                             # 96
        peer = 1 - rank
        recv = torch.empty(6, 4)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, recv, peer)])
        for w in works:
            w.wait()                                                 # p2p: 96 sent
        if rank == 0:
            dist.isend(x[:2], 1).wait()                              # p2p: 32 sent
        else:
            dist.recv(torch.empty(2, 4), 0)                          # received: counted at the sender
        dist.all_reduce(x.clone(), group=singles[rank])              # one rank: moves nothing, not counted
    out["on"] = {key: (t.bytes, t.calls) for key, t in COUNTER.take().items()}
    out["received"] = recv.sum().item()
    return out


def test_counter_records_each_collective_once_with_its_bytes():
    for rank, result in enumerate(run_distributed(_seam_worker, 2)):
        assert result["off"] == {}
        assert result["received"] == 24.0  # batch_isend_irecv still delivers through the wrappers
        p2p = 96 + (32 if rank == 0 else 0)
        assert result["on"] == {("dp", "all_reduce"): (96, 1), ("dp", "all_gather"): (192, 1),
                                ("dp", "reduce_scatter"): (96, 1), ("dp", "all_to_all"): (96, 1),
                                ("dp", "broadcast"): (96, 1), ("dp", "p2p"): (p2p, 2)}


def _late_install_worker(rank: int, world: int) -> dict:
    import deepspeed
    import deepspeed.comm as ds_comm
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # backend caches its gather
    from megasora.parallel.comm_counter import COUNTER, install
    install()
    COUNTER.set_layout(ParallelLayout(dp=2))
    with COUNTER.counting():
        ds_comm.all_gather_into_tensor(torch.empty(8), torch.ones(4))
        ds_comm.reduce_scatter_tensor(torch.empty(2), torch.ones(4))
    return {key: t.bytes for key, t in COUNTER.take().items()}


def test_counter_installed_after_deepspeed_started_still_counts_its_cached_functions():
    """On torch 2.13 this holds even without comm_counter's re-pointing of DeepSpeed's cached
    functions (the deprecated all_gather_into_tensor / reduce_scatter_tensor forward to the
    wrapped *_single ones); the re-pointing covers torch versions where they do not."""
    for result in run_distributed(_late_install_worker, 2):
        assert result == {("dp", "all_gather"): 32, ("dp", "reduce_scatter"): 16}


def test_bus_factors_and_transfer_time():
    assert bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    assert bus_factor("all_gather", 4) == pytest.approx(3 / 4)
    assert bus_factor("p2p", 2) == 1.0
    assert transfer_seconds("all_reduce", 1e9, 1, 1e9) == 0.0  # one rank moves nothing
    assert transfer_seconds("reduce_scatter", 4e9, 4, 1e9, latency=1e-3) == pytest.approx(3.001)
    assert stage_block_counts(7, 3) == [1, 3, 3]  # filled from the last stage
    assert stage_block_counts(8, 2, [3]) == [3, 5]


def test_stage_block_counts_match_the_pipeline_split():
    from megasora.config import load_config
    from megasora.models import build_dit
    from megasora.parallel.pipeline import stage_ranges
    for depth, stages in [(2, 2), (5, 2), (7, 3), (8, 4), (9, 4)]:
        model = build_dit(load_config(REPO / "configs" / "tiny.yaml", [f"model.depth={depth}"]))
        assert [b - a for a, b in stage_ranges(model, stages)] == stage_block_counts(depth, stages)


# ------------------------------------------------------------------ whole training runs


def _train_worker(rank: int, world: int, root: str) -> dict:
    from megasora.config import load_config
    from megasora.train.trainer import train
    records = {}
    for name, overrides in CASES.items():
        cfg = load_config(REPO / "configs" / "tiny.yaml", BASE + overrides + [f"run.dir={root}/{name}"])
        train(cfg)
        dist.barrier()
        if rank == 0:
            lines = (Path(root) / name / "metrics.jsonl").read_text().splitlines()
            records[name] = [json.loads(line) for line in lines]
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return run_launched(_train_worker, 2, str(tmp_path_factory.mktemp("accounting")))[0]


def _analytic(name: str) -> dict[str, int]:
    from megasora.config import load_config
    cfg = load_config(REPO / "configs" / "tiny.yaml", BASE + CASES[name])
    work, micro = workload_from_config(cfg)
    assert (work.tokens, work.text_tokens) == (TOKENS, TEXT)
    volume = comm_volume(work, layout_from_config(cfg, 2, micro), stage=0,  # global rank 0 writes metrics.jsonl
                         pp_boundaries=cfg.parallel.pp_boundaries)
    out = {f"comm_bytes/{axis}/{kind}": nbytes for axis, kinds in volume.items() for kind, nbytes in kinds.items()}
    out.update({f"comm_bytes/{axis}": sum(kinds.values()) for axis, kinds in volume.items()})
    return out


def _measured(record: dict) -> dict[str, int]:
    return {k: v for k, v in record.items() if k.startswith("comm_bytes/")}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CASES if n != "dp2_off"])
def test_comm_bytes_equal_the_analytic_model(runs, name):
    expected = _analytic(name)
    assert len(runs[name]) == 2
    # ZeRO-3's first step traces the module order (extra gathers and broadcasts); the model
    # describes the steady state
    records = runs[name][1:] if "zero3" in name else runs[name]
    for record in records:  # every step, every axis and kind, to the byte
        assert _measured(record) == expected


@pytest.mark.slow
def test_recompute_repeats_sequence_parallel_communication(runs):
    """full checkpointing re-runs the ring K/V hops and the Ulysses all-to-alls of every block's
    forward; selective keeps attention (and its communication) but re-runs the tp gathers."""
    ring = lambda n: runs[n][-1]["comm_bytes/ring/p2p"]
    a2a = lambda n: runs[n][-1]["comm_bytes/ulysses/all_to_all"]
    # per block: forward 1 K/V hop, backward 1 K/V hop + 2 dK/dV hops (all the same size in fp32)
    assert ring("ring2_full_ac") == pytest.approx(ring("ring2") * 5 / 4)
    assert a2a("ulysses2_full_ac") == pytest.approx(a2a("ulysses2") * 1.5)  # 4 forward + 4 backward -> 12
    assert runs["tp2_selective_ac"][-1]["comm_bytes/tp/all_gather"] > runs["tp2"][-1]["comm_bytes/tp/all_gather"]


@pytest.mark.slow
def test_step_time_breakdown_and_mfu(runs):
    for name in ("dp2", "tp2", "pp2"):
        for record in runs[name]:
            parts = [record[f"time/{p}_s"] for p in ("fwd", "bwd", "opt")]
            assert all(p >= 0 for p in parts) and record["time/fwd_s"] > 0 and record["time/bwd_s"] > 0
            inside = sum(parts) + record.get("time/pp_recv_s", 0) + record.get("time/pp_send_s", 0)
            assert inside == pytest.approx(record["step_time_s"], rel=1e-6)
            assert 0 <= record["time/comm_s"] <= record["step_time_s"]
            assert record["time/data_s"] >= 0
            assert 0 < record["mfu"] == record["hfu"] < 1
    assert runs["pp2"][-1]["time/pp_recv_s"] > 0
    assert runs["ring2_full_ac"][-1]["hfu"] > runs["ring2_full_ac"][-1]["mfu"]


@pytest.mark.slow
def test_accounting_off_writes_no_accounting(runs):
    record = runs["dp2_off"][-1]
    assert not [k for k in record if k.startswith(("comm_", "time/")) or k in ("mfu", "hfu")]
    assert record["loss"] == runs["dp2"][-1]["loss"]  # counting never changes what is computed
