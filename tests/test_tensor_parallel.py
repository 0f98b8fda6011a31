"""Tensor parallelism of the DiT (parallel/tensor.py) at tp2 against the single-device model:
adaLN held column-parallel (1/tp of its parameters per rank), forward and gradients equal for
per-sample and per-token timesteps on a token count tp does not divide, and the tp shards
resharded to one device (the contiguous dim-0 slices concatenate back into the full weight,
so the shift/scale/gate chunk order survives) give the same model after an update."""
from __future__ import annotations

import copy

import pytest
import torch
from model_utils import model_inputs, randomized, tp_gathered_grads

from megasora.models.dit import DiT, DiTArch
from megasora.parallel.mesh import ParallelLayout, build_mesh
from megasora.parallel.parallelize import parallelize
from megasora.parallel.tensor import full_state_dict, is_tensor_parallel, tp_partition_dims

from parallel_utils import run_distributed

TP = 2
ARCH = DiTArch(in_channels=3, hidden=32, depth=2, heads=4, text_dim=16, pooled_text=True)
B, FRAMES, SIDE, TEXT = 2, 3, 6, 5  # 3 x 3 x 3 = 27 tokens: padded to 28 for tp2
LR = 0.1


def _model() -> DiT:
    """Every parameter random (adaLN-Zero starts adaLN at 0, which would hide a wrong feature order)."""
    return randomized(DiT(ARCH))


def _inputs(per_token: bool) -> tuple[torch.Tensor, ...]:
    return model_inputs(ARCH.in_channels, ARCH.text_dim, B, FRAMES, SIDE, TEXT, per_token)


def _forward_backward(model: DiT, per_token: bool) -> torch.Tensor:
    latents, t, text, mask, dout = _inputs(per_token)
    model.zero_grad()
    out = model(latents, t, text, mask, torch.tensor([True, False]))  # sample 0's caption dropped
    (out * dout).sum().backward()
    return out.detach()


def _full_grads(model: DiT, mesh) -> dict[str, torch.Tensor]:
    """Gradients unsharded like the parameters (replicated ones are already summed over tp by the hooks)."""
    return tp_gathered_grads(model, mesh.group("tp"), tp_partition_dims(model), TP)


def _shard(full: dict[str, torch.Tensor], model: DiT, rank: int) -> dict[str, torch.Tensor]:
    """A tp1 state's tp-rank part, cut as loading a universal checkpoint cuts it: equal slices along the split dim."""
    split = tp_partition_dims(model)
    return {name: t.chunk(TP, dim=split[name])[rank] if name in split else t for name, t in full.items()}


def _relative_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest entry (fp32 sums in another order)."""
    return float((value - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def _sgd(model: DiT) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param -= LR * param.grad


def _tp_worker(rank: int, world: int) -> dict:
    single = _model()
    mesh = build_mesh(ParallelLayout(tp=TP))
    model = parallelize(copy.deepcopy(single), mesh)
    held = {name: p.numel() for name, p in model.named_parameters() if ".adaln." in name}
    tp_marked = {name for name, p in model.named_parameters() if ".adaln." in name and is_tensor_parallel(p)}
    result: dict = {"adaln_numel": held, "adaln_full": {n: p.numel() for n, p in single.named_parameters()
                                                        if ".adaln." in n}, "tp_marked": tp_marked}
    for per_token in (False, True):
        ref = _forward_backward(single, per_token)
        out = _forward_backward(model, per_token)
        grads = _full_grads(model, mesh)
        result[per_token] = {"out": (out, ref), "grads": (grads, {n: p.grad for n, p in single.named_parameters()})}
    # One update on each side, then tp2 -> tp1 (gather the shards) and tp1 -> tp2 (shard the full state).
    _sgd(single)
    _sgd(model)
    full = full_state_dict(model, mesh)
    resharded = DiT(ARCH)
    resharded.load_state_dict(full)
    local = _shard(full, model, mesh.rank_in("tp"))
    result["reshard"] = {"full": (full, single.state_dict()),
                         "local": (local, {n: p.detach() for n, p in model.named_parameters()}),
                         "out": (_forward_backward(resharded, True), _forward_backward(single, True),
                                 _forward_backward(model, True))}
    return result


@pytest.fixture(scope="module")
def tp_runs() -> list[dict]:
    return run_distributed(_tp_worker, TP)


def test_adaln_is_column_parallel_one_tp_th_per_rank(tp_runs):
    for run in tp_runs:
        assert run["adaln_numel"].keys() == run["adaln_full"].keys()
        assert {n for n in run["adaln_full"] if n.startswith("final.")}, "the final layer's adaLN is counted"
        assert run["tp_marked"] == set(run["adaln_full"])
        for name, numel in run["adaln_numel"].items():
            assert numel * TP == run["adaln_full"][name], name


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample_t", "per_token_t"])
def test_tp_forward_and_gradients_equal_single_device(tp_runs, per_token):
    for run in tp_runs:
        out, ref = run[per_token]["out"]
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
        grads, ref_grads = run[per_token]["grads"]
        assert grads.keys() == ref_grads.keys()
        for name, ref_grad in ref_grads.items():
            err = _relative_error(grads[name], ref_grad)
            assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_tp2_shards_reshard_to_one_device_and_back(tp_runs):
    for run in tp_runs:
        full, ref = run["reshard"]["full"]
        assert full.keys() == ref.keys()
        for name, tensor in ref.items():
            assert _relative_error(full[name], tensor) <= 1e-5, name
        local, held = run["reshard"]["local"]
        for name, tensor in held.items():
            assert torch.equal(local[name], tensor), name
        resharded, single, sharded = run["reshard"]["out"]
        assert torch.allclose(resharded, single, atol=1e-5, rtol=1e-5)
        assert torch.allclose(sharded, single, atol=1e-5, rtol=1e-5)
