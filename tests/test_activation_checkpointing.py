"""Activation checkpointing: `full` and `selective` train exactly like `none`.

Unit level (one process): gradients equal the plain DiT's, the attention core runs once per
block under `selective` and twice under `full`, ac_every picks blocks 0, k, 2k, ...

Golden runs: 8 optimizer steps at lr 1e-2 (so the adaLN-Zero gates open and self-attention
matters) through the real trainer (DeepSpeed engine, ZeRO-2 unless stated, gradient clipping
active) for single, tp2, ulysses2, ring2, pp2, tp2 x ring2 and USP (ulysses2 x ring2), each
layout trained with none, full and selective (and ac_every=2 on some), plus ZeRO-3 (single),
ZeRO-1 (pp2) and bf16 (ulysses2) variants. Each checkpointed run is compared with the `none`
run of the same layout. Recomputation replays the same ops on the same inputs, so the runs
agree bit for bit (measured: every logged loss and grad norm identical, bf16 included); the
stated tolerance, 1e-6 relative on losses and grad norms and 1e-6 absolute on parameters,
only leaves room for kernels that are not deterministic on other platforms. The ring /
Ulysses collectives are counted at the torch.distributed seam: `selective` issues exactly as
many as `none`, `full` exactly one extra forward's worth. One spawn per world size: process
start-up dominates on 2 cores.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import test_pipeline as pipeline_golden  # its _full_params / _grad_norms gather tp- and pp-sharded runs
import torch
import torch.distributed as dist

from megasora.config import load_config
from megasora.models import build_dit
from megasora.models.attention import local_attention
from megasora.parallel import comm_counter
from megasora.parallel.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpointed_blocks,
    checkpointing_summary,
)
from megasora.parallel.pipeline import build_stage

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]
STEPS, DEPTH, MICRO_BATCHES = 8, 4, 2
BASE = ["model.hidden=32", "model.heads=4", f"model.depth={DEPTH}", "model.mlp_ratio=2.0",
        "data.frames=3", "data.height=6", "data.width=6", "data.num_samples=16",
        f"train.steps={STEPS}", "train.warmup_steps=0", "train.lr=1e-2", "train.ema_decay=0",
        "train.zero_stage=2", "train.grad_clip=1.0", "diffusion.cond_frames_prob=1.0",
        "train.micro_batch_size=2", f"train.grad_accum={MICRO_BATCHES}"]
AC = {"full": ["train.activation_checkpointing=full"],
      "selective": ["train.activation_checkpointing=selective"],
      "full_every2": ["train.activation_checkpointing=full", "train.ac_every=2"],
      "selective_every2": ["train.activation_checkpointing=selective", "train.ac_every=2"]}

LAYOUTS = {  # name -> (world, overrides, checkpointing variants compared with its `none` run)
    "single": (1, [], ["full", "selective", "full_every2", "selective_every2"]),
    "single_zero3": (1, ["train.zero_stage=3"], ["full", "selective"]),
    "tp2": (2, ["parallel.tp=2"], ["full", "selective"]),
    "ulysses2": (2, ["parallel.ulysses=2"], ["full", "selective"]),
    "ring2": (2, ["parallel.ring=2"], ["full", "selective", "selective_every2"]),
    "pp2": (2, ["parallel.pp=2", "train.zero_stage=1"], ["full", "selective", "full_every2"]),
    "ulysses2_bf16": (2, ["parallel.ulysses=2", "train.precision=bf16"], ["full", "selective"]),
    "tp2xring2": (4, ["parallel.tp=2", "parallel.ring=2"], ["full", "selective"]),
    "usp": (4, ["parallel.ulysses=2", "parallel.ring=2"], ["full", "selective"]),  # Ulysses over ring
}
TOL = 1e-6  # see the module docstring
SP_COLLECTIVES = ("all_to_all_single", "batch_isend_irecv")  # Ulysses all-to-all, ring K/V exchange


# ---------------------------------------------------------------- one process


def _tiny_dit():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.hidden=32", "model.heads=4", "model.depth=3",
                                                      "text.dim=16"])
    torch.manual_seed(0)
    model = build_dit(cfg)
    with torch.no_grad():  # open the adaLN-Zero gates so every branch carries gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _counted_step(model, mode: str, every: int):
    """One forward + backward; returns (output, grads, attention calls in forward, in total)."""
    calls = [0]

    def counting_attention(q, k, v, key_padding_mask=None):
        calls[0] += 1
        return local_attention(q, k, v, key_padding_mask)

    for block in model.blocks:
        block.attn.attention = counting_attention
    apply_activation_checkpointing(model, mode, every)
    torch.manual_seed(1)
    latents, t = torch.randn(2, model.arch.in_channels, 2, 8, 8), torch.rand(2)
    text, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(latents, t, text, mask, torch.tensor([False, True]))
    forward_calls = calls[0]
    out.pow(2).mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, forward_calls, calls[0]


@pytest.mark.parametrize("mode,every,recomputed", [
    ("full", 1, 3), ("selective", 1, 0), ("full", 2, 2), ("selective", 2, 0), ("full", 5, 1)])
def test_checkpointed_block_gradients_and_attention_calls(mode, every, recomputed):
    base = _tiny_dit()
    ref_out, ref_grads, ref_fwd, ref_total = _counted_step(copy.deepcopy(base), "none", 1)
    assert ref_fwd == ref_total == 3
    model = copy.deepcopy(base)
    out, grads, fwd, total = _counted_step(model, mode, every)
    assert fwd == 3 and total == 3 + recomputed, f"attention ran {total} times, expected {3 + recomputed}"
    assert checkpointing_summary(model)[mode] == len(checkpointed_blocks(3, mode, every))
    assert list(model.state_dict()) == list(base.state_dict())  # no wrapper: checkpoints load across modes
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-6, atol=1e-7, msg=name)


def test_pipeline_stages_keep_the_checkpointed_blocks():
    """Marks set on the whole DiT travel with the blocks into the stages (and through deepcopy)."""
    model = copy.deepcopy(apply_activation_checkpointing(_tiny_dit(), "selective", 2))
    stages = [build_stage(model, s, 2, [1]) for s in range(2)]
    assert [checkpointing_summary(stage)["selective"] for stage in stages] == [1, 1]  # blocks 0 | 1, 2
    assert checkpointing_summary(model) == {"none": 1, "full": 0, "selective": 2}


def test_checkpointed_blocks_rule():
    assert checkpointed_blocks(5, "none", 1) == []
    assert checkpointed_blocks(5, "full", 1) == [0, 1, 2, 3, 4]
    assert checkpointed_blocks(5, "selective", 2) == [0, 2, 4]
    with pytest.raises(ValueError, match="not one of"):
        checkpointed_blocks(5, "some", 1)


def test_selective_keeps_fewer_bytes_than_none_and_more_than_full():
    """Saved-for-backward bytes of one block forward, per mode (what each mode keeps alive)."""
    from megasora.train.memory_probe import LiveTensorBytes
    base = _tiny_dit()
    kept = {}
    for mode in ("none", "selective", "full"):
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, mode)
        torch.manual_seed(1)
        inputs = (torch.randn(2, model.arch.in_channels, 2, 8, 8), torch.rand(2), torch.randn(2, 5, 16),
                  torch.ones(2, 5, dtype=torch.bool))
        with LiveTensorBytes() as probe:
            out = model(*inputs)
            kept[mode] = probe.current_bytes
        del out
    assert kept["full"] < kept["selective"] < kept["none"], kept


# ---------------------------------------------------------------- golden runs (spawned)


def _count_collectives(counts: dict[str, int]) -> None:
    """Wrap the torch.distributed calls ring and Ulysses attention make, counting them (they still run).

    The communication counter is installed first: train() installs it once per process, which
    would otherwise replace these wrappers with its own."""
    comm_counter.install()
    for name in SP_COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        setattr(dist, name, counted)


def _train_worker(rank: int, world: int, cases: list[tuple[str, list[str]]], root: str):
    from megasora.train.trainer import train
    counts = dict.fromkeys(SP_COLLECTIVES, 0)
    _count_collectives(counts)
    results = {}
    for name, extra in cases:
        cfg = load_config(REPO / "configs" / "tiny.yaml", BASE + extra + [f"run.dir={root}/{name}"])
        before = dict(counts)
        losses = train(cfg).losses
        dist.barrier()  # every rank's checkpoint and the metrics are on disk
        comm = {k: counts[k] - before[k] for k in SP_COLLECTIVES}
        params = None if cfg.train.zero_stage == 3 else pipeline_golden._full_params(cfg, world)
        results[name] = (losses, params, pipeline_golden._grad_norms(cfg.run.dir), comm)
    return results if rank == 0 else None


def _cases(world: int) -> list[tuple[str, list[str]]]:
    cases = []
    for layout, (w, extra, variants) in LAYOUTS.items():
        if w == world:
            cases.append((f"{layout}/none", extra))
            cases += [(f"{layout}/{v}", extra + AC[v]) for v in variants]
    return cases


@pytest.fixture(scope="module")
def ac_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ac"))
    runs = {}
    for world in sorted({w for w, _, _ in LAYOUTS.values()}):
        runs.update(run_launched(_train_worker, world, _cases(world), root)[0])
    return runs


def _compare(layout: str, variant: str, runs) -> None:
    ref_losses, ref_params, ref_norms, _ = runs[f"{layout}/none"]
    losses, params, norms, _ = runs[f"{layout}/{variant}"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, ref in ref_losses.items():
        rel = abs(losses[step] - ref) / abs(ref)
        assert rel <= TOL, f"{layout}/{variant} step {step}: loss {losses[step]:.8f} vs none {ref:.8f}"
    assert max(ref_norms.values()) > 1.0  # clipping active: a wrong norm would change the weights too
    for step, ref in ref_norms.items():
        assert abs(norms[step] - ref) <= TOL * ref, f"{layout}/{variant} step {step}: grad norm {norms[step]} vs {ref}"
    if ref_params is None:  # ZeRO-3: DeepSpeed's module file holds no full weights; losses and norms compared
        return
    for name, ref in ref_params.items():
        err = (params[name].float() - ref.float()).abs().max().item()
        assert err <= TOL, f"{layout}/{variant}: parameter {name} differs by {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("layout,variant", [(layout, v) for layout, (_, _, vs) in LAYOUTS.items() for v in vs])
def test_checkpointing_trains_like_none(ac_runs, layout, variant):
    _compare(layout, variant, ac_runs)


@pytest.mark.slow
def test_golden_runs_train_self_attention(ac_runs):
    cfg = load_config(REPO / "configs" / "tiny.yaml", BASE + ["run.dir=unused"])
    torch.manual_seed(cfg.train.seed)
    initial = dict(build_dit(cfg).named_parameters())
    final = ac_runs["single/none"][1]
    moved = max((final[k] - initial[k].detach()).abs().max().item() for k in initial if ".attn.q." in k)
    assert moved > 1e-3, "self-attention q weights did not move; the comparison would not test attention"


@pytest.mark.slow
@pytest.mark.parametrize("layout,collective,per_forward", [
    ("ulysses2", "all_to_all_single", 2),   # q/k/v in, output back
    ("ring2", "batch_isend_irecv", 1),      # ring - 1 K/V hops
    ("tp2xring2", "batch_isend_irecv", 1),
    ("usp", "all_to_all_single", 2),
    ("usp", "batch_isend_irecv", 1),
])
def test_recomputed_communication(ac_runs, layout, collective, per_forward):
    """selective never re-runs the ring / Ulysses exchange; full re-runs it once per checkpointed block."""
    none = ac_runs[f"{layout}/none"][3][collective]
    assert none > 0
    assert ac_runs[f"{layout}/selective"][3][collective] == none
    extra = per_forward * DEPTH * MICRO_BATCHES * STEPS
    assert ac_runs[f"{layout}/full"][3][collective] == none + extra
    if f"{layout}/selective_every2" in ac_runs:
        assert ac_runs[f"{layout}/selective_every2"][3][collective] == none
