"""The planner's gradient-reduction terms (plan/memory.py), issue 21 item 6: overlap_comm's second
ZeRO-1/2 reduce bucket, and the fp32 copy DeepSpeed makes of the bucket it reduces when a bf16
model reduces in fp32 (train.grad_reduce_dtype, the default).

Measured: the real DeepSpeed engine (train/engine.py's config, bf16, ZeRO-2, dp2 on gloo) on a
plain stack of linears under the live-tensor probe; the peak of the step differs between fp32
and bf16 reduction by the copy's bytes, as reduce_transient_bytes predicts.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megasora.config import load_config
from megasora.plan.memory import REDUCE_BUCKET_ELEMENTS, memory_breakdown, model_state, reduce_transient_bytes
from megasora.plan.workload import Layout, workload_from_config

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]
WIDTH, DEPTH = 256, 4


def _work(*overrides: str):
    return workload_from_config(load_config(REPO / "configs" / "tiny.yaml", list(overrides)))[0]


def test_second_bucket_and_reduction_copy_by_hand():
    psi = 10 ** 9
    bf16 = _work("train.precision=bf16")
    assert model_state(bf16, Layout(dp=4, zero_stage=2), psi)["zero_buffers"] == 2 * REDUCE_BUCKET_ELEMENTS
    assert model_state(bf16, Layout(dp=4, zero_stage=2), psi, overlap_comm=True)["zero_buffers"] == \
        2 * 2 * REDUCE_BUCKET_ELEMENTS  # two bf16 buckets: one filled while the other is reduced
    assert reduce_transient_bytes(bf16, psi) == 4 * REDUCE_BUCKET_ELEMENTS  # one bucket copied to fp32
    assert reduce_transient_bytes(bf16, 1000) == 4 * 1000                 # a model smaller than a bucket
    assert reduce_transient_bytes(_work("train.precision=bf16", "train.grad_reduce_dtype=bf16"), psi) == 0
    assert reduce_transient_bytes(_work(), psi) == 0                        # fp32 model: reduced in place
    layout = Layout(dp=4, zero_stage=2)
    gpu, cpu = memory_breakdown(bf16, layout), memory_breakdown(bf16, layout, allowance=False)
    copy = reduce_transient_bytes(bf16, int(gpu.weights / 2))
    # overlap_comm (a GPU run): the copy is made during backward, on top of its working set
    assert gpu.transient - cpu.transient == copy and gpu.reduce_transient == 0
    # without it (CPU), after backward: its own peak, model state + the copy
    assert cpu.reduce_transient == copy and cpu.reduce_peak_bytes == pytest.approx(
        cpu.weights + cpu.grads + cpu.optimizer + cpu.ema + cpu.zero_buffers + copy)


def _step_peaks(rank: int, world: int) -> dict[str, tuple[int, int]]:
    return {dtype: _step_peak(world, dtype) for dtype in ("fp32", "bf16")}


def _step_peak(world: int, reduce_dtype: str) -> tuple[int, int]:
    import deepspeed

    from megasora.train.memory_probe import LiveTensorBytes
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(DEPTH)])
    params = sum(p.numel() for p in model.parameters())
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "train_batch_size": world, "zero_optimization": {"stage": 2, "overlap_comm": False},
              "bf16": {"enabled": True}, "communication_data_type": reduce_dtype,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    x = torch.randn(8, WIDTH, dtype=torch.bfloat16)
    for _ in range(2):  # the second step: optimizer state and buckets exist
        probe = LiveTensorBytes()
        with probe:
            engine.backward(engine(x).float().square().mean())
            engine.step()
    return probe.peak_bytes, params


def test_fp32_reduction_copy_is_measured():
    bf16 = _work("train.precision=bf16")
    peaks = run_launched(_step_peaks, 2)[0]
    (fp32_peak, params), (bf16_peak, _) = peaks["fp32"], peaks["bf16"]
    predicted = reduce_transient_bytes(bf16, params)
    assert predicted == 4 * params
    assert fp32_peak - bf16_peak == pytest.approx(predicted, rel=0.10), (fp32_peak, bf16_peak, predicted)
