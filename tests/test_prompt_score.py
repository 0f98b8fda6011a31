"""The prompt score on ground-truth synthetic clips: real clips match, reversed/static/recoloured ones don't."""
from __future__ import annotations

import numpy as np
import pytest

from megasora.data.synthetic import COLORS, DIRECTIONS, render_clip
from megasora.eval.prompt_score import parse_caption, prompt_grid, score_clip, score_clips

SIZES = [(4, 16, 16), (8, 32, 32), (4, 16, 24), (6, 24, 16)]


def clips(size: tuple[int, int, int], count: int = 48, seed: int = 3):
    return [render_clip(seed, i, *size) for i in range(count)]


@pytest.mark.parametrize("size", SIZES)
def test_real_clips_match_their_caption(size):
    for video, caption in clips(size):
        score = score_clip(video, caption)
        assert score.match, (caption, score)


@pytest.mark.parametrize("size", SIZES)
def test_reversed_clips_move_the_opposite_way(size):
    for video, caption in clips(size):
        score = score_clip(video[:, ::-1], caption)
        assert score.color_ok and not score.direction_ok, (caption, score)
        expected = np.asarray(DIRECTIONS[parse_caption(caption).direction])
        assert np.dot(score.displacement, expected) < 0  # really backwards, not just "unclear"


@pytest.mark.parametrize("size", SIZES)
def test_static_clips_match_no_direction(size):
    for video, caption in clips(size):
        static = np.repeat(video[:, :1], video.shape[1], axis=1)
        score = score_clip(static, caption)
        assert score.direction is None and not score.match, (caption, score)


def test_wrong_colour_and_wrong_direction_caption_fail():
    for video, caption in clips((4, 16, 16), 24):
        prompt = parse_caption(caption)
        other_color = next(c for c in COLORS if c != prompt.color)
        other_dir = next(d for d in DIRECTIONS if d != prompt.direction)
        assert not score_clip(video, f"a {other_color} {prompt.shape} moving {prompt.direction}").color_ok
        assert not score_clip(video, f"a {prompt.color} {prompt.shape} moving {other_dir}").direction_ok


def test_noisy_clips_still_match():
    """Samples are not exact renders: additive noise of std 0.15 must not change the verdict."""
    rng = np.random.default_rng(0)
    for video, caption in clips((4, 16, 16)):
        noisy = np.clip(video + rng.normal(0, 0.15, video.shape), -1, 1)
        assert score_clip(noisy, caption).match, caption


def test_empty_clip_has_no_colour_or_motion():
    score = score_clip(np.full((3, 4, 16, 16), -0.9, np.float32), "a red square moving left")
    assert score.color is None and score.direction is None and not score.match


def test_grid_covers_every_colour_and_direction():
    captions = prompt_grid(24)
    prompts = [parse_caption(c) for c in captions]
    assert {p.color for p in prompts} == set(COLORS) and {p.direction for p in prompts} == set(DIRECTIONS)
    assert len(set(captions)) == 24


def test_rates_and_bad_input():
    videos, captions = zip(*clips((4, 16, 16), 8))
    grid = score_clips(np.stack(videos), list(captions))
    assert grid.rate("match") == 1.0 and "both 100%" in grid.summary()
    with pytest.raises(ValueError, match="not a synthetic caption"):
        parse_caption("a red square")
    with pytest.raises(ValueError, match="RGB clip"):
        score_clip(np.zeros((4, 16, 16)), "a red square moving left")


def test_ideal_denoiser_direction_word_only_pays_at_high_noise():
    """The model-free analysis of docs/prompt_following.md on a small 4x8x8 grid."""
    from megasora.diffusion.flow import shift_timesteps
    from megasora.eval.ideal_denoiser import _unshift, training_weights, word_value
    u = np.linspace(0, 1, 11)
    assert np.allclose(_unshift(shift_timesteps(torch_tensor(u), 3.0).numpy(), 3.0), u, atol=1e-6)
    assert abs(training_weights([0.25, 0.5, 0.75], 3.0).sum() - 1) < 1e-9
    value = word_value("direction", [0.2, 0.9], frames=4, height=8, width=8, probes=6)
    low, high = value.gain()
    assert abs(low) < 1e-6 and high > 0.001, value  # frames are legible on their own at t=0.2
    assert value.expected_gain(3.0) > value.expected_gain(1.0) > 0


def torch_tensor(x):
    import torch
    return torch.from_numpy(x).double()


@pytest.mark.parametrize("args,message", [(["--prompts", "0"], "--prompts 0"), (["--min-match", "2"], "not a fraction")])
def test_eval_prompts_bad_input_is_one_line(args, message, capsys, tmp_path):
    from megasora.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-prompts", "--run", str(tmp_path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("megasora: ")
