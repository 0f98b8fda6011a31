"""Pipeline parallelism: stage splitting, the 1F1B order, config errors, and parallel == single.

Golden runs: 5 optimizer steps through the real trainer (per-stage DeepSpeed engines, ZeRO-2,
gradient clipping over tp x pp) for pp2, pp2 x tp2, pp2 x ring2, pp2 x ulysses2 and pp2 x dp2, compared with
one process on the same global batch split into the same 4 micro-batches. 27 tokens per
sample and per-token timesteps (conditioning frames on), so the sequence-sharded layouts pad
and the per-token timestep embedding travels between stages. One spawn per world size:
process start-up dominates on 2 cores.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megasora.config import ConfigError, load_config
from megasora.models import build_dit
from megasora.models.dit import DiT
from megasora.parallel.pipeline import DiTStage, balanced_boundaries, build_stage
from megasora.parallel.pipeline_schedule import one_f_one_b
from megasora.train.checkpoint import read_ema

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
BASE = ["model.hidden=32", "model.heads=4", "model.depth=4", "model.mlp_ratio=2.0",
        "data.frames=3", "data.height=6", "data.width=6", "data.num_samples=16",
        f"train.steps={STEPS}", "train.warmup_steps=0", "train.lr=1e-2", "train.ema_decay=0",
        "train.zero_stage=2", "train.grad_clip=1.0", "diffusion.cond_frames_prob=1.0",
        "train.micro_batch_size=1"]
MICRO_BATCHES = 4  # global batch 4 = 4 micro-batches of 1 sample (dp2: 2 per dp rank)

LAYOUTS = {  # name -> (world, overrides)
    "pp2": (2, ["parallel.pp=2", f"train.grad_accum={MICRO_BATCHES}"]),
    "pp2xtp2": (4, ["parallel.pp=2", "parallel.tp=2", f"train.grad_accum={MICRO_BATCHES}"]),
    "pp2xring2": (4, ["parallel.pp=2", "parallel.ring=2", f"train.grad_accum={MICRO_BATCHES}"]),
    "pp2xulysses2": (4, ["parallel.pp=2", "parallel.ulysses=2", f"train.grad_accum={MICRO_BATCHES}"]),
    "pp2xdp2": (4, ["parallel.pp=2", f"train.grad_accum={MICRO_BATCHES // 2}"]),
}


# ---------------------------------------------------------------- stage split and schedule


@pytest.mark.parametrize("costs,stages,expected", [
    ([1, 1, 1, 1], 2, [2]),
    ([1, 1, 1, 1, 1], 2, [2]),          # the extra block goes to the later stage
    ([1, 1, 1, 1, 1], 5, [1, 2, 3, 4]),
    ([5, 1, 1, 1, 1, 1], 2, [1]),       # bottleneck 5 either way; later stage takes the rest
    ([1, 1, 1, 1, 1, 1, 1, 5], 3, [2, 7]),  # loads 2, 5, 5
    ([2, 2, 2, 2, 2, 2, 2], 3, [1, 4]),
])
def test_balanced_boundaries(costs, stages, expected):
    assert balanced_boundaries(costs, stages) == expected
    runs = [sum(costs[a:b]) for a, b in zip([0] + expected, expected + [len(costs)])]
    assert max(runs) == min(max(sum(costs[a:b]) for a, b in zip([0] + list(c), list(c) + [len(costs)]))
                            for c in _all_splits(len(costs), stages))


def _all_splits(n: int, stages: int):
    import itertools
    return itertools.combinations(range(1, n), stages - 1)


def _simulate(stages: int, m: int) -> int:
    """Run every stage's 1F1B order against the data dependencies with unit-time F and B.

    Returns the makespan; raises if the orders deadlock.
    """
    orders = [one_f_one_b(s, stages, m) for s in range(stages)]
    done: dict[tuple[str, int, int], int] = {}  # (kind, stage, i) -> finish time
    clock = [0] * stages
    pos = [0] * stages
    while any(pos[s] < len(orders[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(orders[s]):
                continue
            kind, i = orders[s][pos[s]]
            dep = ("F", s - 1, i) if kind == "F" and s > 0 else ("B", s + 1, i) if kind == "B" and s < stages - 1 \
                else ("F", s, i) if kind == "B" else None
            if dep is not None and dep not in done:
                continue
            clock[s] = max(clock[s], done.get(dep, 0)) + 1
            done[(kind, s, i)] = clock[s]
            pos[s] += 1
            progressed = True
        assert progressed, "1F1B orders deadlock"
    return max(clock)


@pytest.mark.parametrize("stages,m", [(2, 2), (2, 5), (4, 4), (4, 8), (3, 7)])
def test_one_f_one_b_order(stages, m):
    for s in range(stages):
        order = one_f_one_b(s, stages, m)
        assert sorted(order) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        in_flight = 0
        for kind, i in order:
            assert kind == "F" or order.index(("F", i)) < order.index(("B", i))
            in_flight += 1 if kind == "F" else -1
            assert in_flight <= stages - s  # stage s keeps at most p - s activations alive
    # unit-time F and B: the step takes 2 (m + p - 1) slots, i.e. the (p-1)/(m+p-1) bubble
    assert _simulate(stages, m) == 2 * (m + stages - 1)


def _tiny(*overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", ["model.hidden=32", "model.heads=4", "model.depth=5",
                                                      "model.mlp_ratio=2.0", "text.dim=16", *overrides])


def _model_inputs(per_token_t: bool) -> tuple[torch.Tensor, ...]:
    """latents, t, text, text mask, caption dropout (the second sample's caption dropped)."""
    b, n = 2, 2 * 4 * 4
    latents = torch.randn(b, 3, 2, 8, 8)
    t = torch.rand(b, n) if per_token_t else torch.rand(b)
    text, mask = torch.randn(b, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return latents, t, text, mask, torch.tensor([False, True])


@pytest.mark.parametrize("per_token_t", [False, True])
def test_stage_chain_equals_dit(per_token_t):
    """Three stages chained by hand (messages detached, gradients handed back) == the plain DiT."""
    cfg = _tiny()
    torch.manual_seed(0)
    model = build_dit(cfg)
    latents, t, text, mask, drop = _model_inputs(per_token_t)
    target = torch.randn_like(latents)
    ref = model(latents, t, text, mask, drop)
    (ref - target).pow(2).mean().backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    stages = [build_stage(model, s, 3, [1, 3]) for s in range(3)]
    assert [list(st.blocks.keys()) for st in stages] == [["0"], ["1", "2"], ["3", "4"]]
    received, outs, inputs = None, [], []
    for stage in stages:
        out = stage(latents, t, text, mask, drop, received)
        if not stage.is_last:
            assert out.shape == stage.message_shape(latents, t, text)
        inputs.append(received)
        outs.append(out)
        received = out.detach().requires_grad_()
    torch.testing.assert_close(outs[-1], ref, rtol=0, atol=1e-6)
    (outs[-1] - target).pow(2).mean().backward()
    for s in (1, 0):
        outs[s].backward(inputs[s + 1].grad)
    for stage in stages:
        for name, p in stage.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    names = {name for stage in stages for name, _ in stage.named_parameters()}
    assert names == set(ref_grads)  # every parameter lives on exactly one stage, under its own name
    assert sum(len(list(st.parameters())) for st in stages) == len(ref_grads)


@pytest.mark.parametrize("per_token_t,pooled", [(False, False), (True, False), (True, True)])
def test_stages_run_the_models_forward(per_token_t, pooled):
    """A stage has no forward of its own: stages 0..p-1 in sequence, and the whole DiT run one block
    range at a time, give DiT.forward's output bit for bit (caption dropout and per-token t included)."""
    assert DiTStage.forward is DiT.forward
    torch.manual_seed(0)
    model = build_dit(_tiny(f"model.pooled_text={pooled}"))
    with torch.no_grad():  # open the adaLN-Zero gates: every block's text mask and cond reach the output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = _model_inputs(per_token_t)
    ref = model(*inputs)
    received = None
    for stage in [build_stage(model, s, 3, [1, 3]) for s in range(3)]:
        received = stage(*inputs, received)
    assert torch.equal(received, ref)
    received = None
    for first, end in [(0, 2), (2, 3), (3, 5)]:
        received = model(*inputs, received, blocks=range(first, end))
    assert torch.equal(received, ref)
    with pytest.raises(ValueError, match="need `received`"):
        model(*inputs, blocks=range(2, 5))


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.pp=6", "train.grad_accum=8"], "parallel.pp=6 exceeds model.depth=5"),
    (["parallel.pp=4", "train.grad_accum=2"], "train.grad_accum=2 is the number of pipeline micro-batches"),
    (["parallel.pp=2", "train.grad_accum=2", "train.zero_stage=3"], "train.zero_stage=3 with parallel.pp=2"),
    (["parallel.pp=2", "train.grad_accum=2", "train.zero_stage=0"], "train.zero_stage=0 with parallel.pp=2"),
    (["parallel.pp=3", "train.grad_accum=4", "parallel.pp_boundaries=[3,2]"], "parallel.pp_boundaries=[3, 2] must"),
    (["parallel.pp=2", "train.grad_accum=4", "parallel.pp_boundaries=[5]"], "parallel.pp_boundaries=[5] must"),
    (["parallel.pp=3", "train.grad_accum=4", "parallel.pp_boundaries=[2]"], "must be 2 strictly increasing"),
    (["parallel.pp_boundaries=[2]"], "parallel.pp_boundaries=[2] is set but parallel.pp=1"),
])
def test_bad_pipeline_config_rejected_before_any_process_group(overrides, needle):
    with pytest.raises(ConfigError) as err:
        _tiny("train.zero_stage=2", *overrides)
    assert needle in str(err.value)
    assert not dist.is_initialized()


