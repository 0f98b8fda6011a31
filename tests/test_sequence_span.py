"""Sharding the sequence before it exists whole (issue 22 item 1).

Each sequence rank is handed only its span of a clip's tokens: its latent frames, the noise
of those frames (drawn per token frame), per-token timesteps and loss mask for its tokens,
RoPE rows for its positions, and the loss of its tokens summed exactly over sp. The unit
tests check that the spans of any degree reassemble one process's values bit for bit; the
golden run trains ring3 on 20-token clips (one padding token on the last rank) with every
kind of conditioning mask on, against one process (losses, gradient norms, parameters).
ulysses2, ring2, tp2 x ulysses2 (tests/test_golden.py) and pp2 x ring2 (tests/test_pipeline.py)
train the same span path on 27-token clips with per-token timesteps.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_golden import _full_params, _grad_norms, _initial_params

from megasora.config import CondMasksConfig, ConfigError, DiffusionConfig, load_config
from megasora.diffusion.flow import clip_grid, noise_batch, noise_span
from megasora.errors import DataError
from megasora.models.dit import DiT, DiTArch
from megasora.models.embeddings import rope_3d, rope_at
from megasora.models.patch import patchify
from megasora.parallel.sequence import sequence_span

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]
MASKS = CondMasksConfig(first_frame=0.15, last_frame=0.15, first_last=0.15, head=0.15, tail=0.15, random=0.15)


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7])
def test_spans_reassemble_the_whole_noised_clip(shards):
    x0, ids, patch = torch.randn(4, 3, 6, 4, 6), torch.tensor([3, 8, 13, 21]), (2, 2, 2)
    cfg = DiffusionConfig(cond_masks=MASKS)
    whole = noise_batch(x0, ids, 5, 0, cfg, patch)
    grid = clip_grid(x0, patch)  # (3, 2, 3): 18 tokens, padded for 4 and 7
    spans = [sequence_span(grid, shards, r) for r in range(shards)]
    parts = [noise_span(s.latent_rows(x0, patch[0]), ids, 5, 0, cfg, patch, s) for s in spans]
    n = grid[0] * grid[1] * grid[2]
    assert torch.equal(torch.cat([p.x_t for p in parts], 1)[:, :n], patchify(whole.x_t, patch))
    assert torch.equal(torch.cat([p.target for p in parts], 1)[:, :n], patchify(whole.target, patch))
    mask = torch.cat([p.loss_mask for p in parts], 1)
    assert mask[:, n:].sum() == 0  # padding carries no loss
    assert torch.equal(mask[:, :n, 0], patchify(whole.loss_mask.expand_as(x0), patch)[..., 0])
    per_sample = whole.loss_mask.expand_as(x0).flatten(1).sum(dim=1)
    assert all(torch.equal(p.loss_elements, per_sample) for p in parts)
    if whole.t_tokens.dim() == 2:  # some sample has conditioning frames: per-token timesteps, per span
        assert torch.equal(torch.cat([p.t_tokens for p in parts], 1)[:, :n], whole.t_tokens)


def test_rope_rows_of_a_span_are_the_whole_tables_rows():
    grid, head_dim = (5, 3, 4), 16
    cos, sin = rope_3d(grid, head_dim, layout="mixed")
    assert cos.dtype == torch.float32
    positions = torch.arange(17, 41)
    part_cos, part_sin = rope_at(positions, grid, head_dim, layout="mixed")
    assert torch.equal(part_cos, cos[17:41]) and torch.equal(part_sin, sin[17:41])


def test_span_tokens_through_the_model_equal_the_whole_clip():
    """One process: the patch tokens of the whole span in, their velocity out == the latent path."""
    torch.manual_seed(0)
    model = DiT(DiTArch(in_channels=3, hidden=32, depth=2, heads=4, text_dim=8, patch=(1, 2, 2)))
    for p in model.parameters():  # open the adaLN-Zero gates so every block matters
        torch.nn.init.normal_(p, std=0.05)
    latents, text = torch.randn(2, 3, 3, 4, 6), torch.randn(2, 5, 8)
    mask, t = torch.ones(2, 5, dtype=torch.bool), torch.rand(2, 18)
    whole = model(latents, t, text, mask)
    tokens = model(patchify(latents, (1, 2, 2)), t, text, mask, grid=(3, 2, 3))
    assert torch.allclose(patchify(whole, (1, 2, 2)), tokens, atol=1e-6, rtol=0)


def test_a_degree_above_the_token_count_is_one_line():
    with pytest.raises(DataError, match=r"a clip of 4 tokens .* cannot be split over 8 sequence ranks"):
        sequence_span((1, 2, 2), 8, 0)
    with pytest.raises(ConfigError, match=r"parallel.tp\*ulysses\*ring=8 exceeds the 4 tokens"):
        load_config(REPO / "configs" / "tiny.yaml", ["parallel.ring=8", "data.frames=1", "data.height=4",
                                                      "data.width=4"])


STEPS = 8
BASE = ["model.hidden=32", "model.heads=4", "model.depth=2", "model.mlp_ratio=2.0",
        "data.frames=5", "data.height=4", "data.width=4", "data.num_samples=16",  # 5 x 2 x 2 = 20 tokens
        f"train.steps={STEPS}", "train.warmup_steps=0", "train.lr=1e-2", "train.ema_decay=0",
        "train.zero_stage=2", "train.grad_clip=1.0", "train.micro_batch_size=4",
        *(f"diffusion.cond_masks.{kind}=0.15" for kind in ("first_frame", "last_frame", "first_last", "head",
                                                           "tail", "random"))]


def _train_worker(rank: int, world: int, parallel: list[str], root: str):
    from megasora.train.trainer import train
    cfg = load_config(REPO / "configs" / "tiny.yaml", BASE + parallel + [f"run.dir={root}/{world}"])
    losses = train(cfg).losses
    dist.barrier()
    result = (losses, _full_params(cfg, world), _grad_norms(Path(cfg.run.dir)))
    return result if rank == 0 else None


@pytest.mark.slow
def test_ring3_with_padding_and_masks_equals_one_process(tmp_path):
    ref_losses, ref_params, ref_norms = run_launched(_train_worker, 1, [], str(tmp_path))[0]
    losses, params, norms = run_launched(_train_worker, 3, ["parallel.ring=3"], str(tmp_path))[0]
    assert sorted(losses) == list(range(1, STEPS + 1)) and max(ref_norms.values()) > 1.0
    for step, ref in ref_losses.items():
        assert abs(losses[step] - ref) <= 1e-5 * abs(ref), f"step {step}: {losses[step]} vs {ref}"
        assert abs(norms[step] - ref_norms[step]) <= 1e-5 * ref_norms[step], f"step {step} grad norm"
    moved = max((ref_params[k] - p0).abs().max().item() for k, p0 in _initial_params().items())
    assert moved > 1e-3, "training did not change the parameters; the comparison would be vacuous"
    for name, ref in ref_params.items():
        err = (params[name] - ref).abs().max().item()
        assert err <= 1e-4, f"parameter {name} differs by {err:.2e}"
