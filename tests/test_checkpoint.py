"""Checkpoints: exact resume for ZeRO 1/2/3, resharding to other layouts, crash safety, integrity,
preemption, all through the real trainer and DeepSpeed engine on CPU with gloo.

The runs whose checkpoints and metrics the tests only read are trained once, in one group of
processes per world size (process start-up costs more than these trainings on 2 cores); what
users type (--resume auto, a corrupt --resume path, SIGUSR1, ckpt inspect/export) runs the CLI.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from megasora.config import load_config
from megasora.data.sources import SyntheticVideos
from megasora.data.stream import stream_ids
from megasora.errors import PREEMPTED_EXIT_CODE
from megasora.launcher.env import free_port
from megasora.models import build_dit
from megasora.train.checkpoint import CheckpointError, find_resumable, read_model_weights, verify
from megasora.train.objective import FlowMatchingObjective
from megasora.train.shard_files import Piece, ShardIndex, write_shard

from ckpt_workers import (
    assert_ema_parts_are,
    restored_ema,
    train_and_die_during_save,
    train_recording_save_communication,
)
from launch_utils import REPO, read_losses, run_torchrun
from parallel_utils import run_launched, train_runs

TINY = "configs/tiny.yaml"
pytestmark = pytest.mark.slow


def train_args(run: Path, *sets: str) -> list[str]:
    args = ["train", "--config", TINY, "--set", f"run.dir={run}"]
    for s in sets:
        args += ["--set", s]
    return args


def sample_ids(run: Path) -> dict[int, list[int]]:
    return {r["step"]: r["ids"] for r in map(json.loads, (run / "sample_ids.jsonl").read_text().splitlines())}


RESHARD_TARGETS = {  # name -> (world size, overrides); every target keeps the global batch at 8
    "dp2": (2, ["train.grad_accum=2"]),
    "tp2xdp2": (4, ["parallel.tp=2", "train.grad_accum=2"]),
    "ring2xdp2": (4, ["parallel.ring=2", "train.grad_accum=2"]),
    "world1": (1, ["train.grad_accum=4"]),
}
RESHARD = ["train.steps=4", "train.zero_stage=2", "run.record_sample_ids=true", "train.ema_decay=0.9"]
PP2 = ["parallel.pp=2", "train.grad_accum=2"]  # 1F1B needs at least pp micro-batches


def runs_by_world(root: Path) -> dict[int, list[tuple[str, list[str], str | None]]]:
    """(run.dir, overrides, resume) of every run the tests read, by world size, in training order:
    world 4 first, since its dp4 run checkpoints at step 2 for the other layouts to resume."""
    dp4 = [(str(root / "dp4"), [*RESHARD, "train.save_every=2"], None)]  # uninterrupted, global batch 8
    tp2ring2 = [(str(root / "tp2ring2"), ["train.steps=2", "parallel.tp=2", "parallel.ring=2", "train.grad_accum=4",
                                          "train.zero_stage=2", "run.record_sample_ids=true"], None),
                (str(root / "tp2ring2_at_dp4"), ["train.steps=3", "train.zero_stage=2", "run.record_sample_ids=true"],
                 str(root / "tp2ring2" / "checkpoints"))]
    same_layout = []
    for stage in (1, 3):
        sets = ["train.steps=6", f"train.zero_stage={stage}", "train.precision=fp32"]
        full = root / f"zero{stage}_full"
        same_layout += [(str(full), [*sets, "train.save_every=3"], None),
                        (str(root / f"zero{stage}_resumed"), sets, str(full / "checkpoints" / "step_00000003"))]
    by_world = {4: dp4 + tp2ring2, 2: same_layout, 1: []}
    for name, (world, sets) in RESHARD_TARGETS.items():
        by_world[world].append((str(root / name), [*RESHARD, *sets], str(root / "dp4" / "checkpoints" / "step_00000002")))
    by_world[2] += [(str(root / "corrupt"), ["train.steps=4", "train.save_every=2"], None),
                    (str(root / "cli"), ["train.steps=2", "train.save_every=1", "parallel.tp=2"], None),
                    (str(root / "pp2"), ["train.steps=2", "train.ema_decay=0.9", *PP2], None)]
    return by_world


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt_runs")
    for world, group in runs_by_world(root).items():
        train_runs(world, group)
    return root


@pytest.fixture(scope="module")
def dp4_reference(runs: Path) -> Path:
    """An uninterrupted dp4 ZeRO-2 run of 4 steps (global batch 8, EMA) that checkpoints at step 2."""
    return runs / "dp4"


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_same_layout_resume_is_exact(runs: Path, zero_stage: int) -> None:
    # ZeRO-2 is covered by test_train_e2e::test_same_layout_resume_is_exact.
    a, b = read_losses(runs / f"zero{zero_stage}_full"), read_losses(runs / f"zero{zero_stage}_resumed")
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]


def saved_model_loss(ckpt_dir: Path, tag: str, positions: range, step_index: int) -> float:
    """The loss the checkpoint's raw weights give on the global batch at these stream positions."""
    weights, cfg_dict, _ = read_model_weights(ckpt_dir, tag, ema=False)
    from megasora.config import config_from_dict
    cfg = config_from_dict(cfg_dict)
    model = build_dit(cfg)
    model.load_state_dict(weights)
    batch = SyntheticVideos(cfg)(stream_ids(cfg.train.seed, cfg.data.num_samples, positions.start, len(positions)))
    with torch.no_grad():
        return FlowMatchingObjective(cfg)(model, batch, step_index, torch.float32, torch.device("cpu")).item()


