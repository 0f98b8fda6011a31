"""The EMA sharded over dp x sp (train/ema.py): parallel == single, exact resume, and exact
restore on other layouts, through the real trainer (DeepSpeed engine, ZeRO-2 unless named) on gloo;
under ZeRO-3 (partitioned over dp x sp) each rank's EMA is its own weight partition's.

Every run trains the golden setup (tests/test_golden.py's model and batch, lr 1e-2, 6 steps, EMA
decay 0.9) and saves at steps 3 and 6; the whole EMA is read back from its ema/ files (as
`megasora ckpt export --ema` does). Runs of one world size share a spawn.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megasora.train.checkpoint import read_ema, read_model_weights
from megasora.train.shard_files import Piece, ShardIndex, flat_pieces, write_shard

from ckpt_workers import assert_ema_parts_are, restored_ema
from parallel_utils import REPO, run_launched, train_runs

STEPS = 6
BASE = ["model.hidden=32", "model.heads=4", "model.depth=2", "model.mlp_ratio=2.0",
        "data.frames=3", "data.height=6", "data.width=6", "data.num_samples=16",
        f"train.steps={STEPS}", "train.save_every=3", "train.warmup_steps=0", "train.lr=1e-2",
        "train.ema_decay=0.9", "train.zero_stage=2", "train.grad_clip=1.0", "diffusion.cond_frames_prob=1.0"]
GLOBAL_BATCH = 4
PREVIEW = [f"train.sample_every={STEPS}", "train.sample_steps=1"]  # rank 0 samples the EMA from every rank's part
LAYOUTS = {  # name -> (world, overrides, gradient accumulation steps)
    "single": (1, [], 1),
    "dp2": (2, [], 1),
    "ulysses2": (2, ["parallel.ulysses=2"], 1),
    "ring2": (2, ["parallel.ring=2"], 1),
    "dp2_zero3": (2, ["train.zero_stage=3"], 1),
    "ulysses2_zero3": (2, ["train.zero_stage=3", "parallel.ulysses=2", *PREVIEW], 1),
    "tp2xulysses2": (4, ["parallel.tp=2", "parallel.ulysses=2"], 1),
    "pp2xring2": (4, ["parallel.pp=2", "parallel.ring=2"], 2),  # 1F1B needs pp micro-batches
    "dp2xulysses2": (4, ["parallel.ulysses=2", *PREVIEW], 1),
}
TOLERANCE = 1e-5  # EMA elements, absolute (the parameters agree to 1e-4 in test_golden; the EMA averages them)


def overrides(name: str) -> list[str]:
    world, sets, accum = LAYOUTS[name]
    model_ranks = 1
    for item in sets:
        if item.startswith("parallel."):
            model_ranks *= int(item.split("=")[1])
    dp = world // model_ranks
    return [*BASE, *sets, f"train.micro_batch_size={GLOBAL_BATCH // (dp * accum)}", f"train.grad_accum={accum}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ema_runs")
    for world in (1, 2, 4):
        group = [(str(root / name), overrides(name), None) for name, (w, _, _) in LAYOUTS.items() if w == world]
        if world == 2:  # resumed from the ulysses2 run's step 3, to step 6
            group.append((str(root / "ulysses2_resumed"), overrides("ulysses2"),
                          str(root / "ulysses2" / "checkpoints" / "step_00000003")))
        train_runs(world, group)
    return root


def final_ema(run: Path) -> dict[str, torch.Tensor]:
    ema = read_ema(run / "checkpoints" / f"step_{STEPS:08d}")
    assert ema is not None
    return ema


@pytest.mark.slow
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "single"])
def test_sharded_ema_equals_single_process(runs: Path, layout: str) -> None:
    ref, ema = final_ema(runs / "single"), final_ema(runs / layout)
    assert ema.keys() == ref.keys()
    first = read_ema(runs / "single" / "checkpoints" / "step_00000003")
    assert first is not None and max((ref[k] - first[k]).abs().max().item() for k in ref) > 1e-3  # it moved
    for name, expected in ref.items():
        err = (ema[name] - expected).abs().max().item()
        assert err <= TOLERANCE, f"{layout}: EMA of {name} differs by {err:.2e}"


@pytest.mark.slow
def test_resume_continues_the_sharded_ema(runs: Path) -> None:
    """Resumed at step 3 (restored bit for bit: the ulysses2->ulysses2 case below), trained to step 6:
    the EMA differs from the uninterrupted run's no more than the weights do (DeepSpeed's resume
    leaves them ~2e-7 apart on gloo), so the EMA's save/restore adds nothing."""
    full, resumed = final_ema(runs / "ulysses2"), final_ema(runs / "ulysses2_resumed")
    weights = [read_model_weights(runs / run / "checkpoints", f"step_{STEPS:08d}", ema=False)[0]
               for run in ("ulysses2", "ulysses2_resumed")]
    weights_err = max((weights[0][k] - weights[1][k]).abs().max().item() for k in full)
    ema_err = max((full[k] - resumed[k]).abs().max().item() for k in full)
    assert weights_err <= 1e-6 and ema_err <= weights_err, (ema_err, weights_err)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp2xulysses2", "ulysses2_zero3"])
def test_previews_sample_the_sharded_ema(runs: Path, layout: str) -> None:
    assert (runs / layout / "samples" / f"step_{STEPS}.mp4").stat().st_size > 0
    assert not (runs / layout / "samples" / ".ema").exists()  # the parts were assembled, then removed


