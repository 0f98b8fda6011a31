"""Rectified-flow objective, timestep sampling and the Euler sampler."""
from __future__ import annotations

import pytest
import torch

from megasora.config import DiffusionConfig
from megasora.diffusion.flow import masked_mse, noise_batch, resolution_shift, shift_timesteps
from megasora.diffusion.sampler import sample_euler, sampling_timesteps
from megasora.models.dit import DiT, DiTArch


def test_flow_interpolation_and_velocity_target() -> None:
    x0 = torch.randn(3, 2, 4, 4, 4)
    nb = noise_batch(x0, torch.tensor([0, 1, 2]), step=0, seed=0, cfg=DiffusionConfig(), patch=(1, 2, 2))
    t = nb.t_tokens.view(3, 1, 1, 1, 1)
    noise = nb.target + x0
    assert torch.allclose(nb.x_t, (1 - t) * x0 + t * noise, atol=1e-6)
    assert nb.t_tokens.shape == (3,) and ((nb.t_tokens > 0) & (nb.t_tokens < 1)).all()
    assert torch.equal(nb.loss_mask, torch.ones(3, 1, 4, 1, 1))


def test_noise_depends_on_sample_id_not_batch_position() -> None:
    x0 = torch.randn(2, 2, 2, 4, 4)
    cfg = DiffusionConfig()
    a = noise_batch(x0, torch.tensor([5, 9]), 3, 0, cfg, (1, 2, 2))
    b = noise_batch(x0.flip(0), torch.tensor([9, 5]), 3, 0, cfg, (1, 2, 2))
    assert torch.equal(a.x_t, b.x_t.flip(0)) and torch.equal(a.t_tokens, b.t_tokens.flip(0))
    c = noise_batch(x0, torch.tensor([5, 9]), 4, 0, cfg, (1, 2, 2))
    assert not torch.equal(a.x_t, c.x_t)  # a new step draws new noise


def test_conditioning_frames_get_t0_per_token_and_no_loss() -> None:
    x0 = torch.randn(2, 2, 4, 4, 4)
    cfg = DiffusionConfig(cond_frames_prob=1.0)
    nb = noise_batch(x0, torch.tensor([0, 1]), 0, 0, cfg, patch=(1, 2, 2))
    tokens_per_frame = 2 * 2
    assert nb.t_tokens.shape == (2, 4 * tokens_per_frame)
    assert (nb.t_tokens[:, :tokens_per_frame] == 0).all() and (nb.t_tokens[:, tokens_per_frame:] > 0).all()
    assert torch.equal(nb.x_t[:, :, 0], x0[:, :, 0])  # the clean frame is given as is
    assert (nb.loss_mask[:, :, 0] == 0).all() and (nb.loss_mask[:, :, 1:] == 1).all()


def test_masked_mse_ignores_masked_elements() -> None:
    pred, target = torch.zeros(1, 1, 2, 1, 1), torch.tensor([1.0, 100.0]).view(1, 1, 2, 1, 1)
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1, 1)
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.0)


def test_logit_normal_timesteps_and_resolution_shift() -> None:
    cfg = DiffusionConfig(shift_base_tokens=256, max_shift=4.0)
    assert resolution_shift(256, cfg) == 1.0 and resolution_shift(1024, cfg) == 2.0
    assert resolution_shift(10 ** 7, cfg) == 4.0
    t = torch.linspace(0, 1, 11)
    shifted = shift_timesteps(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    ts = torch.stack([noise_batch(torch.zeros(1, 1, 1, 2, 2), torch.tensor([i]), 0, 0, DiffusionConfig(),
                                  (1, 2, 2)).t_tokens[0] for i in range(400)])
    logits = torch.logit(ts)
    assert abs(logits.mean()) < 0.2 and abs(logits.std() - 1.0) < 0.15


@pytest.mark.parametrize("shape", [(1, 3, 1, 4, 4), (2, 3, 3, 6, 10), (1, 3, 5, 8, 2)])
def test_sampler_produces_any_requested_size(shape) -> None:
    torch.manual_seed(0)
    model = DiT(DiTArch(in_channels=3, hidden=24, depth=1, heads=2, text_dim=8))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    text, mask = torch.randn(shape[0], 4, 8), torch.ones(shape[0], 4, dtype=torch.bool)
    out = sample_euler(model, shape, text, mask, DiffusionConfig(), steps=3, guidance=3.0, patch=(1, 2, 2))
    assert out.shape == shape and torch.isfinite(out).all()


def test_sampler_keeps_conditioning_frames() -> None:
    torch.manual_seed(0)
    model = DiT(DiTArch(in_channels=3, hidden=24, depth=1, heads=2, text_dim=8))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cond = torch.randn(1, 3, 1, 4, 4)
    out = sample_euler(model, (1, 3, 3, 4, 4), torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool),
                       DiffusionConfig(), steps=2, cond_latents=cond)
    assert torch.equal(out[:, :, :1], cond)


def test_sampling_schedule_runs_from_noise_to_data() -> None:
    times = sampling_timesteps(10, 1024, DiffusionConfig())
    assert times[0] == 1 and times[-1] == 0 and (times[1:] < times[:-1]).all()