@pytest.mark.parametrize("target", sorted(RESHARD_TARGETS))
def test_resume_dp4_checkpoint_on_another_layout(runs: Path, dp4_reference: Path, target: str) -> None:
    run = runs / target  # resumed from the dp4 run's step 2
    ckpt = dp4_reference / "checkpoints" / "step_00000002"
    losses = read_losses(run)
    assert sorted(losses) == [3, 4]  # continued from step 2 and trained on
    expected = saved_model_loss(ckpt.parent, ckpt.name, range(16, 24), step_index=2)
    assert losses[3] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    before, after, full = sample_ids(dp4_reference), sample_ids(run), sample_ids(dp4_reference)
    assert sorted(before[1] + before[2] + after[3] + after[4]) == sorted(sum(full.values(), []))
    for step in (3, 4):  # same samples in the same steps as the uninterrupted run
        assert sorted(after[step]) == sorted(full[step])


def test_resume_tp2_ring2_checkpoint_at_dp4(runs: Path) -> None:
    src, dst = runs / "tp2ring2", runs / "tp2ring2_at_dp4"
    losses = read_losses(dst)
    assert sorted(losses) == [3]
    expected = saved_model_loss(src / "checkpoints", "step_00000002", range(16, 24), step_index=2)
    assert losses[3] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    ids = sample_ids(src)
    assert sorted(ids[1] + ids[2] + sample_ids(dst)[3]) == sorted(stream_ids(0, 64, 0, 24))


def test_shard_files_give_any_slice_of_what_the_ranks_wrote(tmp_path: Path) -> None:
    """Slices two tp ranks wrote (a column and a row split; a replicated tensor from rank 0 only)
    read back whole and as any tp4 rank's slice; the files are plain safetensors; a missing slice
    is named."""
    torch.manual_seed(0)
    col, row, rep = torch.randn(8, 3), torch.randn(3, 8), torch.randn(5).bfloat16()
    for r in range(2):
        tensors = {"col": col[4 * r:4 * r + 4], "row": row[:, 4 * r:4 * r + 4], "rep": rep}
        pieces = {"col": Piece.split((4, 3), 0, r, 2), "row": Piece.split((3, 4), 1, r, 2), "rep": Piece.whole_of((5,))}
        names = ["col", "row"] + (["rep"] if r == 0 else [])
        write_shard(tmp_path / f"slice_mp{r:02d}.safetensors", {n: tensors[n] for n in names},
                    {n: pieces[n] for n in names})
    assert torch.equal(load_file(str(tmp_path / "slice_mp01.safetensors"))["row"], row[:, 4:])
    with ShardIndex(tmp_path) as index:
        whole = dict(index.whole())
        assert torch.equal(whole["col"], col) and torch.equal(whole["row"], row) and torch.equal(whole["rep"], rep)
        for r in range(4):
            out = torch.empty(3, 2)
            index.read_into("row", out, Piece.split((3, 2), 1, r, 4))
            assert torch.equal(out, row[:, 2 * r:2 * r + 2])
    (tmp_path / "slice_mp01.safetensors").unlink()
    with ShardIndex(tmp_path) as index, pytest.raises(ValueError, match="cover 12 of the 24 elements"):
        index.read_into("col", torch.empty(8, 3), Piece.whole_of((8, 3)))


