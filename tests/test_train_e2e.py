"""End-to-end training through the real CLI, torchrun and DeepSpeed on CPU (gloo)."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch_utils import read_losses, read_metrics, run_torchrun

TINY = "configs/tiny.yaml"
REQUIRED_METRICS = {"step", "loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "flops_per_s", "mem_bytes"}


@pytest.mark.slow
def test_two_process_zero2_overfits_fixed_batch(tmp_path: Path) -> None:
    run = tmp_path / "overfit"
    # 4 clips = one global batch (2 per rank x 2 ranks), so every step sees the same samples.
    run_torchrun(2, ["train", "--config", TINY, "--set", f"run.dir={run}", "--set", "train.steps=200",
                     "--set", "data.num_samples=4", "--set", "train.lr=2e-3", "--set", "train.zero_stage=2",
                     "--set", "diffusion.caption_dropout=0", "--set", "train.ema_decay=0"])
    losses = read_losses(run)
    first = losses[1]
    last = sum(losses[s] for s in range(191, 201)) / 10
    assert last <= first / 5, f"loss fell only from {first:.3f} to {last:.3f}"
    records = read_metrics(run)
    assert REQUIRED_METRICS <= set(records[0]), set(records[0])
    assert (run / "checkpoints" / "latest").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file() and (run / "loss.png").is_file()


@pytest.mark.slow
def test_same_layout_resume_is_exact(tmp_path: Path) -> None:
    common = ["--config", TINY, "--set", "train.steps=10", "--set", "train.zero_stage=2",
              "--set", "train.precision=fp32"]
    full = tmp_path / "full"
    run_torchrun(2, ["train", *common, "--set", f"run.dir={full}", "--set", "train.save_every=5"])
    # Second run: the same job restarted from its step-5 checkpoint (as after a crash).
    resumed = tmp_path / "resumed"
    run_torchrun(2, ["train", *common, "--set", f"run.dir={resumed}",
                     "--resume", str(full / "checkpoints" / "step_00000005")])
    a, b = read_losses(full), read_losses(resumed)
    assert sorted(b) == [6, 7, 8, 9, 10]
    for step in range(6, 11):
        assert b[step] == a[step], (step, a[step], b[step])


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (1, "bf16"), (3, "bf16")])
def test_zero_stages_and_precisions_train(tmp_path: Path, zero_stage: int, precision: str) -> None:
    run = tmp_path / f"z{zero_stage}{precision}"
    run_torchrun(1, ["train", "--config", TINY, "--set", f"run.dir={run}", "--set", "train.steps=3",
                     "--set", f"train.zero_stage={zero_stage}", "--set", f"train.precision={precision}"])
    losses = read_losses(run)
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 10 for v in losses.values())
    assert (run / "checkpoints" / "step_00000003" / "megasora.json").is_file()