RESHARDS = {  # name -> (saved by, step, world, layout overrides)
    "ulysses2->ulysses2": ("ulysses2", 3, 2, ["parallel.ulysses=2"]),
    "dp2xulysses2->ring4": ("dp2xulysses2", STEPS, 4, ["parallel.ring=4"]),
    # the same layout: a ZeRO-3 checkpoint takes no layout change yet (CheckpointError, train/startup.py)
    "ulysses2_zero3->ulysses2_zero3": ("ulysses2_zero3", STEPS, 2, ["train.zero_stage=3", "parallel.ulysses=2"]),
    "tp2xulysses2->tp1": ("tp2xulysses2", STEPS, 1, []),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RESHARDS))
def test_sharded_ema_restores_exactly_on_another_layout(runs: Path, tmp_path: Path, case: str) -> None:
    source, step, world, sets = RESHARDS[case]
    ckpt = runs / source / "checkpoints" / f"step_{step:08d}"
    ranks = run_launched(restored_ema, world, [*BASE, *sets, f"run.dir={tmp_path}"], str(ckpt))
    saved = read_ema(ckpt)
    assert saved is not None
    assert_ema_parts_are(saved, [slices for slices, _ in ranks])
    whole_bytes = sum(t.numel() * 4 for t in saved.values())
    for _, nbytes in ranks:  # each rank keeps 1/world of the EMA (dp x sp = world), +-1 element a parameter
        assert abs(nbytes - whole_bytes / world) < 4 * len(saved)


def as_checkpoint_with_whole_slice_ema(ckpt: Path, dest: Path, tp: int) -> Path:
    """A copy of `ckpt` with its EMA as checkpoints wrote it before the dp x sp sharding: one
    ema/slice_mpXX.safetensors per tp rank, each parameter's whole tp slice under its own name."""
    from megasora.config import load_config
    from megasora.models import build_dit
    from megasora.parallel.tensor import tp_partition_dims
    shutil.copytree(ckpt, dest)
    whole = read_ema(ckpt)
    assert whole is not None
    split = tp_partition_dims(build_dit(load_config(REPO / "configs" / "tiny.yaml", BASE)))
    shutil.rmtree(dest / "ema")
    (dest / "ema").mkdir()
    for rank in range(tp):
        pieces = {}
        for name, tensor in whole.items():
            if name in split:
                local = tuple(n // tp if d == split[name] else n for d, n in enumerate(tensor.shape))
                pieces[name] = Piece.split(local, split[name], rank, tp)
            elif rank == 0:
                pieces[name] = Piece.whole_of(tuple(tensor.shape))
        write_shard(dest / "ema" / f"slice_mp{rank:02d}.safetensors",
                    {n: whole[n][p.region] for n, p in pieces.items()}, pieces)
    manifest = json.loads((dest / "megasora.json").read_text())
    manifest["files"] = {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*"))
                         if p.is_file() and p.name != "megasora.json"}
    (dest / "megasora.json").write_text(json.dumps(manifest))
    return dest


@pytest.mark.slow
def test_checkpoint_with_whole_slice_ema_files_still_loads(runs: Path, tmp_path: Path) -> None:
    ckpt = runs / "tp2xulysses2" / "checkpoints" / f"step_{STEPS:08d}"
    old = as_checkpoint_with_whole_slice_ema(ckpt, tmp_path / "ckpts" / ckpt.name, tp=2)
    ranks = run_launched(restored_ema, 2, [*BASE, "parallel.ulysses=2", f"run.dir={tmp_path / 'run'}"], str(old))
    assert_ema_parts_are(final_ema(runs / "tp2xulysses2"), [slices for slices, _ in ranks])


def test_flat_parts_are_rectangles_of_the_whole_parameter() -> None:
    """Every flat range of a tp slice is the listed rectangles of the whole parameter, in order."""
    whole = torch.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)
    within = Piece.split((2, 3, 2, 2), 2, 1, 2)  # tp rank 1's half along dim 2
    local = whole[within.region].reshape(-1)
    for lo in range(local.numel() + 1):
        for hi in range(lo, local.numel() + 1):
            rects = flat_pieces(within, lo, hi)
            assert len(rects) <= 2 * whole.dim() - 1
            assert [at for at, _ in rects] == [sum(p.numel for _, p in rects[:i]) for i in range(len(rects))]
            got = [whole[p.region].reshape(-1) for _, p in rects]
            assert torch.equal(torch.cat(got) if got else local[:0], local[lo:hi]), (lo, hi)


def test_shard_files_of_flat_parts_read_back_as_any_slice(tmp_path: Path) -> None:
    """Three dp parts of a (5, 4) parameter, each written as its rectangles (keys w, w#1, ...),
    read back whole, as tp slices and as other flat parts; plain safetensors files."""
    w = torch.randn(5, 4)
    whole = Piece.whole_of((5, 4))
    for part, (lo, hi) in enumerate([(0, 7), (7, 14), (14, 20)]):
        rects = flat_pieces(whole, lo, hi)
        keys = ["w"] + [f"w#{k}" for k in range(1, len(rects))]
        write_shard(tmp_path / f"slice_mp00_dp{part:03d}.safetensors", {k: w[p.region] for k, (_, p) in zip(keys, rects)},
                    {k: p for k, (_, p) in zip(keys, rects)}, dict.fromkeys(keys, "w"))
    with ShardIndex(tmp_path) as index:
        assert index.names() == ["w"] and torch.equal(dict(index.whole())["w"], w)
        for r in range(2):
            out = torch.empty(5, 2)
            index.read_into("w", out, Piece.split((5, 2), 1, r, 2))
            assert torch.equal(out, w[:, 2 * r:2 * r + 2])
        for _, piece in flat_pieces(whole, 3, 18):
            out = torch.empty(piece.shape)
            index.read_into("w", out, piece)
            assert torch.equal(out, w[piece.region])
