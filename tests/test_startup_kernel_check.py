"""A kernel choice the GPU cannot run is refused at start-up (issue 21, bad input): before any
process group exists or any rank builds its model, one line naming the GPU and the kernels it
runs. The check takes a described GPU (name, capability), so this CPU tests the GPU cases."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from megasora.config import load_config
from megasora.parallel.block_attention import Accelerator, AttentionKernelUnavailable
from megasora.train.startup import check_attention_kernel
from megasora.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
H100 = Accelerator("NVIDIA H100 80GB HBM3", (9, 0))
T4 = Accelerator("Tesla T4", (7, 5))


def _cfg(*overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", list(overrides))


@pytest.mark.parametrize("gpu,overrides,runs", [
    (T4, ["model.attention_kernel=flash", "train.precision=bf16"], "efficient, reference"),
    (H100, ["model.attention_kernel=cudnn"], "efficient, reference"),  # fp32: the 16-bit kernels are out
    (Accelerator("NVIDIA A100-SXM4-80GB", (8, 0)), ["model.attention_kernel=fa3", "train.precision=bf16"],
     "flash, cudnn, efficient, reference"),
])
def test_a_kernel_the_gpu_cannot_run_is_one_line_at_startup(gpu, overrides, runs):
    with pytest.raises(AttentionKernelUnavailable) as err:
        check_attention_kernel(_cfg(*overrides), gpu)
    line = err.value.line()
    assert "\n" not in line and gpu.name in line and f"it runs {runs}; set model.attention_kernel" in line, line


def test_runnable_choices_pass():
    assert check_attention_kernel(_cfg("train.precision=bf16"), H100) == "cudnn"
    assert check_attention_kernel(_cfg("model.attention_kernel=flash", "train.precision=bf16"), H100) == "flash"
    assert check_attention_kernel(_cfg(), Accelerator("cpu")) == "cpu_flash"


def test_train_refuses_before_any_process_group(tmp_path, monkeypatch):
    """On this CPU, `cudnn`: refused before the process group, the run directory or the model."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = _cfg("model.attention_kernel=cudnn", f"run.dir={tmp_path / 'run'}")
    with pytest.raises(AttentionKernelUnavailable, match="attention kernel cudnn cannot run on cpu"):
        train(cfg)
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