# ---------------------------------------------------------------- parallel == single (spawned)


def _overrides(extra: list[str], run_dir: str) -> list[str]:
    return BASE + extra + [f"run.dir={run_dir}"]


def _full_params(cfg, world: int) -> dict[str, torch.Tensor]:
    """Final weights: each rank loads its own stage's DeepSpeed file; tp and pp are gathered."""
    from megasora.parallel import MeshMPU, init_parallel
    from megasora.parallel.pipeline import gather_stages
    from megasora.parallel.tensor import full_state_dict
    model = build_dit(cfg)
    mesh = init_parallel(model, cfg.parallel, world, cfg.train)
    stage = build_stage(model, mesh.rank_in("pp"), mesh.size("pp")) if mesh.size("pp") > 1 else model
    tag_dir = Path(cfg.run.dir) / "checkpoints" / (Path(cfg.run.dir) / "checkpoints" / "latest").read_text().strip()
    mp_rank = MeshMPU(mesh).get_model_parallel_rank()
    stage.load_state_dict(torch.load(tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt", weights_only=False)["module"])
    return gather_stages(full_state_dict(stage, mesh), mesh)


def _grad_norms(run_dir: str) -> dict[int, float]:
    import json
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["grad_norm"] for row in map(json.loads, lines)}


def _saved_ema(run_dir: str) -> dict[str, torch.Tensor] | None:
    """The whole EMA of the latest checkpoint, assembled from every stage's slice file (as export reads it)."""
    ckpt = Path(run_dir) / "checkpoints"
    return read_ema(ckpt / (ckpt / "latest").read_text().strip())


def _train_worker(rank: int, world: int, cases: list[tuple[str, list[str], str | None]], root: str):
    from megasora.train.trainer import train
    results = {}
    for name, extra, resume in cases:
        cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(extra, f"{root}/{name}"))
        resume_path = f"{root}/{resume}" if resume else None
        losses = train(cfg, resume=resume_path).losses
        dist.barrier()  # every stage's checkpoint and the metrics are on disk
        results[name] = (losses, _full_params(cfg, world), _grad_norms(cfg.run.dir), _saved_ema(cfg.run.dir))
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline"))
    ema = ["train.ema_decay=0.9"]
    runs = run_launched(_train_worker, 1, [("single", [f"train.grad_accum={MICRO_BATCHES}"] + ema, None)], root)[0]
    pp2 = LAYOUTS["pp2"][1]
    runs.update(run_launched(_train_worker, 2, [
        ("pp2", pp2 + ema + ["train.save_every=3"], None),
        # a new run directory that resumes the step-3 checkpoint of the run above
        ("pp2_resumed", pp2 + ema, "pp2/checkpoints/step_00000003"),
    ], root)[0])
    cases = [(name, extra, None) for name, (world, extra) in LAYOUTS.items() if world == 4]
    # another layout resumes the same checkpoint: converted to a DeepSpeed universal checkpoint
    cases.append(("pp2_to_pp2xtp2", LAYOUTS["pp2xtp2"][1], "pp2/checkpoints/step_00000003"))
    runs.update(run_launched(_train_worker, 4, cases, root)[0])
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_training_equals_single_process(pipeline_runs, layout):
    ref_losses, ref_params, ref_norms, _ = pipeline_runs["single"]
    losses, params, norms, _ = pipeline_runs[layout]
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, ref in ref_losses.items():
        rel = abs(losses[step] - ref) / abs(ref)
        assert rel <= 1e-5, f"{layout} step {step}: loss {losses[step]:.8f} vs single {ref:.8f} (rel {rel:.1e})"
    # The norm is summed over the tp x pp group; clipping (train.grad_clip=1) is active, so a
    # norm missing a stage's parameters would also change the weights.
    assert max(ref_norms.values()) > 1.0
    for step, ref in ref_norms.items():
        assert abs(norms[step] - ref) <= 1e-5 * ref, f"{layout} step {step}: grad norm {norms[step]} vs {ref}"
    assert params.keys() == ref_params.keys()
    torch.manual_seed(0)  # tiny.yaml's train.seed: the initial weights of every run
    initial = dict(build_dit(load_config(REPO / "configs" / "tiny.yaml", _overrides([], "unused"))).named_parameters())
    moved = max((ref_params[k] - p0.detach()).abs().max().item() for k, p0 in initial.items())
    assert moved > 1e-3, "training did not change the parameters; the comparison would be vacuous"
    for name, ref in ref_params.items():
        err = (params[name] - ref).abs().max().item()
        assert err <= 1e-4, f"{layout}: parameter {name} differs by {err:.2e}"


