"""The Wan 2.1 family equals diffusers' WanTransformer3DModel, and its weights go both ways exactly.

A tiny random WanTransformer3DModel is built here, perturbed so every parameter and every head
matters (diffusers' init has unit norms, and equal heads would hide a head-order mistake), and
saved with save_pretrained (sharded, with an index). MegaSora loads that directory with
safetensors alone and must reproduce diffusers' forward on an odd latent grid, captions padded
to different lengths and several sigmas.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from model_utils import save_tiny_wan
from safetensors.torch import load_file
from torch import nn

from megasora.cli import build_parser
from megasora.config import ConfigError, load_config
from megasora.models import build_dit, from_diffusers, wan_arch
from megasora.models.convert import (
    INDEX_FILE,
    megasora_to_wan,
    read_diffusers,
    read_pretrained,
    wan_arch_from_config,
    wan_to_megasora,
    write_diffusers,
)
from megasora.parallel.mesh import ParallelLayout, build_mesh
from megasora.parallel.parallelize import parallelize
from megasora.parallel.tensor import full_state_dict
from megasora.train.pretrained import load_pretrained

from parallel_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]

HEADS, HEAD_DIM, TEXT_DIM, IN_CHANNELS = 3, 16, 24, 4


def tiny_wan(seed: int = 0, layers: int = 2) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                  in_channels=IN_CHANNELS, out_channels=IN_CHANNELS, text_dim=TEXT_DIM,
                                  freq_dim=32, ffn_dim=72, num_layers=layers, cross_attn_norm=True,
                                  rope_max_seq_len=64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * 0.2)  # norms, tables and biases all away from their init
            if any(f"{attn}.to_{p}." in name for attn in ("attn1", "attn2") for p in "qkv"):
                # head h's rows scaled by 1 + h/2: a head mix-up or wrong per-head norm changes the output
                scale = (1 + torch.arange(HEADS, dtype=param.dtype) / 2).repeat_interleave(HEAD_DIM)
                param.mul_(scale.view(-1, *[1] * (param.dim() - 1)))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[WanTransformer3DModel, Path]:
    model = tiny_wan()
    path = tmp_path_factory.mktemp("wan") / "transformer"
    model.save_pretrained(path, max_shard_size="40KB")  # several shards + the index MegaSora must follow
    assert (path / INDEX_FILE).is_file()
    return model, path


def diffusers_text(text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How Wan's pipeline feeds captions: trimmed to their length, zero-padded to 512."""
    text = text * mask[..., None]
    return torch.nn.functional.pad(text, (0, 0, 0, 512 - text.shape[1]))


def test_forward_matches_diffusers(saved: tuple[WanTransformer3DModel, Path]) -> None:
    reference, path = saved
    ours = from_diffusers(path).eval()
    torch.manual_seed(1)
    latents = torch.randn(2, IN_CHANNELS, 3, 6, 10)  # grid (3, 3, 5): odd in every axis
    text = torch.randn(2, 9, TEXT_DIM)
    mask = torch.arange(9)[None] < torch.tensor([[4], [9]])  # captions of 4 and 9 tokens
    worst = 0.0
    with torch.no_grad():
        for t in ([0.05, 0.5], [0.93, 1.0], [0.0, 0.27]):
            sigma = torch.tensor(t)
            want = reference(latents, sigma * 1000, diffusers_text(text, mask), return_dict=False)[0]
            got = ours(latents, sigma, text, mask)
            # the same captions padded differently (garbage past the mask) give the same output
            longer = torch.cat([text, torch.randn(2, 5, TEXT_DIM)], dim=1)
            got_longer = ours(latents, sigma, longer, torch.nn.functional.pad(mask, (0, 5)))
            assert got.shape == want.shape
            worst = max(worst, (got - want).abs().max().item(), (got_longer - want).abs().max().item())
    assert worst < 1e-5, worst
    assert want.abs().mean() > 0.1  # the output is not trivially small


def test_import_export_bit_identical(saved: tuple[WanTransformer3DModel, Path], tmp_path: Path) -> None:
    _, path = saved
    config, tensors = read_diffusers(path)
    arch = wan_arch_from_config(config)
    ours = wan_to_megasora(tensors, arch)
    back = megasora_to_wan(ours, arch)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor), name
    out = write_diffusers(tmp_path / "export", ours, arch)
    written = load_file(out / "diffusion_pytorch_model.safetensors")
    assert written.keys() == tensors.keys() and all(torch.equal(written[k], v) for k, v in tensors.items())
    reloaded = WanTransformer3DModel.from_pretrained(out)
    assert all(torch.equal(p, tensors[name]) for name, p in reloaded.named_parameters())
    assert json.loads((out / "config.json").read_text())["num_layers"] == 2


def test_every_key_consumed_once(saved: tuple[WanTransformer3DModel, Path]) -> None:
    _, path = saved
    config, tensors = read_diffusers(path)
    arch = wan_arch_from_config(config)
    model = from_diffusers(path)
    assert set(wan_to_megasora(tensors, arch)) == set(model.state_dict())
    with pytest.raises(ValueError, match="unexpected"):
        wan_to_megasora({**tensors, "blocks.0.extra.weight": torch.zeros(1)}, arch)
    with pytest.raises(ValueError, match="missing"):
        wan_to_megasora({k: v for k, v in tensors.items() if k != "proj_out.bias"}, arch)


