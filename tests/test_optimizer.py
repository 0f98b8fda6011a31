"""train.optimizer / train.offload_optimizer: DeepSpeed's CPUAdam under ZeRO-Offload is the same
AdamW as torch's, and options this machine cannot run fail before any process group."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megasora.config import ConfigError, load_config
from megasora.train.engine import apex_fused_adam, check_optimizer

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# fp32, no warmup and a large LR so 5 steps move the weights enough for a wrong update to show.
COMMON = ["train.steps=5", "train.zero_stage=2", "train.precision=fp32", "train.warmup_steps=0",
          "train.lr=1e-2", "train.weight_decay=0.01", "train.ema_decay=0", "data.num_samples=8"]
OFFLOAD = ["train.optimizer=cpu_adam", "train.offload_optimizer=cpu"]


@pytest.mark.parametrize("overrides,message", [
    (["train.optimizer=lion"], "train.optimizer='lion' must be adamw, fused_adam, apex_adam or cpu_adam"),
    (["train.optimizer=cpu_adam"], "set train.offload_optimizer=cpu"),
    (["train.offload_optimizer=cpu"], "set train.optimizer=cpu_adam"),
    (["train.offload_optimizer=nvme"], "must be none or cpu"),
    ([*OFFLOAD, "train.zero_stage=0"], "set train.zero_stage=2"),
])
def test_contradictory_choices_fail_validation(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("name", ["fused_adam", "apex_adam"])
def test_cuda_optimizers_are_refused_without_cuda(name: str) -> None:
    with pytest.raises(ConfigError, match=f"train.optimizer={name} is a CUDA kernel but no CUDA device"):
        check_optimizer(load_config(TINY, [f"train.optimizer={name}"]))


def test_apex_is_never_the_pypi_package() -> None:
    """apex_adam is offered only when NVIDIA apex's FusedAdam imports; here it does not."""
    cls = apex_fused_adam()
    assert cls is None or cls.__module__.startswith("apex.optimizers")


def test_cpu_adam_op_builds_here() -> None:
    """DeepSpeed's CPUAdam JIT-builds on this machine (cached in TORCH_EXTENSIONS_DIR)."""
    check_optimizer(load_config(TINY, OFFLOAD))


def _train_three_ways(rank: int, world: int, root: str) -> dict[str, dict[int, float]]:
    from megasora.train.trainer import train

    def run(name: str, overrides: list[str], resume: str | None = None) -> dict[int, float]:
        cfg = load_config(TINY, [*COMMON, *overrides, f"run.dir={root}/{name}"])
        return train(cfg, resume=resume).losses

    adamw = run("adamw", [])
    offload = run("offload", [*OFFLOAD, "train.save_every=3"])
    resumed = run("resumed", OFFLOAD, resume=f"{root}/offload/checkpoints/step_00000003")
    return {"adamw": adamw, "offload": offload, "resumed": resumed}


@pytest.mark.slow
def test_cpu_adam_offload_matches_adamw_and_resumes_exactly(tmp_path: Path) -> None:
    """2 ranks, ZeRO-2: CPUAdam + ZeRO-Offload losses == torch AdamW within 1e-5 for 5 fp32 steps;
    resuming the offloaded run from its step-3 checkpoint reproduces steps 4 and 5 exactly."""
    runs = run_launched(_train_three_ways, 2, str(tmp_path))[0]
    adamw, offload, resumed = runs["adamw"], runs["offload"], runs["resumed"]
    assert sorted(adamw) == sorted(offload) == [1, 2, 3, 4, 5]
    print("max |loss(adamw) - loss(cpu_adam + offload)| over 5 steps:",
          max(abs(adamw[s] - offload[s]) for s in adamw))
    for step in adamw:
        assert abs(adamw[step] - offload[step]) <= 1e-5, (step, adamw[step], offload[step])
    assert adamw[5] != adamw[1]  # the optimizer really moved the weights
    assert sorted(resumed) == [4, 5]
    for step in resumed:
        assert resumed[step] == offload[step], (step, offload[step], resumed[step])


def test_deepspeed_config_offloads_only_when_asked() -> None:
    from megasora.train.engine import deepspeed_config
    cfg = load_config(TINY, OFFLOAD)
    assert deepspeed_config(cfg, 2)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="adamw",
                                                               offload_optimizer="none"))
    assert "offload_optimizer" not in deepspeed_config(plain, 2)["zero_optimization"]
