"""LoRA (megasora/parallel/lora.py): B = 0 is the base model exactly; tp2 forward and adapter
gradients equal one process (column- and row-parallel targets, a replicated one); through the
real trainer only the adapters change, the checkpoint holds only them, and resuming is exact
(same layout, and a tp2 checkpoint resumed on one process); export in diffusers' LoRA format
and merged full weights."""
from __future__ import annotations

import copy
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from model_utils import model_inputs, randomized, save_tiny_wan, tp_gathered_grads
from safetensors.torch import load_file, save_file
from test_wan import TEXT_DIM, diffusers_text, tiny_wan

from megasora.cli import main
from megasora.config import ConfigError, LoRAConfig, load_config
from megasora.models import build_dit, from_diffusers
from megasora.models.dit import DiT, DiTArch
from megasora.parallel.lora import apply_lora, is_lora_parameter, lora_partition_dims
from megasora.parallel.mesh import ParallelLayout, build_mesh
from megasora.parallel.parallelize import parallelize
from megasora.train import trainer
from megasora.train.loop import TrainingLoop
from megasora.train.lora_export import diffusers_lora

from parallel_utils import REPO, run_distributed, run_launched

TP = 2
ARCH = DiTArch(in_channels=3, hidden=32, depth=2, heads=4, text_dim=16, pooled_text=True)
B, FRAMES, SIDE, TEXT = 2, 3, 6, 5  # 27 tokens: padded to 28 for tp2
# column-parallel (attn.q, cross_attn.k on the text, mlp.fc1), row-parallel (attn.out, mlp.fc2),
# not tp-split but replicated over tp (final.linear)
TARGETS = ["attn.q", "cross_attn.k", "attn.out", "mlp.fc1", "mlp.fc2", "final.linear"]
LORA = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS)


def _base() -> DiT:
    """Every parameter random (adaLN-Zero would close the residual branches the adapters sit in)."""
    return randomized(DiT(ARCH))


def _inputs() -> tuple[torch.Tensor, ...]:
    return model_inputs(ARCH.in_channels, ARCH.text_dim, B, FRAMES, SIDE, TEXT)


def _forward_backward(model: DiT) -> torch.Tensor:
    latents, t, text, mask, dout = _inputs()
    model.zero_grad()
    out = model(latents, t, text, mask)
    (out * dout).sum().backward()
    return out.detach()


