"""Sampling under sequence parallelism equals one process (fp32, <= 1e-5): ulysses2, ring2,
ulysses2 x ring2 (and tp2) shard one clip's 27 tokens (so every layout pads) through the real
`megasora sample` command, launched the way torchrun launches it.

The checkpoint is the session's shared tiny run (conftest.sampling_run), sampled at 3 latent frames
of 6x6, with N(0, 0.05) added to every weight: a few steps of training leave the adaLN-Zero gates
nearly closed, and attention must matter for the comparison to mean anything (checked: the
perturbed model's samples depend on the attention output).
Both a t2v sample (one timestep per sample) and an i2v sample (per-token timesteps, the
conditioning frame at t=0) are compared.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--frames", "3", "--height", "6", "--width", "6"]  # 27 tokens of 1x2x2 patches
TOLERANCE = 1e-5
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights(sampling_run, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sp_sample")
    from safetensors.torch import save_file

    from megasora.train.checkpoint import read_model_weights
    state, cfg, _ = read_model_weights(sampling_run / "checkpoints")
    g = torch.Generator().manual_seed(0)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()}
    path = root / "model.safetensors"
    save_file(state, str(path))
    path.with_suffix(".json").write_text(json.dumps(cfg))
    from PIL import Image
    Image.fromarray((torch.rand(6, 6, 3, generator=g) * 255).byte().numpy()).save(root / "image.png")
    return path


def _sample(weights: Path, out: Path, mode: str, parallel: list[str]) -> None:
    from megasora.cli import main
    args = ["sample", "--weights", str(weights), "--prompt", "a red circle moving left", "--prompt", "a blue square",
            "--steps", "4", "--guidance", "3", "--seed", "7", "--mode", mode, "--out", str(out.with_suffix(".mp4")),
            "--save-latents", str(out), *SIZE]
    if mode == "i2v":
        args += ["--image", str(weights.parent / "image.png")]
    for item in parallel:
        args += ["--set", item]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0


def _sp_worker(rank: int, world: int, weights: Path, cases: list[tuple[str, list[str]]], root: str):
    results = {}
    for name, parallel in cases:
        for mode in ("t2v", "i2v"):
            out = Path(root) / f"{name}_{mode}.pt"
            _sample(weights, out, mode, parallel)
            if rank == 0:
                results[(name, mode)] = torch.load(out)["latents"]
    return results


@pytest.fixture(scope="module")
def sampled(weights, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sp_out")
    results = {}
    for mode in ("t2v", "i2v"):
        _sample(weights, root / f"single_{mode}.pt", mode, [])
        results[("single", mode)] = torch.load(root / f"single_{mode}.pt")["latents"]
    results.update(run_launched(_sp_worker, 2, weights, [("ulysses2", ["parallel.ulysses=2"]),
                                                          ("ring2", ["parallel.ring=2"]),
                                                          ("tp2", ["parallel.tp=2"])], str(root))[0])
    results.update(run_launched(_sp_worker, 4, weights, [("ulysses2xring2", ["parallel.ulysses=2",
                                                                             "parallel.ring=2"])], str(root))[0])
    return results


@pytest.mark.parametrize("layout", ["ulysses2", "ring2", "ulysses2xring2", "tp2"])
@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_sequence_parallel_sampling_equals_one_process(sampled, layout, mode) -> None:
    ref, got = sampled[("single", mode)], sampled[(layout, mode)]
    assert ref.shape == got.shape == (2, 3, 3, 6, 6)
    err = (got - ref).abs().max().item()
    print(f"{layout} {mode}: max |sp - single| = {err:.2e} (|single| up to {ref.abs().max():.2f})")
    assert err <= TOLERANCE, f"{layout} {mode}: max |sp - single| = {err:.2e}"


def test_sample_layout_must_use_every_rank(weights, tmp_path) -> None:
    """Two processes with no sequence-parallel degree would sample the same clip twice: one line, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": "0",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    proc = subprocess.run([sys.executable, "-m", "megasora", "sample", "--weights", str(weights), "--prompt", "x",
                           "--steps", "1", "--out", str(tmp_path / "x.mp4")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "megasora: parallel layout error: sampling with 2 process(es)" in proc.stderr.strip().splitlines()[-1]


def test_attention_matters_in_the_compared_model(weights) -> None:
    """Mean attention over the keys instead of real attention changes the velocity: the SP comparison
    exercises the sharded attention, not only the per-token layers."""
    from safetensors.torch import load_file

    from megasora.config import config_from_dict
    from megasora.models import build_dit
    model = build_dit(config_from_dict(json.loads(weights.with_suffix(".json").read_text())))
    model.load_state_dict(load_file(str(weights)))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 3, 3, 6, 6, generator=g), torch.full((1,), 0.5)
    text, mask = torch.randn(1, 4, 384, generator=g), torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        real = model(x, t, text, mask)
        for block in model.blocks:
            block.attn.attention = lambda q, k, v, m: v.mean(dim=2, keepdim=True).expand_as(v)
        flat = model(x, t, text, mask)
    assert (real - flat).abs().max() > 1e-2 * real.abs().max()