@pytest.fixture(scope="module")
def sharded_references(runs: Path) -> dict[str, Path]:
    """Step-2 checkpoints with an EMA of the dp4 run, a tp2 run (`cli`) and a pp2 run."""
    return {name: runs / run / "checkpoints" / "step_00000002" for name, run in (("dp4", "dp4"), ("tp2", "cli"),
                                                                                  ("pp2", "pp2"))}


def assert_restored_ema_is_saved_ema(ckpt: Path, ranks: list[tuple[list[tuple], int]]) -> None:
    """Every rank's restored EMA part is bit for bit the saved EMA's, and the parts cover it."""
    whole, _, used_ema = read_model_weights(ckpt.parent, ckpt.name, ema=True)
    raw, _, _ = read_model_weights(ckpt.parent, ckpt.name, ema=False)
    assert used_ema and max((whole[k] - raw[k]).abs().max().item() for k in raw) > 1e-5  # not the weights
    assert_ema_parts_are(whole, [slices for slices, _ in ranks])


EMA_RESHARDS = {  # name -> (saved by, world, overrides)
    "dp4->dp2": ("dp4", 2, ["train.grad_accum=2"]),
    "dp4->tp2xdp2": ("dp4", 4, ["parallel.tp=2", "train.grad_accum=2"]),
    "tp2->tp1": ("tp2", 1, []),
    "tp2->tp2": ("tp2", 2, ["parallel.tp=2"]),
    "pp2->pp1": ("pp2", 1, []),
    "dp4->pp2": ("dp4", 2, PP2),
}


@pytest.mark.parametrize("case", sorted(EMA_RESHARDS))
def test_ema_restores_exactly_on_any_layout(tmp_path: Path, sharded_references: dict[str, Path], case: str) -> None:
    source, world, sets = EMA_RESHARDS[case]
    ckpt = sharded_references[source]
    overrides = [f"run.dir={tmp_path / 'run'}", "train.ema_decay=0.9", *sets]
    assert_restored_ema_is_saved_ema(ckpt, run_launched(restored_ema, world, overrides, str(ckpt)))


def as_checkpoint_before_ema_files(ckpt: Path, dest: Path) -> Path:
    """A copy of `ckpt` as checkpoints were written before ema/: the whole EMA in every
    model-states file's client state, no ema/ directory."""
    shutil.copytree(ckpt, dest)
    whole, _, _ = read_model_weights(ckpt.parent, ckpt.name, ema=True)
    for states in dest.glob("mp_rank_*_model_states.pt"):
        saved = torch.load(states, weights_only=False)
        torch.save({**saved, "ema": whole}, states)
    shutil.rmtree(dest / "ema")
    manifest = json.loads((dest / "megasora.json").read_text())
    manifest["files"] = {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*"))
                         if p.is_file() and p.name != "megasora.json"}
    (dest / "megasora.json").write_text(json.dumps(manifest))
    return dest


def test_checkpoint_with_the_ema_in_its_client_state_still_loads(tmp_path: Path,
                                                                  sharded_references: dict[str, Path]) -> None:
    old = as_checkpoint_before_ema_files(sharded_references["tp2"], tmp_path / "ckpts" / "step_00000002")
    assert_restored_ema_is_saved_ema(sharded_references["tp2"], run_launched(
        restored_ema, 2, [f"run.dir={tmp_path / 'run'}", "train.ema_decay=0.9", "parallel.tp=2"], str(old)))
    exported, _, used_ema = read_model_weights(old.parent, old.name, ema=True)
    assert used_ema and exported.keys() == read_model_weights(old.parent, old.name, ema=False)[0].keys()


