"""Device discipline: no host tensor reaches a collective (NCCL would refuse it; gloo does not).

The check lives at the comm seam (megasora/parallel/device_check.py, called by the wrappers of
parallel/comm_counter.py). On CPU it tags host-made tensors in place of an accelerator, so
these gloo runs fail where a GPU run would: shown on the seam call by call, then through the
real trainer, which passes for every layout and fails on a planted host tensor."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megasora.parallel.device_check import ENV_VAR, CollectiveDeviceError, checking

from parallel_utils import run_distributed, run_launched

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _outcome(call) -> str:
    try:
        call()
    except CollectiveDeviceError as e:
        return "refused: " + str(e).split(":")[0]
    return "ok"


def _seam_worker(rank: int, world: int) -> dict[str, str]:
    from megasora.parallel.comm_counter import install
    install()
    peer = 1 - rank
    out = {"unchecked host": _outcome(lambda: dist.all_reduce(torch.tensor([1.0])))}
    with checking(CPU):
        device = torch.ones(3, device=CPU)
        out["device"] = _outcome(lambda: dist.all_reduce(device.clone()))
        out["factory without device"] = _outcome(lambda: dist.all_reduce(torch.tensor([1.0])))
        out["computed from .cpu()"] = _outcome(lambda: dist.all_reduce(device.cpu() * 2))
        out["host scalar absorbed"] = _outcome(lambda: dist.all_reduce(device * torch.tensor(2.0)))
        out["moved with .to(device)"] = _outcome(lambda: dist.all_reduce(torch.zeros(2).to(CPU)))
        out["in-place keeps device"] = _outcome(lambda: dist.all_reduce(device.clone().add_(torch.ones(3))))
        out["all_gather list"] = _outcome(lambda: dist.all_gather([torch.zeros(3), device.clone()], device))
        out["batch_isend_irecv"] = _outcome(lambda: [w.wait() for w in dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, torch.ones(2), peer), dist.P2POp(dist.irecv, torch.empty(2, device=CPU), peer)])])
        out["broadcast device"] = _outcome(lambda: dist.broadcast(torch.zeros((), device=CPU), 0))
    with checking(torch.device("meta")):  # an accelerator run: any CPU tensor is refused by its type
        out["cpu on accelerator run"] = _outcome(lambda: dist.all_reduce(torch.ones(2, device=CPU)))
    return out


def test_seam_refuses_host_tensors_before_sending():
    for result in run_distributed(_seam_worker, 2):
        assert result == {
            "unchecked host": "ok", "device": "ok",
            "factory without device": "refused: all_reduce",
            "computed from .cpu()": "refused: all_reduce",
            "host scalar absorbed": "ok", "moved with .to(device)": "ok", "in-place keeps device": "ok",
            "all_gather list": "refused: all_gather",
            "batch_isend_irecv": "refused: batch_isend_irecv",
            "broadcast device": "ok",
            "cpu on accelerator run": "refused: all_reduce",
        }


# ------------------------------------------------------------------ through the real trainer

BASE = ["model.hidden=32", "model.heads=4", "model.depth=2", "model.mlp_ratio=2.0",
        "data.frames=2", "data.height=8", "data.width=8", "data.num_samples=16", "text.max_length=8",
        "train.steps=2", "train.warmup_steps=0", "train.ema_decay=0.9", "train.micro_batch_size=2",
        "train.grad_accum=2", "train.zero_stage=2", "train.save_every=1"]
LAYOUTS = {  # world size 2; the EMA is on and every step saves, so the checkpoint path runs too
    "dp2": [],
    "tp2": ["parallel.tp=2"],
    "ulysses2": ["parallel.ulysses=2"],
    "ring2": ["parallel.ring=2"],
    "pp2": ["parallel.pp=2"],
    "dp2_zero3": ["train.zero_stage=3"],
}


def _host_flag_should_stop(self, step: int) -> bool:
    """The stop check as it was: a host flag all-reduced on the default (NCCL on GPU) group."""
    flag = torch.tensor([1.0 if self.preemption.requested else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def _host_losses(forward_backward):
    """forward_backward as the step used to keep its losses: moved to the host per micro-batch."""
    from megasora.train.loop import Measured

    def planted(self, micro_batches, step):
        measured = forward_backward(self, micro_batches, step)
        return Measured({k: v.detach().double().cpu() for k, v in measured.values.items()}, measured.local)
    return planted


def _train(name: str, overrides: list[str], root: str, checked: bool) -> str:
    from megasora.config import load_config
    from megasora.parallel.device_check import CHECK
    from megasora.train.trainer import train
    cfg = load_config(REPO / "configs" / "tiny.yaml", BASE + overrides + [f"run.dir={root}/{name}"])
    os.environ[ENV_VAR] = "1" if checked else "0"
    try:
        result = train(cfg)
    except CollectiveDeviceError as e:
        return "refused: " + str(e).split(":")[0]
    finally:
        os.environ.pop(ENV_VAR)
    assert sorted(result.losses) == [1, 2]
    return "ok " + ",".join(sorted(CHECK.verified)) if checked else "ok unchecked"


def _trainer_worker(rank: int, world: int, root: str) -> dict[str, str]:
    from megasora.train import loop
    out = {name: _train(name, overrides, root, checked=True) for name, overrides in LAYOUTS.items()}
    real_should_stop, real_forward_backward = loop.TrainingLoop._should_stop, loop.TrainingLoop.forward_backward
    loop.TrainingLoop._should_stop = _host_flag_should_stop
    out["host stop flag, unchecked"] = _train("flag_unchecked", [], root, checked=False)
    out["host stop flag"] = _train("flag", [], root, checked=True)
    loop.TrainingLoop._should_stop = real_should_stop
    loop.TrainingLoop.forward_backward = _host_losses(real_forward_backward)
    out["host losses"] = _train("losses", [], root, checked=True)
    loop.TrainingLoop.forward_backward = real_forward_backward
    return out


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> list[dict[str, str]]:
    return run_launched(_trainer_worker, 2, str(tmp_path_factory.mktemp("device")))


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_real_training_hands_collectives_only_device_tensors(trainer_runs, layout):
    for result in trainer_runs:
        verified = result[layout]
        assert verified.startswith("ok "), verified
        ops = set(verified[3:].split(","))
        assert "all_reduce" in ops  # the check saw the step's collectives, it did not pass vacuously
        if layout == "pp2":
            assert "broadcast" in ops and ops & {"isend", "irecv", "recv", "batch_isend_irecv"}


@pytest.mark.slow
def test_planted_host_tensors_are_refused_where_gloo_accepts_them(trainer_runs):
    for result in trainer_runs:
        assert result["host stop flag, unchecked"] == "ok unchecked"  # gloo alone lets it through
        assert result["host stop flag"] == "refused: all_reduce"
        assert result["host losses"] == "refused: all_reduce"