def _random_adapters(model: DiT, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Nonzero A and B (B = 0 would give A no gradient), the same whole values at any tp degree."""
    split = lora_partition_dims(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not is_lora_parameter(name):
                continue
            shape = list(param.shape)
            if name in split:
                shape[split[name]] *= tp_size
            whole = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.1
            param.copy_(whole.chunk(tp_size, dim=split[name])[tp_rank] if name in split else whole)


def test_zero_b_is_exactly_the_base_model() -> None:
    base = _base()
    adapted = apply_lora(copy.deepcopy(base), LORA)
    assert torch.equal(_forward_backward(adapted), _forward_backward(base))  # B starts at zero: bit-identical
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_parameter(name) for name in trainable)
    assert all(p.grad is None for name, p in adapted.named_parameters() if not is_lora_parameter(name))
    assert any(p.grad.abs().sum() > 0 for name, p in adapted.named_parameters() if name.endswith("lora_B.weight"))
    _random_adapters(adapted)
    assert not torch.allclose(_forward_backward(adapted), _forward_backward(base))  # and the adapter is live


def test_targets_matching_nothing_name_what_could_match() -> None:
    with pytest.raises(ConfigError, match=r"'to_q' matches no linear layer.*blocks\.\*\.attn\.q"):
        apply_lora(_base(), LoRAConfig(rank=4, targets=["attn.q", "to_q"]))


def _gathered_grads(model: DiT, mesh) -> dict[str, torch.Tensor]:
    return tp_gathered_grads(model, mesh.group("tp"), lora_partition_dims(model), TP, is_lora_parameter)


def _single_adapted() -> DiT:
    single = apply_lora(_base(), LORA)
    _random_adapters(single)
    return single


def _tp_worker(rank: int, world: int, lora_file: str) -> dict:
    single = _single_adapted()
    mesh = build_mesh(ParallelLayout(tp=TP))
    model = parallelize(_base(), mesh, lora=LORA)
    _random_adapters(model, mesh.rank_in("tp"), TP)
    ref, out = _forward_backward(single), _forward_backward(model)
    from_file = parallelize(_base(), mesh, lora=replace(LORA, init=lora_file))  # each rank reads its tp part
    return {"out": (out, ref), "from_file": _forward_backward(from_file), "grads": (_gathered_grads(model, mesh),
                                         {n: p.grad for n, p in single.named_parameters() if is_lora_parameter(n)}),
            "base_grads": [n for n, p in model.named_parameters() if p.grad is not None and not is_lora_parameter(n)],
            "split": lora_partition_dims(model)}


def test_tp2_lora_forward_and_gradients_equal_one_process(tmp_path: Path) -> None:
    """Also: the one-process adapters exported to a diffusers-lora file and read back at tp2 (train.lora.init)."""
    single = _single_adapted()
    adapters = {n: p.detach() for n, p in single.named_parameters() if is_lora_parameter(n)}
    save_file(diffusers_lora(adapters, LORA.scale, ARCH), tmp_path / "lora.safetensors")
    for run in run_distributed(_tp_worker, TP, str(tmp_path / "lora.safetensors")):
        out, ref = run["out"]
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(run["from_file"], ref, atol=1e-5, rtol=1e-5)
        grads, ref_grads = run["grads"]
        assert sorted(grads) == sorted(ref_grads) and len(grads) == 2 * 2 * (len(TARGETS) - 1) + 2
        for name, grad in grads.items():
            scale = ref_grads[name].abs().max()
            assert scale > 0, name
            assert (grad - ref_grads[name]).abs().max() <= 1e-5 * scale + 1e-7, name
        assert run["base_grads"] == []
        assert run["split"]["blocks.0.attn.q.lora_B.weight"] == 0    # column-parallel: B by rows
        assert run["split"]["blocks.0.attn.out.lora_A.weight"] == 1  # row-parallel: A by columns
        assert "final.linear.lora_A.weight" not in run["split"]


# ---------------------------------------------------------------- through the real trainer

# The seeded init is adaLN-Zero: every gated branch is closed and, frozen, stays closed, so only
# the ungated paths learn: cross-attention (q, k, v column-parallel, out row-parallel) and the
# final linear (replicated over tp). A pretrained base opens them all.
TRAIN = ["train.lora.rank=4", "train.lora.alpha=8", "train.ema_decay=0", "train.lr=1e-2", "train.warmup_steps=0",
         "train.steps=4", "train.lora.targets=[cross_attn.q, cross_attn.k, cross_attn.v, cross_attn.out, final.linear]"]


def _train_keeping_model(rank: int, world: int, run_dir: str, overrides: list[str], resume: str | None) -> dict:
    """`megasora train` (train/trainer.py train), keeping the engine's module to look at after the loop."""
    kept: dict = {}
    loop_run = TrainingLoop.run

    def run_and_keep(self, step: int, samples: int):
        result = loop_run(self, step, samples)
        kept.update({name: p.detach().clone() for name, p in self.engine.module.named_parameters()})
        return result

    TrainingLoop.run = run_and_keep  # type: ignore[method-assign]
    try:
        result = trainer.train(load_config(REPO / "configs" / "tiny.yaml", [*TRAIN, *overrides, f"run.dir={run_dir}"]),
                               resume)
    finally:
        TrainingLoop.run = loop_run  # type: ignore[method-assign]
    return {"losses": result.losses, "state": kept}


def _train_runs(rank: int, world: int, runs: list[tuple[str, list[str], str | None]]) -> list[dict]:
    out = []
    for run in runs:
        out.append(_train_keeping_model(rank, world, *run))
        dist.barrier()
    return out


def _seeded_base() -> dict[str, torch.Tensor]:
    cfg = load_config(REPO / "configs" / "tiny.yaml", TRAIN)
    torch.manual_seed(cfg.train.seed)
    return {name: p.detach() for name, p in build_dit(cfg).named_parameters()}


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("lora_runs")
    runs = [(str(root / "full"), ["train.save_every=2"], None),
            (str(root / "resumed"), [], str(root / "full" / "checkpoints" / "step_00000002"))]
    return root, run_launched(_train_runs, 1, runs)[0]


def test_training_changes_only_the_adapters_and_saves_only_them(one_process_runs) -> None:
    root, (full, _) = one_process_runs
    base = _seeded_base()
    lora = {name: t for name, t in full["state"].items() if is_lora_parameter(name)}
    assert set(full["state"]) == set(base) | set(lora) and len(lora) == 2 * (4 * 2 + 1)
    for name, tensor in base.items():
        assert torch.equal(full["state"][name], tensor), name  # the base: bit-identical to its seeded init
    assert all(t.abs().sum() > 0 for name, t in lora.items() if name.endswith("lora_B.weight"))  # B left zero
    saved = torch.load(root / "full" / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    assert sorted(saved) == sorted(lora)


def test_resume_is_exact(one_process_runs) -> None:
    _, (full, resumed) = one_process_runs
    assert sorted(resumed["losses"]) == [3, 4]
    assert [resumed["losses"][s] for s in (3, 4)] == [full["losses"][s] for s in (3, 4)]
    for name, tensor in full["state"].items():
        assert torch.equal(resumed["state"][name], tensor), name


@pytest.fixture(scope="module")
def resharded_runs(tmp_path_factory) -> tuple[list[dict], dict]:
    """tp2 for 4 steps (saving at 2), and one process resuming its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("lora_tp2")
    tp2 = run_launched(_train_runs, 2, [(str(root / "tp2"), ["train.save_every=2", "parallel.tp=2"], None)])
    tp1 = run_launched(_train_runs, 1, [(str(root / "tp1"), [], str(root / "tp2" / "checkpoints" / "step_00000002"))])
    return [ranks[0] for ranks in tp2], tp1[0][0]  # per rank: the list of its runs' results


def _whole(rank_states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    cfg = load_config(REPO / "configs" / "tiny.yaml", TRAIN)
    split = lora_partition_dims(apply_lora(build_dit(cfg), cfg.train.lora))
    return {name: torch.cat([s[name] for s in rank_states], dim=split[name]) if name in split else tensor
            for name, tensor in rank_states[0].items() if is_lora_parameter(name)}


def test_tp2_checkpoint_resumes_on_one_process(resharded_runs) -> None:
    tp2, tp1 = resharded_runs  # tp2: its two ranks' results
    assert sorted(tp1["losses"]) == [3, 4]
    for step in (3, 4):
        assert tp1["losses"][step] == pytest.approx(tp2[0]["losses"][step], rel=1e-5, abs=1e-6)
    whole = _whole([rank["state"] for rank in tp2])
    for name, tensor in whole.items():
        assert torch.allclose(tp1["state"][name], tensor, atol=1e-6, rtol=1e-5), name


def _export(capsys, *args: str) -> str:
    """`megasora ckpt export ARGS`, in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(["ckpt", "export", *args])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err[-3000:]
    return out


def _trained_lora_model(state: dict[str, torch.Tensor]) -> tuple[DiT, tuple[torch.Tensor, ...]]:
    """The trained run's model (seeded base + its adapters) on one process, and inputs of its shapes."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", TRAIN)
    torch.manual_seed(cfg.train.seed)
    model = apply_lora(build_dit(cfg), cfg.train.lora)
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(2, cfg.model.in_channels, cfg.data.frames, cfg.data.height, cfg.data.width, generator=g),
              torch.rand(2, generator=g), torch.randn(2, 5, cfg.text.dim, generator=g), torch.ones(2, 5, dtype=torch.bool))
    return model, inputs


def test_merged_export_equals_the_adapted_model(one_process_runs, tmp_path: Path, capsys) -> None:
    root, (full, _) = one_process_runs
    _export(capsys, str(root / "full"), "--merge", "--out", str(tmp_path / "merged.safetensors"))
    adapted, inputs = _trained_lora_model(full["state"])
    cfg = load_config(REPO / "configs" / "tiny.yaml", TRAIN)
    merged = build_dit(cfg)
    merged.load_state_dict(load_file(tmp_path / "merged.safetensors"))  # strict: full weights, no adapter left
    with torch.no_grad():
        assert torch.allclose(merged(*inputs), adapted(*inputs), atol=1e-5, rtol=1e-5)


def test_diffusers_lora_export_loads_with_peft(one_process_runs, tmp_path: Path, capsys) -> None:
    """peft (what diffusers' load_lora_adapter runs) injects the exported file into the base model by
    its key names, with lora_alpha = r as diffusers gives a file without alphas: same output."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    root, (full, _) = one_process_runs
    _export(capsys, str(root / "full"), "--format", "diffusers-lora", "--out", str(tmp_path / "lora.safetensors"))
    exported = load_file(tmp_path / "lora.safetensors")
    assert "transformer.blocks.0.cross_attn.q.lora_A.weight" in exported and len(exported) == 2 * 9
    adapted, inputs = _trained_lora_model(full["state"])
    cfg = load_config(REPO / "configs" / "tiny.yaml", TRAIN)
    torch.manual_seed(cfg.train.seed)
    base = build_dit(cfg)
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in exported})
    peft_model = inject_adapter_in_model(LoraConfig(r=cfg.train.lora.rank, lora_alpha=cfg.train.lora.rank,
                                                    target_modules=modules), base)
    result = set_peft_model_state_dict(peft_model, {k.removeprefix("transformer."): v for k, v in exported.items()})
    assert not result.unexpected_keys
    with torch.no_grad():
        assert torch.allclose(peft_model(*inputs), adapted(*inputs), atol=1e-5, rtol=1e-5)
    # and train.lora.init starts a run's adapters from the file: the trained ones again
    torch.manual_seed(cfg.train.seed)
    restarted = apply_lora(build_dit(cfg), replace(cfg.train.lora, init=str(tmp_path / "lora.safetensors")))
    for name, tensor in restarted.named_parameters():
        assert torch.allclose(tensor, full["state"][name], atol=1e-7, rtol=1e-6), name


# ---------------------------------------------------------------- Wan: diffusers loads the export

WAN_TARGETS = ["attn.q", "attn.k", "attn.v", "attn.out", "cross_attn.q", "cross_attn.v", "mlp.fc1", "mlp.fc2"]


def test_wan_lora_export_loads_into_diffusers(tmp_path: Path) -> None:
    """A tiny random WanTransformer3DModel saved here, imported, adapted (q/k: RoPE-reordered rows),
    exported; diffusers' own load_lora_adapter on the saved model gives MegaSora's output."""
    tiny_wan().save_pretrained(tmp_path / "transformer")
    lora = LoRAConfig(rank=4, alpha=2.0, targets=WAN_TARGETS)
    ours = apply_lora(from_diffusers(tmp_path / "transformer"), lora).eval()
    _random_adapters(ours)
    exported = diffusers_lora({n: p.detach() for n, p in ours.named_parameters() if is_lora_parameter(n)},
                              lora.scale, ours.arch)
    assert "transformer.blocks.1.attn1.to_q.lora_A.weight" in exported
    assert "transformer.blocks.0.ffn.net.0.proj.lora_B.weight" in exported
    theirs = WanTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()
    theirs.load_lora_adapter(exported, prefix="transformer")
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, ours.arch.in_channels, 3, 6, 10, generator=g)
    text = torch.randn(2, 9, TEXT_DIM, generator=g)
    mask = torch.arange(9)[None] < torch.tensor([[4], [9]])
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        want = theirs(latents, sigma * 1000, diffusers_text(text, mask), return_dict=False)[0]
        got = ours(latents, sigma, text, mask)
        base = from_diffusers(tmp_path / "transformer").eval()(latents, sigma, text, mask)
    assert (got - base).abs().max() > 1e-2  # the adapters matter
    assert (got - want).abs().max() <= 1e-5