def test_rank_killed_during_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "crash"
    overrides = [f"run.dir={run}", "train.steps=6", "train.save_every=2"]
    with pytest.raises(mp.ProcessExitedException):
        mp.start_processes(train_and_die_during_save, args=(2, free_port(), overrides, ".tmp.step_00000004"),
                           nprocs=2, start_method="forkserver")  # parallel_utils' server: no fresh imports
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert (ckpts / ".tmp.step_00000004").is_dir() and not (ckpts / "step_00000004").exists()
    assert find_resumable(ckpts).tag == "step_00000002"
    train_runs(2, [(str(run), ["train.steps=6", "train.save_every=2"], "auto")])
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    assert not (ckpts / ".tmp.step_00000004").exists()  # debris cleaned by the retried save


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2", "train.zero_stage=1", "train.grad_accum=2", "train.micro_batch_size=1"]],
                         ids=["tp2", "pp2"])
def test_save_gathers_nothing(tmp_path: Path, layout: list[str]) -> None:
    """A save streams each rank's own shard: no object collective (pickled tensors) and no gather
    of the model or the EMA on any rank; only barriers and DeepSpeed's small tag check."""
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", "train.steps=2", "train.save_every=1", "train.ema_decay=0.9", *layout]
    mp.spawn(train_recording_save_communication, args=(2, free_port(), overrides, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["object_collectives"] == [], f"rank {rank}"
        gathers = [c for c in record["collectives"] if "gather" in c[1]]
        assert gathers == [], f"rank {rank}: {gathers}"
    assert find_resumable(run / "checkpoints").step == 2


def test_corrupt_shard_is_named_and_auto_resume_falls_back(runs: Path) -> None:
    run = runs / "corrupt"  # 4 steps, saved every 2
    ckpts = run / "checkpoints"
    shard = sorted((ckpts / "step_00000004").glob("*optim_states.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"truncated or altered: {shard}"):
        verify(ckpts / "step_00000004")
    proc = run_torchrun(2, [*train_args(run, "train.steps=5"), "--resume", "auto"])
    assert f"skipping checkpoint step_00000004: checkpoint shard truncated or altered: {shard}" in proc.stderr
    assert "at step 2" in proc.stderr
    assert sorted(read_losses(run)) == [1, 2, 3, 4, 5]
    explicit = run_torchrun(2, [*train_args(run, "train.steps=5"), "--resume", str(ckpts / "step_00000004")],
                            check=False)
    assert explicit.returncode != 0 and f"truncated or altered: {shard}" in explicit.stderr


def test_sigusr1_saves_and_exits_with_documented_status(tmp_path: Path) -> None:
    run = tmp_path / "preempt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "megasora", *train_args(run, "train.steps=100000")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    last_step = max(read_losses(run))
    info = find_resumable(run / "checkpoints")
    assert info is not None and info.step == last_step
    assert "preemption signal received" in err


def test_ckpt_inspect_export_and_sample_from_export(runs: Path, tmp_path: Path, capsys) -> None:
    run = runs / "cli"  # tp2, 2 steps, saved every step
    from megasora.cli import main

    def megasora(*args: str) -> str:
        """What `megasora ARGS` prints, run in this process (an interpreter start less per command)."""
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        out, err = capsys.readouterr()
        assert exit_info.value.code == 0, err[-3000:]
        return out

    listing = megasora("ckpt", "inspect", str(run))
    assert "latest -> step_00000002" in listing
    assert "step_00000002" in listing and "complete  step 2  samples 4  layout dp1 tp2" in listing
    out = tmp_path / "export" / "model.safetensors"
    megasora("ckpt", "export", str(run), "--out", str(out), "--ema")
    weights = load_file(str(out))
    cfg = load_config(REPO / TINY)
    assert {k: tuple(v.shape) for k, v in weights.items()} == \
        {k: tuple(v.shape) for k, v in build_dit(cfg).state_dict().items()}  # full, unsharded tensors
    raw = tmp_path / "export" / "raw.safetensors"
    megasora("ckpt", "export", str(run), "--out", str(raw))  # tp-sharded raw weights via universal
    assert {k: v.shape for k, v in load_file(str(raw)).items()} == {k: v.shape for k, v in weights.items()}
    gif = tmp_path / "sample.gif"
    printed = megasora("sample", "--weights", str(out), "--prompt", "a red circle moving left",
                       "--steps", "2", "--out", str(gif))
    assert gif.stat().st_size > 0 and "wrote" in printed