@pytest.mark.slow
def test_pipeline_resume_same_layout_is_exact(pipeline_runs):
    losses, params, _, _ = pipeline_runs["pp2"]
    resumed_losses, resumed_params, _, _ = pipeline_runs["pp2_resumed"]
    assert sorted(resumed_losses) == [4, 5]  # steps 1-3 came from the checkpoint
    for step in (4, 5):
        assert resumed_losses[step] == losses[step], f"step {step}: {resumed_losses[step]!r} vs {losses[step]!r}"
    for name, tensor in params.items():
        assert torch.equal(resumed_params[name], tensor), f"{name} differs after resume"


@pytest.mark.slow
def test_pipeline_resume_on_another_layout(pipeline_runs):
    """pp2 step-3 checkpoint resumed as pp2 x tp2 (universal conversion) continues the single-process run."""
    ref_losses, ref_params, _, _ = pipeline_runs["single"]
    losses, params, _, _ = pipeline_runs["pp2_to_pp2xtp2"]
    assert sorted(losses) == [4, 5]
    for step in (4, 5):
        assert abs(losses[step] - ref_losses[step]) <= 1e-5 * ref_losses[step], f"step {step}"
    for name, ref in ref_params.items():
        assert (params[name] - ref).abs().max().item() <= 1e-4, name


@pytest.mark.slow
def test_pipeline_checkpoint_holds_the_whole_ema(pipeline_runs):
    """The stages' EMA shard files assemble into the whole EMA, equal to the single-process run's."""
    ref_ema = pipeline_runs["single"][3]
    for run in ("pp2", "pp2_resumed"):
        ema = pipeline_runs[run][3]
        assert ema is not None and ema.keys() == ref_ema.keys()
        for name, ref in ref_ema.items():
            assert (ema[name] - ref).abs().max().item() <= 1e-4, f"{run}: EMA of {name}"
