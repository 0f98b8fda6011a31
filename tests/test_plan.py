"""The planner (megasora/plan): model terms against hand arithmetic and real tensors, the layout
search against the trainer's validator, the `megasora plan` CLI and `megasora submit`'s fit warning."""
from __future__ import annotations

import dataclasses
import itertools
import json
import time

import pytest
import torch

from megasora.cli import main
from megasora.config import ConfigError, ParallelConfig, load_config, validate
from megasora.hardware import GPUS, Hardware
from megasora.models import build_dit
from megasora.parallel.mesh import validate_config_layout
from megasora.plan import Layout, load_hardware, predict, search
from megasora.plan.hardware import HardwareError
from megasora.plan.memory import (
    REDUCE_BUCKET_ELEMENTS,
    block_activation_bytes,
    block_params,
    memory_breakdown,
    model_state,
    retained_block_bytes,
    total_params,
)
from megasora.plan.search import ZERO_STAGES, divisors, parallel_degrees
from megasora.plan.time_model import axis_link, stage_time
from megasora.plan.workload import layout_from_config, workload_from_config

TINY = "configs/tiny.yaml"


def tiny_work(*overrides: str):
    cfg = load_config(TINY, list(overrides))
    return cfg, workload_from_config(cfg)[0]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ------------------------------------------------------------------ parameters and model state


@pytest.mark.parametrize("overrides", [[], ["model.qk_norm=false", "model.mlp_ratio=2.0", "model.hidden=96"],
                                       ["model.pooled_text=true"]])
def test_total_params_equal_the_real_model(overrides):
    cfg, work = tiny_work(*overrides)
    assert total_params(work) == sum(p.numel() for p in build_dit(cfg).parameters())


def test_block_params_under_tp_by_hand():
    _, work = tiny_work()  # D=64, M=256, head dim 16, qk-norm
    d, m = 64, 256
    attention = 4 * d * d // 2 + 3 * d // 2 + d + 2 * 16        # q,k,v,out sharded; out bias, qk-norms whole
    mlp = 2 * d * m // 2 + m // 2 + d
    adaln = (6 * d * d + 6 * d) // 2                              # column-parallel (parallel/tensor.py)
    assert block_params(work, tp=2) == 2 * d + 2 * attention + mlp + adaln == 45952


def test_model_state_zero2_fp32_by_hand():
    _, work = tiny_work("train.ema_decay=0.99")
    psi, z = 10 ** 9, 8
    state = model_state(work, Layout(dp=8, zero_stage=2), psi)
    assert state["weights"] == 4 * psi
    assert state["grads"] == 4 * psi / z                   # ZeRO-2 partitions gradients over dp*sp
    assert state["optimizer"] == 4 * psi / z + 8 * psi / z  # fp32 master + Adam m, v
    assert state["ema"] == 4 * psi / z                    # sharded over dp x sp (train/ema.py)
    assert state["zero_buffers"] == 4 * REDUCE_BUCKET_ELEMENTS
    # ZeRO over dp x sp: ulysses 2 x dp 4 partitions exactly like dp 8
    assert model_state(work, Layout(dp=4, ulysses=2, zero_stage=2), psi) == state
    # ZeRO-3 also divides the weights; ZeRO-0 keeps everything whole and has no master copy
    assert model_state(work, Layout(dp=8, zero_stage=3), psi)["weights"] == 4 * psi / z
    zero0 = model_state(work, Layout(dp=8, zero_stage=0), psi)
    assert zero0["optimizer"] == 8 * psi and zero0["grads"] == 4 * psi


def test_model_state_bf16():
    _, work = tiny_work("train.precision=bf16")
    psi = 10 ** 9
    state = model_state(work, Layout(dp=4, zero_stage=1), psi)
    assert state["weights"] == 2 * psi and state["grads"] == 2 * psi  # bf16 grads (grad_accum_dtype default)
    assert state["optimizer"] == 12 * psi / 4 and state["zero_buffers"] == 2 * REDUCE_BUCKET_ELEMENTS
    zero2 = model_state(work, Layout(dp=4, zero_stage=2), psi)
    assert zero2["grads"] == 2 * psi / 4
    assert model_state(work, Layout(dp=4, zero_stage=0), psi)["optimizer"] == 12 * psi  # fp32 master + Adam


LORA_TARGETS = "train.lora.targets=[attn.q,attn.k,attn.v,attn.out,cross_attn.q,cross_attn.k,cross_attn.v," \
    "cross_attn.out,mlp.fc1,mlp.fc2]"


