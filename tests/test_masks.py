"""Training-side conditioning masks (megasora/diffusion/masks.py): kinds, draws, the noised batch,
config, and parallel == single with masks on (ring2, tp2, pp2 against one process)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megasora.config import CondMasksConfig, ConfigError, DiffusionConfig, load_config
from megasora.diffusion.flow import noise_batch, sample_generator
from megasora.diffusion.masks import MASK_KINDS, draw_frame_mask, frame_mask, mask_probabilities

from parallel_utils import run_launched

REPO = Path(__file__).resolve().parents[1]


def test_fixed_kinds() -> None:
    assert frame_mask("none", 4).tolist() == [False] * 4
    assert frame_mask("first_frame", 4).tolist() == [True, False, False, False]
    assert frame_mask("last_frame", 4).tolist() == [False, False, False, True]
    assert frame_mask("first_last", 4).tolist() == [True, False, False, True]
    assert frame_mask("head", 4, 3).tolist() == [True, True, True, False]
    assert frame_mask("tail", 4, 2).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="unknown conditioning mask"):
        frame_mask("middle", 4)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_drawn_masks_keep_a_frame_to_generate(kind: str) -> None:
    probs = {k: float(k == kind) for k in MASK_KINDS}
    for i in range(200):
        mask = draw_frame_mask(0.5, sample_generator(0, i, 0), 3, probs)
        assert mask.any() and not mask.all(), (kind, mask)
    assert not draw_frame_mask(0.5, sample_generator(0, 0, 0), 1, probs).any()  # one frame: nothing to condition


def test_mask_frequencies_follow_the_config() -> None:
    cfg = DiffusionConfig(cond_masks=CondMasksConfig(first_frame=0.25, tail=0.25, random=0.25))
    x0 = torch.randn(400, 1, 4, 2, 2)
    nb = noise_batch(x0, torch.arange(400), 7, 0, cfg, (1, 2, 2))
    cond = nb.loss_mask[:, 0, :, 0, 0] == 0  # (B, T)
    first_only = (cond == frame_mask("first_frame", 4)).all(1).float().mean()
    none = (~cond.any(1)).float().mean()
    assert abs(none - 0.25) < 0.07 and first_only > 0.2  # random masks can also be [1, 0, 0, 0]


def test_conditioning_frames_are_clean_with_t0_and_no_loss() -> None:
    cfg = DiffusionConfig(cond_masks=CondMasksConfig(random=0.5, first_last=0.5))
    x0 = torch.randn(16, 2, 4, 4, 4)
    nb = noise_batch(x0, torch.arange(16), 3, 0, cfg, (1, 2, 2))
    tokens_per_frame = 4
    assert nb.t_tokens.shape == (16, 4 * tokens_per_frame)
    for i in range(16):
        cond = nb.loss_mask[i, 0, :, 0, 0] == 0
        assert cond.any() and not cond.all()
        assert torch.equal(nb.x_t[i][:, cond], x0[i][:, cond])  # given as is
        assert not torch.equal(nb.x_t[i][:, ~cond], x0[i][:, ~cond])
        t_frames = nb.t_tokens[i].view(4, tokens_per_frame)
        assert (t_frames[cond] == 0).all() and (t_frames[~cond] > 0).all()


def test_masks_respect_temporal_patches() -> None:
    cfg = DiffusionConfig(cond_masks=CondMasksConfig(random=1.0))
    nb = noise_batch(torch.randn(32, 1, 6, 2, 2), torch.arange(32), 0, 0, cfg, (2, 2, 2))
    latent = nb.loss_mask[:, 0, :, 0, 0].view(32, 3, 2)
    assert torch.equal(latent[..., 0], latent[..., 1])  # both latent frames of a patch agree
    assert nb.t_tokens.shape == (32, 3)


def test_cond_frames_prob_is_the_old_name_of_first_frame() -> None:
    x0 = torch.randn(32, 1, 3, 2, 2)
    old = noise_batch(x0, torch.arange(32), 1, 5, DiffusionConfig(cond_frames_prob=0.5), (1, 2, 2))
    new = noise_batch(x0, torch.arange(32), 1, 5, DiffusionConfig(cond_masks=CondMasksConfig(first_frame=0.5)),
                      (1, 2, 2))
    assert torch.equal(old.x_t, new.x_t) and torch.equal(old.t_tokens, new.t_tokens)
    assert 0 < (old.loss_mask[:, 0, 0, 0, 0] == 0).sum() < 32
    assert mask_probabilities(DiffusionConfig(cond_frames_prob=0.3))["first_frame"] == 0.3


@pytest.mark.parametrize("overrides,message", [
    (["diffusion.cond_masks.head=0.7", "diffusion.cond_masks.tail=0.5"], "sum to 1.2 > 1"),
    (["diffusion.cond_masks.random=-0.1"], "must be a probability"),
    (["diffusion.cond_frames_prob=0.2", "diffusion.cond_masks.first_frame=0.2"], "old name"),
    (["diffusion.cond_masks.middle=0.2"], "valid keys in `diffusion.cond_masks`"),
])
def test_bad_mask_configs_name_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", overrides)


# ---------------------------------------------------------------- parallel == single with masks

STEPS = 5
BASE = ["model.hidden=32", "model.heads=4", "model.depth=2", "model.mlp_ratio=2.0",
        "data.frames=3", "data.height=6", "data.width=6", "data.num_samples=16",
        f"train.steps={STEPS}", "train.warmup_steps=0", "train.lr=1e-2", "train.ema_decay=0",
        "train.zero_stage=2", "train.grad_clip=1.0", "train.grad_accum=2", "train.micro_batch_size=2",
        # every kind, so a global batch mixes per-token and per-sample timesteps
        "diffusion.cond_masks.first_frame=0.15", "diffusion.cond_masks.last_frame=0.15",
        "diffusion.cond_masks.first_last=0.15", "diffusion.cond_masks.head=0.15",
        "diffusion.cond_masks.tail=0.15", "diffusion.cond_masks.random=0.15",
        # and the prompt-following architecture (configs/tiny-prompt.yaml; tests/test_golden.py covers
        # the default): mixed RoPE tables, sharded like axial ones, and the pooled caption in adaLN
        "model.rope_layout=mixed", "model.pooled_text=true"]
# dp2 splits each micro-batch of 2 samples over two ranks (1 each): the mean must not depend on how
# the conditioning frames fall between ranks.
LAYOUTS = {"ring2": ["parallel.ring=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"],
           "dp2": ["train.micro_batch_size=1"]}
WIDE_LAYOUTS = {"pp2xring2": ["parallel.pp=2", "parallel.ring=2"]}  # world 4: stages send span inputs


def _train_worker(rank: int, world: int, cases: list[tuple[str, list[str]]], root: str):
    from megasora.train.trainer import train
    out = {}
    for name, parallel in cases:
        cfg = load_config(REPO / "configs" / "tiny.yaml", BASE + parallel + [f"run.dir={root}/{name}"])
        out[name] = train(cfg).losses
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def masked_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("masked_golden"))
    runs = run_launched(_train_worker, 1, [("single", [])], root)[0]
    runs.update(run_launched(_train_worker, 2, list(LAYOUTS.items()), root)[0])
    runs.update(run_launched(_train_worker, 4, list(WIDE_LAYOUTS.items()), root)[0])
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS) + list(WIDE_LAYOUTS))
def test_parallel_equals_single_with_masks(masked_runs, layout) -> None:
    ref = masked_runs["single"]
    assert sorted(ref) == list(range(1, STEPS + 1)) and ref[STEPS] != ref[1]
    for step, loss in ref.items():
        got = masked_runs[layout][step]
        assert abs(got - loss) <= 1e-5 * abs(loss), f"{layout} step {step}: {got:.8f} vs single {loss:.8f}"