def test_wan_lora_trained_at_tp2_exports_to_diffusers(tmp_path: Path, capsys) -> None:
    """model.pretrained (a tiny Wan saved here) -> LoRA training at tp2 through the trainer -> `ckpt export
    --format diffusers-lora` (tp shards consolidated) -> diffusers' load_lora_adapter == MegaSora with the
    same file as train.lora.init, within 1e-5, and the trained adapters changed the output; `--format diffusers
    --merge` is a WanTransformer3DModel directory giving that output too."""
    torch.manual_seed(4)
    save_tiny_wan(tmp_path / "wan")
    targets = "train.lora.targets=[attn.q, attn.k, attn.out, cross_attn.v, mlp.fc1, mlp.fc2]"
    run_launched(_train_runs, 2, [(str(tmp_path / "run"), [f"model.pretrained={tmp_path / 'wan'}", targets,
                                                           "parallel.tp=2", "train.steps=2"], None)])
    _export(capsys, str(tmp_path / "run"), "--format", "diffusers-lora", "--out", str(tmp_path / "lora.safetensors"))
    lora = LoRAConfig(rank=4, alpha=8.0, targets=["attn.q", "attn.k", "attn.out", "cross_attn.v", "mlp.fc1", "mlp.fc2"],
                      init=str(tmp_path / "lora.safetensors"))
    ours = apply_lora(from_diffusers(tmp_path / "wan"), lora).eval()
    theirs = WanTransformer3DModel.from_pretrained(tmp_path / "wan").eval()
    theirs.load_lora_adapter(load_file(tmp_path / "lora.safetensors"), prefix="transformer")
    g = torch.Generator().manual_seed(5)
    latents, text = torch.randn(2, 3, 3, 6, 10, generator=g), torch.randn(2, 7, 384, generator=g)
    mask = torch.arange(7)[None] < torch.tensor([[3], [7]])
    sigma = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        want = theirs(latents, sigma * 1000, diffusers_text(text, mask), return_dict=False)[0]
        got = ours(latents, sigma, text, mask)
        base = from_diffusers(tmp_path / "wan").eval()(latents, sigma, text, mask)
    assert (got - base).abs().max() > 1e-4  # two steps of training moved the adapters
    assert (got - want).abs().max() <= 1e-5
    # --merge onto model.pretrained, written as a diffusers directory: the same model, adapters folded in
    _export(capsys, str(tmp_path / "run"), "--format", "diffusers", "--merge", "--out", str(tmp_path / "merged"))
    with torch.no_grad():
        merged = WanTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
        assert (merged(latents, sigma * 1000, diffusers_text(text, mask), return_dict=False)[0] - want).abs().max() <= 1e-5