@pytest.mark.parametrize("tp", [1, 2])
def test_lora_adapters_are_the_trained_parameters(tp):
    """Under LoRA the planner's adapter count equals the real model's trainable parameters on a tp
    rank, and only they have gradients and optimizer state; the frozen base keeps its weights."""
    from megasora.parallel.lora import apply_lora  # lazy: only the LoRA tests build adapters
    from megasora.plan.communication import lora_block_params
    cfg, work = tiny_work("train.lora.rank=8", "train.ema_decay=0", LORA_TARGETS)
    model = apply_lora(build_dit(cfg), cfg.train.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_block, replicated = lora_block_params(work.arch, tp, 8, work.lora_targets)
    if tp == 1:
        assert cfg.model.depth * per_block == trainable
    else:  # column-parallel: B rows cut, row-parallel: A columns cut (parallel/lora.py)
        whole = {name: p.numel() for name, p in model.blocks[0].named_parameters() if p.requires_grad}
        cut = sum(n for name, n in whole.items() if (".lora_B." in name) != (name.startswith(("attn.out", "cross_attn.out", "mlp.fc2"))))
        assert per_block == sum(whole.values()) - cut + cut // tp and replicated == sum(whole.values()) - cut
    layout = Layout(tp=tp, dp=4 // tp, zero_stage=2)
    lora, full = memory_breakdown(work, layout, allowance=False), memory_breakdown(tiny_work()[1], layout, allowance=False)
    adapters = cfg.model.depth * per_block
    assert lora.optimizer == 12 * adapters / layout.dp and lora.ema == 0
    assert lora.weights == full.weights + 4 * adapters  # the base stays whole at ZeRO-2
    assert lora.optimizer < full.optimizer / 5  # rank 8 of a 64-wide tiny model: a large share


def test_lora_time_drops_the_base_weight_gradients():
    """A LoRA step computes forward + input gradients (models/flops.py): about 2/3 of the full
    fine-tune's FLOPs where the linears dominate (short clips), less saved where attention does
    (its backward is 2 x forward either way); MFU counts those FLOPs, not the full model's."""
    from megasora.models.flops import dit_train_flops
    from megasora.plan.time_model import model_flops_per_step
    cfg = load_config("configs/dit-7b.yaml")
    work, micro = workload_from_config(cfg)
    layout = layout_from_config(cfg, 32, micro)
    targets = ("attn.q", "attn.k", "attn.v", "attn.out")
    for tokens, bound in ((1024, 0.72), (work.tokens, 0.99)):
        full = dataclasses.replace(work, tokens=tokens)
        lora = dataclasses.replace(full, lora_rank=32, lora_targets=targets)
        full_t, lora_t = (stage_time(w, layout, GPUS["h100"], 8, 0) for w in (full, lora))
        ratio = dit_train_flops(work.arch, tokens, work.text_tokens, 32, targets) / dit_train_flops(
            work.arch, tokens, work.text_tokens)
        assert ratio < bound
        assert lora_t.compute_s / full_t.compute_s == pytest.approx(ratio, rel=0.05)  # + replicated work
        assert model_flops_per_step(lora, layout) / model_flops_per_step(full, layout) == pytest.approx(ratio)


# ------------------------------------------------------------------ activations


def test_block_activation_bytes_by_hand():
    _, work = tiny_work()  # b=2, N=4*8*8=256, D=64, M=256, H=4, L=32, fp32
    r = a = 2 * 256
    lt = 2 * 32
    elements = 5 * r * 64 + 3 * a * 64 + 9 * a * 64 + 2 * a * 256 + 3 * lt * 64 + 8 * 2 * 64
    stats = 6 * r + 8 * a * 4 + 2 * lt * 4
    assert block_activation_bytes(work, Layout(micro_batch_size=2)) == 4 * (elements + stats) == 3409920
    # tp2 x ulysses2: residual stream at N/4, tp regions at N/2 with half the widths, +1 sp copy
    r, a = 2 * 256 / 4, 2 * 256 / 2
    elements = 5 * r * 64 + 3 * a * 64 + 10 * a * 32 + 2 * a * 128 + 3 * lt * 32 + (7 + 2) * 2 * 64  # adaLN: tp rows
    stats = 6 * r + 8 * a * 2 + 2 * lt * 2
    assert block_activation_bytes(work, Layout(tp=2, ulysses=2, micro_batch_size=2)) == 4 * (elements + stats)


def test_retained_bytes_by_mode():
    _, work = tiny_work()
    full = retained_block_bytes(work, Layout(micro_batch_size=2, activation_checkpointing="full"))
    assert full == 2 * 256 * 64 * 4                          # the block input only
    selective = retained_block_bytes(work, Layout(micro_batch_size=2, activation_checkpointing="selective"))
    assert selective == full + 4 * 2 * 256 * 64 * 4 + 2 * 256 * 4 * 4   # + q, k, v, out and the LSE
    none = retained_block_bytes(work, Layout(micro_batch_size=2))
    assert full < selective < none


def test_block_activation_formula_equals_saved_tensors_of_a_real_block():
    """Every tensor autograd saves in a DiT block's forward, counted by storage: the formula is exact."""
    cfg, work = tiny_work("model.kernels=auto")
    torch.manual_seed(0)
    model = build_dit(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    inside = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if inside[0] and storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    block = model.blocks[1]
    block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    block.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    latents, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    text, mask = torch.randn(2, cfg.text.max_length, cfg.text.dim), torch.ones(2, cfg.text.max_length, dtype=torch.bool)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(latents, t, text, mask)
    # block 1: the caption tokens and RoPE tables were saved first by block 0 (shared, not per block)
    measured = sum(seen.values())
    predicted = block_activation_bytes(work, Layout(micro_batch_size=2))
    assert measured == pytest.approx(predicted, rel=0.01), (measured, predicted)


# ------------------------------------------------------------------ time model


def test_compute_time_by_hand():
    cfg, work = tiny_work()
    hw = Hardware("test", peak_flops=1e12, memory_bytes=1e12, intra_bytes_per_s=1e11, inter_bytes_per_s=1e10,
                  efficiency=0.5)
    from megasora.models.flops import dit_train_flops
    layout = Layout(micro_batch_size=2, grad_accum=3)
    t = stage_time(work, layout, hw, 8, 0)
    assert t.compute_s == pytest.approx(3 * 2 * dit_train_flops(work.arch, 256, 32) / 0.5e12)
    assert t.recompute_s == 0 and t.bubble_s == 0 and t.comm_s == {}
    full = stage_time(work, dataclasses.replace(layout, activation_checkpointing="full"), hw, 8, 0)
    assert full.recompute_s > 0 and full.compute_s == t.compute_s
    # tp2 x ulysses2: a quarter of the per-token work, but the timestep MLP and caption projection
    # whole and the caption's cross-attention k/v at 1/tp on each sp rank (replicated_forward_flops)
    from megasora.plan.time_model import replicated_forward_flops
    split = dataclasses.replace(layout, tp=2, ulysses=2)
    single_replicated, split_replicated = (replicated_forward_flops(work, x, 0) for x in (layout, split))
    per_token = t.compute_s * 0.5e12 / 9 - single_replicated  # 3 micro-batches x (forward + backward)
    assert split_replicated > single_replicated > 0
    assert stage_time(work, split, hw, 8, 0).compute_s == pytest.approx(
        9 * (per_token / 4 + split_replicated) / 0.5e12)


def test_links_follow_the_rank_order():
    hw = GPUS["h100"]
    layout = Layout(tp=2, ulysses=4, ring=2, dp=4)
    intra, inter = hw.intra_bytes_per_s * hw.link_efficiency, hw.inter_bytes_per_s * hw.link_efficiency
    assert axis_link("tp", layout, 8, hw) == intra          # ranks 0-1
    assert axis_link("ulysses", layout, 8, hw) == intra     # tp*ulysses = 8: one node
    assert axis_link("ring", layout, 8, hw) == inter        # tp*ulysses*ring = 16: two nodes
    assert axis_link("ulysses+ring+dp", layout, 8, hw) == inter
    assert axis_link("ring", layout, 16, hw) == intra       # 16-GPU nodes hold it


def test_pipeline_bubble_is_pp_minus_one_micro_batches():
    cfg, work = tiny_work("model.depth=4")
    hw = Hardware("test", 1e12, 1e12, 1e11, 1e10)
    layout = Layout(pp=4, zero_stage=1, micro_batch_size=1, grad_accum=8)
    t = stage_time(work, layout, hw, 8, 1)
    per_micro = (t.compute_s + t.recompute_s) / 8
    assert t.bubble_s == pytest.approx(3 * per_micro)


# ------------------------------------------------------------------ search


@pytest.mark.parametrize("world,overrides", [
    (8, []),
    (8, ["model.hidden=48", "model.heads=6", "model.mlp_ratio=2.0"]),     # heads 6: tp*ulysses in {1, 2, 3, 6}
    (8, ["train.optimizer=cpu_adam", "train.offload_optimizer=cpu"]),    # offload: no pp, no ZeRO 0
    (12, ["model.depth=3", "model.hidden=96", "model.heads=8"]),         # pp <= depth, tp 3 and 12 don't split 8
])
def test_search_agrees_with_config_validation(world, overrides):
    """The enumerated (tp, ulysses, ring, pp, zero) are exactly the layouts config validation accepts
    (load_config's validate, then mesh.validate_config_layout, as `megasora train` applies them)."""
    base = load_config(TINY, [f"train.grad_accum={world}", *overrides])  # enough micro-batches for any pp
    enumerated = set(parallel_degrees(workload_from_config(base)[0].arch, world, base.train.offload_optimizer))
    accepted = set()
    for tp, ulysses, ring, pp in itertools.product(divisors(world), repeat=4):
        for zero in ZERO_STAGES:
            cfg = dataclasses.replace(base, parallel=ParallelConfig(tp=tp, ulysses=ulysses, ring=ring, pp=pp),
                                      train=dataclasses.replace(base.train, zero_stage=zero))
            try:
                validate(cfg)
                validate_config_layout(cfg, world)
            except ConfigError:  # a LayoutError is one
                continue
            accepted.add((tp, ulysses, ring, pp, zero))
    assert enumerated == accepted
    assert len(accepted) > 10 and len(accepted) < 4 * len(divisors(world)) ** 4
    if world == 8 and not overrides:
        assert (2, 2, 2, 1, 2) in enumerated and (1, 2, 2, 1, 3) in enumerated  # ZeRO-3 x sp partitions over dp x sp
        assert (1, 1, 1, 8, 3) not in enumerated and (1, 1, 1, 2, 1) in enumerated   # pp needs ZeRO 1/2


def test_search_keeps_only_fitting_layouts_fastest_first():
    cfg = load_config("configs/dit-7b-1m.yaml")
    result = search(cfg, 4, 8, GPUS["h100"])
    assert result.ranked and result.considered > len(result.ranked)
    assert all(p.fits and p.memory.total_bytes <= GPUS["h100"].memory_bytes for p in result.ranked)
    speeds = [p.samples_per_s for p in result.ranked]
    assert speeds == sorted(speeds, reverse=True)
    # the preset's pre-planning layout (ulysses 8 x ring 4, no checkpointing) is among those dropped
    old = Layout(ulysses=8, ring=4, dp=1, zero_stage=2, micro_batch_size=1, grad_accum=1)
    assert not predict(cfg, old, GPUS["h100"], 8).fits


def test_every_preset_fits_its_stated_target():
    targets = {"configs/dit-xl.yaml": (1, 8), "configs/dit-3b.yaml": (2, 8), "configs/dit-7b.yaml": (4, 8),
               "configs/dit-7b-1m.yaml": (4, 8), "configs/dit-30b-1m.yaml": (64, 8),
               "configs/wan2.1-t2v-1.3b.yaml": (1, 8), "configs/wan2.1-t2v-1.3b-lora.yaml": (1, 8),
               "configs/wan2.1-t2v-14b.yaml": (1, 8), "configs/wan2.1-t2v-14b-lora.yaml": (1, 8)}
    for path, (nodes, gpus) in targets.items():
        cfg = load_config(path)
        p = predict(cfg, layout_from_config(cfg, nodes * gpus, workload_from_config(cfg)[1]), GPUS["h100"], gpus)
        assert p.fits, (path, p.memory.total_bytes / 2 ** 30, p.memory.terms())


@pytest.mark.parametrize("path,nodes", [("configs/dit-7b-1m.yaml", 2), ("configs/dit-30b-1m.yaml", 3)])
def test_long_clip_presets_fit_the_fewest_nodes_their_headers_name(path, nodes):
    """The headers' 'fewest GPUs': a layout fits `nodes` x 8 H100 and none fits one node fewer."""
    cfg = load_config(path)
    assert search(cfg, nodes, 8, GPUS["h100"], top=1).ranked
    assert not search(cfg, nodes - 1, 8, GPUS["h100"], top=1).ranked


# ------------------------------------------------------------------ CLI


def test_plan_json_fields(capsys):
    code, out, _ = run_cli(["plan", "--config", "configs/dit-7b-1m.yaml", "--nodes", "4", "--gpus-per-node", "8",
                            "--top", "3", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 3
    for key in ("tp", "ulysses", "ring", "pp", "dp", "zero_stage", "activation_checkpointing", "micro_batch_size",
                "memory_bytes", "step_time_s", "fits"):
        assert key in rows[0], key
    assert all(r["fits"] for r in rows) and rows[0]["samples_per_s"] >= rows[1]["samples_per_s"]  # search.py's order
    assert rows[0]["tp"] * rows[0]["ulysses"] * rows[0]["ring"] * rows[0]["pp"] * rows[0]["dp"] == 32


def test_plan_table_names_why_the_top_wins(capsys):
    code, out, _ = run_cli(["plan", "--config", "configs/dit-7b-1m.yaml", "--nodes", "4", "--gpus-per-node", "8",
                            "--top", "4"], capsys)
    assert code == 0
    assert "wins: it fits in" in out and "run it with: --set parallel.tp=" in out


def test_plan_no_fit_names_the_smallest_node_count(capsys, tmp_path):
    cluster = tmp_path / "small.yaml"
    cluster.write_text("base: h100\nname: H100 at 40 GiB\nmemory_bytes: 42949672960\n")
    code, out, err = run_cli(["plan", "--config", "configs/dit-7b-1m.yaml", "--nodes", "1", "--gpus-per-node", "8",
                              "--gpu", str(cluster)], capsys)
    assert code == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("megasora: plan error: no layout of configs/dit-7b-1m.yaml fits 1 x 8")
    nodes = int(line.split("--nodes ")[1].rstrip(")"))
    cfg = load_config("configs/dit-7b-1m.yaml")
    hw = load_hardware(str(cluster))
    assert search(cfg, nodes, 8, hw, top=1).ranked and not search(cfg, nodes - 1, 8, hw, top=1).ranked


def test_plan_bad_gpu_is_one_line(capsys):
    code, _, err = run_cli(["plan", "--config", TINY, "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h900"],
                           capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("megasora: plan error: --gpu 'h900'")
    with pytest.raises(HardwareError):
        load_hardware("h900")


def test_plan_1024_gpus_in_seconds(capsys):
    start = time.perf_counter()
    code, out, _ = run_cli(["plan", "--config", "configs/dit-7b-1m.yaml", "--nodes", "128", "--gpus-per-node", "8",
                            "--json", "--top", "1"], capsys)
    assert code == 0 and json.loads(out)[0]["fits"]
    assert time.perf_counter() - start < 30  # a few seconds on an idle core; 2 shared cores here


# ------------------------------------------------------------------ submit's warning


def test_submit_warns_when_the_layout_does_not_fit(capsys):
    base = ["submit", "--config", "configs/dit-7b-1m.yaml", "--nodes", "4", "--gpus-per-node", "8", "--dry-run"]
    code, out, err = run_cli(base + ["--set", "parallel.tp=1", "--set", "parallel.ulysses=8", "--set", "parallel.ring=4",
                                     "--set", "train.activation_checkpointing=none"], capsys)
    assert code == 0 and "#SBATCH" in out  # still rendered: a warning, not a refusal
    warning = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(warning) == 1
    assert "predicted NOT to fit" in warning[0] and "largest term: activations" in warning[0]
    assert "best layout that fits: tp" in warning[0] and "--set parallel.tp=" in warning[0]
    code, out, err = run_cli(base, capsys)  # the planned preset: no warning
    assert code == 0 and "warning:" not in err


def test_memory_grows_with_tokens_and_shrinks_with_checkpointing():
    cfg, work = tiny_work()
    base = Layout(micro_batch_size=2)
    none = memory_breakdown(work, base, allowance=False)
    full = memory_breakdown(work, dataclasses.replace(base, activation_checkpointing="full"), allowance=False)
    assert full.activations < none.activations
    big = memory_breakdown(dataclasses.replace(work, tokens=4 * work.tokens), base, allowance=False)
    assert big.activations > 3.5 * none.activations


def test_hardware_table_files_and_cpu(tmp_path):
    assert load_hardware("h100").memory_bytes == 81559 * 1024 ** 2 and load_hardware("B200").peak_flops == 2250e12
    cluster = tmp_path / "c.yaml"
    cluster.write_text("base: a100\ninter_bytes_per_s: 12.5e9\n")  # YAML reads this as a string
    hw = load_hardware(str(cluster))
    assert hw.inter_bytes_per_s == 12.5e9 and hw.peak_flops == GPUS["a100"].peak_flops
    cluster.write_text("base: a100\nnvlink: 1\n")
    with pytest.raises(HardwareError, match="unknown key `nvlink`"):
        load_hardware(str(cluster))
    cpu = load_hardware("cpu")  # measured here: a predicted CPU run carries no GPU allowance
    assert cpu.peak_flops > 1e8 and not cpu.allowance
    cfg, work = tiny_work()
    p = predict(cfg, layout_from_config(cfg, 1, 2), cpu, 1)
    assert p.memory.allowance == 0 and p.time.total_s > 0