def test_block_ranges_like_pipeline_stages(saved: tuple[WanTransformer3DModel, Path]) -> None:
    """Two runs of blocks joined by the packed message (cond is 7D wide) give the whole forward."""
    _, path = saved
    model = from_diffusers(path).eval()
    torch.manual_seed(2)
    latents, text = torch.randn(2, IN_CHANNELS, 3, 6, 10), torch.randn(2, 5, TEXT_DIM)
    mask, t = torch.ones(2, 5, dtype=torch.bool), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        whole = model(latents, t, text, mask)
        message = model(latents, t, text, mask, blocks=range(0, 1))
        assert tuple(message.shape) == model.message_shape(latents, t, text)
        split = model(latents, t, text, mask, received=message, blocks=range(1, 2))
    assert torch.equal(split, whole)


def test_cli_import_then_export_bit_identical(saved: tuple[WanTransformer3DModel, Path], tmp_path: Path) -> None:
    """`ckpt import` -> RUN, `ckpt export RUN --format diffusers` -> a directory diffusers loads, same bits."""
    _, path = saved
    for argv in (["import", str(path), "--from", "diffusers", "--out", str(tmp_path / "run")],
                 ["export", str(tmp_path / "run"), "--format", "diffusers", "--out", str(tmp_path / "out")]):
        args = build_parser().parse_args(["ckpt", *argv])  # the CLI's own parser and command, in this process
        assert args.func(args) == 0
    _, original = read_diffusers(path)
    exported = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    reloaded = WanTransformer3DModel.from_pretrained(tmp_path / "out")
    assert all(torch.equal(p, original[name]) for name, p in reloaded.named_parameters())


def test_pretrained_sets_the_shape_and_reads_only_a_ranks_part(saved: tuple[WanTransformer3DModel, Path]) -> None:
    """model.pretrained: the config takes the checkpoint's shape; each tp part is read alone (get_slice)."""
    _, path = saved
    cfg = load_config(None, [f"model.pretrained={path}", "text.max_length=16"])
    assert (cfg.model.family, cfg.model.hidden, cfg.model.depth, cfg.model.ffn_dim, cfg.text.dim) == \
        ("wan", HEADS * HEAD_DIM, 2, 72, TEXT_DIM)
    with pytest.raises(ConfigError, match="model.hidden=96 conflicts with model.pretrained"):
        load_config(None, [f"model.pretrained={path}", "model.hidden=96"])
    whole = from_diffusers(path).state_dict()
    with torch.device("meta"):
        local = build_dit(cfg)
    split = {"blocks.1.attn.q.weight": 0, "blocks.1.attn.q_norm.weight": 0, "blocks.0.attn.out.weight": 1}
    for name, dim in split.items():  # as tensor parallelism leaves them on tp rank 1 of 3 (one head each)
        owner, leaf = local.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        meta = getattr(owner, leaf)
        part = nn.Parameter(meta.narrow(dim, 0, meta.shape[dim] // 3))
        part.tensor_model_parallel, part.partition_dim = True, dim
        setattr(owner, leaf, part)
    parts = dict(read_pretrained(local, wan_arch(cfg), path, tp_rank=1))
    assert parts.keys() == whole.keys()
    for name, value in parts.items():
        want = whole[name]
        if name in split:
            third = want.shape[split[name]] // 3
            want = want.narrow(split[name], third, third)
        assert torch.equal(value, want), name


@pytest.mark.slow
def test_train_from_pretrained_then_export(tmp_path: Path) -> None:
    """model.pretrained -> `megasora train` (one process, lr 0) -> `ckpt export --format diffusers`: the
    exported tensors are the checkpoint's, bit for bit, so loading, training's state and export agree."""
    save_tiny_wan(tmp_path / "wan")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["train", "--config", "configs/tiny.yaml", "--set", f"model.pretrained={tmp_path / 'wan'}",
                  "--set", "train.steps=1", "--set", "train.lr=0", "--set", f"run.dir={tmp_path / 'run'}"],
                 ["ckpt", "export", str(tmp_path / "run"), "--format", "diffusers", "--out", str(tmp_path / "out")]):
        proc = subprocess.run([sys.executable, "-m", "megasora", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    original = load_file(tmp_path / "wan" / "diffusion_pytorch_model.safetensors")
    exported = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], v) for k, v in original.items())


def _pretrained_tp_worker(rank: int, world: int, path: str) -> dict:
    cfg = load_config(None, [f"model.pretrained={path}"])
    mesh = build_mesh(ParallelLayout(tp=world))
    with torch.device("meta"):
        model = parallelize(build_dit(cfg), mesh)
    load_pretrained(model, cfg, mesh.rank_in("tp"))
    return {"whole": full_state_dict(model, mesh), "held": sum(p.numel() for p in model.parameters())}


def test_pretrained_tp2_each_rank_loads_its_shard(tmp_path: Path) -> None:
    """model.pretrained under tp2 (real parallelize on meta, then the loader): each rank holds less than
    the model and the tp-gathered weights are from_diffusers' exactly."""
    torch.manual_seed(3)
    model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                  text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(tmp_path / "wan", max_shard_size="40KB")
    whole = from_diffusers(tmp_path / "wan").state_dict()
    for run in run_distributed(_pretrained_tp_worker, 2, str(tmp_path / "wan")):
        assert run["held"] < sum(t.numel() for t in whole.values())
        assert run["whole"].keys() == whole.keys()
        assert all(torch.equal(run["whole"][k], v) for k, v in whole.items())
