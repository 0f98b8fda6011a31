"""Wan family through the parallel stack (parallel/tensor.py, parallelize.py, pipeline.py) against one process:
the tp qk-norm alone; forward and every gradient of a tiny WanModel (every parameter random) at tp2,
ulysses2, ring2, pp2, tp2 x ulysses2 and with full / selective activation checkpointing; and resume
resharded tp1 <-> tp2 through the real trainer.

The qk-norm first: Wan normalises q and k over all heads together (a (D,) weight before the
head split), so under tp, where a rank holds D/tp columns, the mean square is all-reduced
over tp. Compared with torch.nn.RMSNorm (diffusers' WanAttention's norm) on the whole width.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from model_utils import model_inputs, randomized
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megasora.models.convert import from_diffusers, megasora_to_wan
from megasora.models.flops import attended_text_tokens, dit_forward_flops, dit_train_flops
from megasora.models.wan import WanArch, WanModel
from megasora.parallel.activation_checkpointing import apply_activation_checkpointing, checkpointing_summary
from megasora.parallel.mesh import Mesh, ParallelLayout, build_mesh
from megasora.parallel.parallelize import parallelize
from megasora.parallel.pipeline import build_stage, gather_stages
from megasora.parallel.tensor import TensorParallelRMSNorm, is_tensor_parallel, tp_partition_dims
from megasora.plan.communication import stage_params as plan_stage_params
from megasora.plan.memory import total_params
from megasora.plan.workload import Workload
from megasora.train.checkpoint import read_model_weights

from launch_utils import read_losses
from parallel_utils import run_distributed, train_runs

TP = 2


def _norm_inputs() -> tuple[nn.RMSNorm, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    norm = nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(24, generator=g))
    # columns scaled unequally, so one rank's mean square alone is far from the whole width's
    x = torch.randn(2, 5, 24, generator=g) * torch.linspace(0.2, 3.0, 24)
    return norm, x, torch.randn(2, 5, 24, generator=g)


def _qk_norm_worker(rank: int, world: int) -> dict:
    norm, x, dout = _norm_inputs()
    x.requires_grad_(True)
    (norm(x) * dout).sum().backward()
    cols = slice(rank * 24 // world, (rank + 1) * 24 // world)
    sharded = TensorParallelRMSNorm(norm, rank, world, dist.group.WORLD)
    local = x.detach()[..., cols].clone().requires_grad_(True)
    out = sharded(local)
    (out * dout[..., cols]).sum().backward()  # this rank's part of the loss: the sum over ranks is the whole
    return {"out": (out.detach(), norm(x).detach()[..., cols]), "x_grad": (local.grad, x.grad[..., cols]),
            "w_grad": (sharded.weight.grad, norm.weight.grad[cols]), "marked": is_tensor_parallel(sharded.weight)}


def test_tp_qk_norm_equals_whole_width_rms_norm():
    for run in run_distributed(_qk_norm_worker, TP):
        assert run["marked"], "the weight slice is tp-split (its gradient is complete: no tp sum hook)"
        for key in ("out", "x_grad", "w_grad"):
            value, ref = run[key]
            assert torch.allclose(value, ref, atol=1e-5, rtol=1e-5), (key, (value - ref).abs().max())


# ---------------------------------------------------------------- the Wan model at each layout

ARCH = WanArch(in_channels=3, hidden=32, depth=2, heads=4, text_dim=16, mlp_ratio=1.5, ffn_dim=48, text_len=8,
               freq_dim=16)
B, FRAMES, SIDE, TEXT = 2, 3, 6, 5  # 3 x 3 x 3 = 27 tokens: every sequence-sharded layout pads

# name -> (world, ParallelLayout degrees, activation checkpointing)
LAYOUTS: dict[str, tuple[int, dict[str, int], str]] = {
    "tp2": (2, {"tp": 2}, "none"),
    "ulysses2": (2, {"ulysses": 2}, "none"),
    "ring2": (2, {"ring": 2}, "none"),
    "pp2": (2, {"pp": 2}, "none"),
    "tp2_full_ac": (2, {"tp": 2}, "full"),
    "ring2_selective_ac": (2, {"ring": 2}, "selective"),
    "tp2xulysses2": (4, {"tp": 2, "ulysses": 2}, "none"),
}


def _wan() -> WanModel:
    """Every parameter random: tables, qk-norms and the zero-initialised output linear all matter."""
    return randomized(WanModel(ARCH), scale=0.2, norm_width=ARCH.hidden)


def _wan_inputs() -> tuple[torch.Tensor, ...]:
    return model_inputs(ARCH.in_channels, ARCH.text_dim, B, FRAMES, SIDE, TEXT)


DROP = torch.tensor([True, False])  # sample 0's caption dropped


def _single() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = _wan()
    latents, t, text, mask, dout = _wan_inputs()
    out = model(latents, t, text, mask, DROP)
    (out * dout).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


def _whole_grads(model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """Gradients as one process has them: summed over sp (DeepSpeed's job in training: each sp rank
    back-propagates its tokens), tp shards concatenated along their split dim (tp's own sums ran
    in the hooks), pipeline stages' unioned."""
    split, out = tp_partition_dims(model), {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        if mesh.size("sp") > 1:
            dist.all_reduce(grad, group=mesh.group("sp"))
        if name in split and mesh.size("tp") > 1:
            parts = [torch.empty_like(grad) for _ in range(mesh.size("tp"))]
            dist.all_gather(parts, grad.contiguous(), group=mesh.group("tp"))
            grad = torch.cat(parts, dim=split[name])
        out[name] = grad
    return gather_stages(out, mesh) if mesh.size("pp") > 1 else out


def _pipeline_forward_backward(stage: nn.Module, mesh: Mesh) -> torch.Tensor | None:
    """One micro-batch through two stages: the message forward, its gradient back (rendezvous p2p)."""
    latents, t, text, mask, dout = _wan_inputs()
    peer = mesh.ranks["pp"][1 - mesh.rank_in("pp")]
    if mesh.rank_in("pp") == 0:
        message = stage(latents, t, text, mask, DROP)
        dist.send(message.detach().contiguous(), peer)
        grad = torch.empty_like(message)
        dist.recv(grad, peer)
        message.backward(grad)
        return None
    received = torch.empty(stage.message_shape(latents, t, text))
    dist.recv(received, peer)
    received.requires_grad_(True)
    out = stage(latents, t, text, mask, DROP, received=received)
    (out * dout).sum().backward()
    dist.send(received.grad.contiguous(), peer)
    return out.detach()


def _layout_worker(rank: int, world: int, names: list[str]) -> dict:
    ref_out, ref_grads = _single()
    results = {}
    for name in names:
        _, degrees, ac = LAYOUTS[name]
        mesh = build_mesh(ParallelLayout(**degrees, dp=world // math.prod(degrees.values())))
        model = parallelize(_wan(), mesh)
        apply_activation_checkpointing(model, ac)
        if mesh.size("pp") > 1:
            stage = build_stage(model, mesh.rank_in("pp"), mesh.size("pp"))
            out = _pipeline_forward_backward(stage, mesh)
            model = stage
        else:
            latents, t, text, mask, dout = _wan_inputs()
            out = model(latents, t, text, mask, DROP)
            (out * dout).sum().backward()
            out = out.detach()
        results[name] = {"out": out, "grads": _whole_grads(model, mesh), "ac": checkpointing_summary(model),
                         "numel": sum(p.numel() for p in model.parameters()), "pp_rank": mesh.rank_in("pp")}
        dist.barrier()
    return {"ref": (ref_out, ref_grads), **results}


@pytest.fixture(scope="module")
def layout_runs() -> dict[str, dict]:
    runs: dict[str, dict] = {}
    for world in (2, 4):
        names = [name for name, (w, _, _) in LAYOUTS.items() if w == world]
        for result in run_distributed(_layout_worker, world, names):
            for name in names:
                runs.setdefault(name, {"ref": result["ref"], "ranks": []})["ranks"].append(result[name])
    return runs


def _relative_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest entry. fp32 sums in another order
    (ring's online softmax merge, tp's partial sums) stay within TOL; a wrong reduction is O(1)."""
    return float((value - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


TOL = 5e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_wan_forward_and_every_gradient_equal_one_process(layout_runs, layout):
    run = layout_runs[layout]
    ref_out, ref_grads = run["ref"]
    assert {n for n in ref_grads if "scale_shift_table" in n} and {n for n in ref_grads if "q_norm" in n}
    assert "t_embed.modulation.1.weight" in ref_grads  # the shared time projection
    for result in run["ranks"]:
        if result["out"] is not None:  # a pipeline's first stage returns no output
            err = _relative_error(result["out"], ref_out)
            assert err <= TOL, f"{layout}: output relative error {err:.2e}"
        assert result["grads"].keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            err = _relative_error(result["grads"][name], ref)
            assert err <= TOL, f"{layout}: {name} gradient relative error {err:.2e}"
        ac = LAYOUTS[layout][2]
        if ac != "none":
            assert result["ac"][ac] == ARCH.depth


# ---------------------------------------------------------------- resume and reshard through the trainer

WAN_RUN = ["model.family=wan", "model.hidden=32", "model.heads=4", "model.ffn_dim=48", "model.text_len=32",
           "model.freq_dim=16", "data.frames=3", "data.height=6", "data.width=6", "data.num_samples=16",
           "train.steps=4", "train.save_every=2", "train.warmup_steps=0", "train.lr=1e-2", "train.ema_decay=0",
           "train.zero_stage=2", "train.micro_batch_size=2"]
AT_TP1 = ["parallel.tp=1", "train.grad_accum=1"]  # dp2: global batch 4
AT_TP2 = ["parallel.tp=2", "train.grad_accum=2"]  # dp1, two micro-batches: the same global batch


@pytest.fixture(scope="module")
def wan_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan_runs")
    at_step_2 = "checkpoints/step_00000002"
    train_runs(2, [(str(root / "tp1"), [*WAN_RUN, *AT_TP1], None),
                   (str(root / "tp2"), [*WAN_RUN, *AT_TP2], None),
                   (str(root / "tp1_to_tp2"), [*WAN_RUN, *AT_TP2], str(root / "tp1" / at_step_2)),
                   (str(root / "tp2_to_tp1"), [*WAN_RUN, *AT_TP1], str(root / "tp2" / at_step_2))])
    return root


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    weights, _, _ = read_model_weights(run / "checkpoints", "step_00000004", ema=False)
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("resumed, uninterrupted", [("tp1_to_tp2", "tp1"), ("tp2_to_tp1", "tp2"), ("tp2", "tp1")],
                         ids=["tp1->tp2", "tp2->tp1", "tp2_vs_tp1"])
def test_wan_resume_resharded_equals_uninterrupted(wan_runs, resumed, uninterrupted):
    """A checkpoint saved at one tp degree, resumed at the other, continues the uninterrupted run: losses of the
    steps after the save and every final weight (qk-norm slices, tables, time projection included)."""
    ref, got = read_losses(wan_runs / uninterrupted), read_losses(wan_runs / resumed)
    assert sorted(got) == ([3, 4] if "_to_" in resumed else [1, 2, 3, 4])
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-5), f"step {step}"
    want, have = _final_weights(wan_runs / uninterrupted), _final_weights(wan_runs / resumed)
    start = read_model_weights(wan_runs / "tp1" / "checkpoints", "step_00000002", ema=False)[0]
    assert have.keys() == want.keys() and any("q_norm" in name for name in want)
    assert max((want[k] - start[k]).abs().max().item() for k in want) > 1e-3, "training moved the weights"
    for name, tensor in want.items():  # Adam turns rounding-level gradient differences into ~lr-sized steps
        err = (have[name] - tensor).abs().max().item()
        assert err <= 1e-4, f"{name} differs by {err:.2e}"


# ---------------------------------------------------------------- the planner's Wan terms


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2xulysses2"])
def test_planner_parameters_per_rank_equal_the_parallel_model(layout_runs, layout):
    degrees = LAYOUTS[layout][1]
    planned = ParallelLayout(**degrees, dp=LAYOUTS[layout][0] // math.prod(degrees.values()))
    for result in layout_runs[layout]["ranks"]:
        counts = plan_stage_params(ARCH, planned, result["pp_rank"])
        assert counts["matrix"] + counts["vector"] == result["numel"], layout


@pytest.mark.parametrize("name, hidden, heads, ffn, depth, published", [
    ("1.3B", 1536, 12, 8960, 30, 1_418_996_800), ("14B", 5120, 40, 13824, 40, 14_288_491_584)])
def test_planner_parameters_equal_wan_and_diffusers(name, hidden, heads, ffn, depth, published):
    """Wan 2.1 T2V's published sizes (diffusers' WanTransformer3DModel with the released configs) = the
    planner's count = MegaSora's model, all built on the meta device."""
    from diffusers import WanTransformer3DModel
    arch = WanArch(in_channels=16, hidden=hidden, depth=depth, heads=heads, text_dim=4096, mlp_ratio=ffn / hidden,
                   ffn_dim=ffn)
    work = Workload(arch=arch, tokens=1, text_tokens=arch.text_len, bf16=True, ema=False, samples_per_rank=1)
    with torch.device("meta"):
        ours = sum(p.numel() for p in WanModel(arch).parameters())
        theirs = sum(p.numel() for p in WanTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=hidden // heads, ffn_dim=ffn, num_layers=depth,
            text_dim=4096).parameters())
    assert total_params(work) == ours == theirs == published


def test_wan_flops_match_flop_counter():
    """Forward and forward + backward FLOPs of the tiny Wan model against torch's counter (2%: the
    counter also sees the input gradients nobody needs and the table / norm arithmetic it skips)."""
    model = _wan()
    latents, t, text, mask, _ = _wan_inputs()
    tokens = FRAMES * (SIDE // 2) ** 2
    for backward, flops in ((False, dit_forward_flops), (True, dit_train_flops)):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = model(latents, t, text, mask)
            if backward:
                out.square().mean().backward()
        expected = B * flops(ARCH, tokens, attended_text_tokens(ARCH, TEXT))
        assert counter.get_total_flops() == pytest.approx(expected, rel=0.02), backward


# ---------------------------------------------------------------- the padded text context at the caption's cost


def test_merged_text_padding_gives_diffusers_gradients(tmp_path):
    """WanCrossAttention computes the zero-padded text_len context as one token weighted by the padding's
    count: output and every parameter gradient equal diffusers' (which attends to all 512 tokens)."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    theirs = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                   out_channels=4, text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2,
                                   rope_max_seq_len=64)
    with torch.no_grad():
        for param in theirs.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    theirs.save_pretrained(tmp_path)
    ours = from_diffusers(tmp_path)
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 4, 3, 6, 6, generator=g), torch.randn(2, 7, 24, generator=g)
    mask = torch.arange(7)[None] < torch.tensor([[3], [7]])
    dout = torch.randn(2, 4, 3, 6, 6, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    padded = nn.functional.pad(text * mask[..., None], (0, 0, 0, 512 - 7))
    want = theirs(latents, sigma * 1000, padded, return_dict=False)[0]
    (want * dout).sum().backward()
    got = ours(latents, sigma, text, mask)
    (got * dout).sum().backward()
    assert _relative_error(got.detach(), want.detach()) <= 1e-5
    grads = megasora_to_wan({name: p.grad for name, p in ours.named_parameters()}, ours.arch)
    ref = {name: p.grad for name, p in theirs.named_parameters()}
    assert grads.keys() == ref.keys()
    for name, grad in ref.items():
        assert _relative_error(grads[name], grad) <= 1e-4, name
