"""`megasora sample` modes from a tiny trained checkpoint: shapes, conditioning frames returned exactly
(latent space), SDEdit at strength 0, loops, bad inputs as one line; and train.sample_every previews.

One tiny pixel-space run (shared_runs.SAMPLING: 4 latent frames of 8x8, conditioning masks on) is
trained once for the session (conftest.sampling_run); every mode then runs in-process through the
real CLI with 2 Euler steps.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megasora.data.synthetic import render_clip
from megasora.data.video_io import tensor_to_frames, write_video

from shared_runs import SAMPLING

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # sampling and a tp2/pp2 training (seconds each on 2 busy cores)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Two synthetic clips as real mp4s and an image with a 1:2 aspect ratio."""
    root = tmp_path_factory.mktemp("media")
    paths = {}
    for name, sample_id in (("video", 3), ("video2", 5)):
        clip, _ = render_clip(0, sample_id, 4, 16, 16)
        paths[name] = root / f"{name}.mp4"
        write_video(paths[name], tensor_to_frames(torch.from_numpy(clip)), 8.0)
    wide, _ = render_clip(0, 7, 1, 24, 48)
    paths["image"] = root / "wide.png"
    write_video(paths["image"], tensor_to_frames(torch.from_numpy(wide)), 1.0)
    return paths


def sample(run: Path, tmp_path: Path, *args: str) -> dict:
    """Run `megasora sample` in this process; returns what --save-latents stored."""
    from megasora.cli import main
    saved = tmp_path / "latents.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--run", str(run), "--steps", "2", "--prompt", "a red circle moving left",
              "--out", str(tmp_path / "out.mp4"), "--save-latents", str(saved), *args])
    assert exit_info.value.code == 0
    return torch.load(saved, weights_only=False)


def test_t2v_batch_from_a_prompts_file_at_any_size(sampling_run, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square moving up\n\na green triangle moving down\n")
    out = sample(sampling_run, tmp_path, "--prompts", str(prompts), "--frames", "2", "--height", "6", "--width", "10")
    assert out["latents"].shape == (3, 3, 2, 6, 10)  # --prompt plus the file's two lines
    assert all((tmp_path / f"out_{i}.mp4").stat().st_size > 0 for i in range(3))
    from PIL import Image
    sheet = Image.open(tmp_path / "out_sheet.png")
    assert sheet.size[1] > 3 * 6 * 8  # a row per prompt, 8x zoom


def test_t2i_writes_a_png_of_the_requested_size(sampling_run, tmp_path) -> None:
    out = sample(sampling_run, tmp_path, "--mode", "t2i", "--height", "8", "--width", "12")
    assert out["latents"].shape == (1, 3, 1, 8, 12)
    from PIL import Image
    assert Image.open(tmp_path / "out.png").size == (12 * 8, 8 * 8)


def test_i2v_keeps_the_image_and_its_aspect_ratio(sampling_run, tmp_path, media) -> None:
    out = sample(sampling_run, tmp_path, "--mode", "i2v", "--image", str(media["image"]))
    image = out["inputs"]["image"]
    assert image.shape == (1, 3, 1, 6, 12)  # 24x48 at the training area (64 latents), patch multiples
    assert out["latents"].shape == (1, 3, 4, 6, 12)
    assert torch.equal(out["latents"][:, :, :1], image)


@pytest.mark.parametrize("backward", [False, True])
def test_extend_by_sliding_windows_keeps_the_video(sampling_run, tmp_path, media, backward) -> None:
    extra = ["--backward"] if backward else []
    out = sample(sampling_run, tmp_path, "--mode", "extend", "--video", str(media["video"]), "--frames", "5", *extra)
    video, latents = out["inputs"]["video"], out["latents"]
    assert video.shape == (1, 3, 4, 8, 8) and latents.shape == (1, 3, 9, 8, 8)  # 5 new frames: 3 windows
    kept = latents[:, :, -4:] if backward else latents[:, :, :4]
    assert torch.equal(kept, video)


def test_loop_leads_back_into_the_first_frame(sampling_run, tmp_path, media) -> None:
    out = sample(sampling_run, tmp_path, "--mode", "loop", "--video", str(media["video"]))
    video, latents = out["inputs"]["video"], out["latents"]
    assert latents.shape == (1, 3, 6, 8, 8) and torch.equal(latents[:, :, :4], video)
    # The window the loop was cut from: [video end | generated | video start], held exactly.
    import argparse

    from megasora.commands.sample import load_sampling_model
    from megasora.diffusion.modes import ModeSampler, loop_window
    from megasora.models.text import TextEncoder
    model, cfg, _ = load_sampling_model(argparse.Namespace(weights=None, run=str(sampling_run), tag=None, no_ema=False))
    text, mask = TextEncoder(None, cfg.text.max_length).encode(["a red circle moving left"])
    window = loop_window(ModeSampler(model, cfg, text, mask, steps=2), video, 4, 1)
    assert torch.equal(window[:, :, -1:], video[:, :, :1]) and torch.equal(window[:, :, :1], video[:, :, -1:])
    assert not torch.equal(window[:, :, 1:3], video[:, :, 1:3])  # the middle is generated


def test_connect_holds_both_videos(sampling_run, tmp_path, media) -> None:
    out = sample(sampling_run, tmp_path, "--mode", "connect", "--video", str(media["video"]),
                 "--video2", str(media["video2"]))
    first, second, latents = out["inputs"]["video"], out["inputs"]["video2"], out["latents"]
    assert latents.shape == (1, 3, 10, 8, 8)
    assert torch.equal(latents[:, :, :4], first) and torch.equal(latents[:, :, -4:], second)


def test_edit_at_strength_zero_returns_the_input(sampling_run, tmp_path, media) -> None:
    out = sample(sampling_run, tmp_path, "--mode", "edit", "--video", str(media["video"]), "--strength", "0")
    assert torch.equal(out["latents"], out["inputs"]["video"])
    out = sample(sampling_run, tmp_path, "--mode", "edit", "--video", str(media["video"]), "--strength", "0.7")
    assert out["latents"].shape == out["inputs"]["video"].shape
    assert not torch.equal(out["latents"], out["inputs"]["video"])


@pytest.mark.parametrize("args,message", [
    (["--mode", "i2v", "--image", "/no/such.png"], "--image /no/such.png does not exist"),
    (["--mode", "extend", "--video", "{text}"], "could not be decoded"),
    (["--mode", "loop", "--video", "{image}"], "is an image, but this mode continues or edits a video"),
    (["--height", "7"], "--height 7 is not a positive multiple of the patch size 2"),
    (["--mode", "connect", "--video", "{video}"], "--mode connect needs --video2"),
    (["--mode", "edit", "--video", "{video}", "--strength", "1.5"], "--strength 1.5 is outside [0, 1]"),
])
def test_bad_input_is_one_line(sampling_run, tmp_path, media, capsys, args, message) -> None:
    from megasora.cli import main
    text_file = tmp_path / "notes.mp4"
    text_file.write_text("not a video")
    args = [a.format(text=text_file, image=media["image"], video=media["video"]) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--run", str(sampling_run), "--prompt", "x", "--steps", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("megasora: input error: ") and message in err[0], err
    assert "; " in err[0]  # what, then how to fix it


def test_bad_input_from_the_command_line_has_no_traceback(sampling_run, tmp_path, media) -> None:
    proc = subprocess.run([sys.executable, "-m", "megasora", "sample", "--run", str(sampling_run), "--prompt", "x",
                           "--mode", "edit", "--video", str(media["image"])],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("megasora: input error: --video ")


def test_training_writes_ema_samples_every_n_steps(sampling_run) -> None:
    for step in (2, 4):
        path = sampling_run / "samples" / f"step_{step}.mp4"
        assert path.stat().st_size > 0
    from megasora.data.video_io import iter_video_clips
    clip = next(iter_video_clips(sampling_run / "samples" / "step_4.mp4", 8.0, 4, 1 << 30, 1, 1, 1))
    assert clip.frames.shape[0] == 4 and clip.frames.shape[2] == 2 * clip.frames.shape[1]  # 2 prompts side by side
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(sampling_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]
    assert [e.step for e in events.Images("samples")] == [2, 4]
    assert np.frombuffer(events.Images("samples")[0].encoded_image_string[:3], np.uint8).tobytes() == b"GIF"


def test_latent_runs_encode_inputs_with_their_vae(tmp_path, media) -> None:
    """A VAE run (4 latent channels): i2v and extend encode the inputs with the run's VAE, hold the
    encoded frames exactly and decode the result to pixels at 8x the latent size."""
    import json

    from safetensors.torch import save_file

    from megasora.config import load_config
    from megasora.models import build_dit
    from megasora.models.vae import VAEArch, VideoVAE, save_vae
    torch.manual_seed(0)
    vae_path = tmp_path / "vae.safetensors"
    save_vae(VideoVAE(VAEArch(latent_channels=4, base_channels=8, channel_mult=(1, 1, 1, 1))), str(vae_path))
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.in_channels=4", "model.hidden=32", "data.frames=2",
                                                       "data.height=4", "data.width=4", f"vae.path={vae_path}"])
    weights = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in build_dit(cfg).state_dict().items()}, str(weights))
    weights.with_suffix(".json").write_text(json.dumps(cfg.to_dict()))
    clip, _ = render_clip(0, 9, 9, 32, 32)  # 9 frames -> 3 latent frames; 32 px -> 4 latents
    video = tmp_path / "nine.mp4"
    write_video(video, tensor_to_frames(torch.from_numpy(clip)), 8.0)
    from megasora.cli import main
    for mode, flag, frames, expected in (("i2v", "--image", "2", (1, 4, 2, 4, 4)),
                                         ("extend", "--video", "1", (1, 4, 3, 4, 4))):
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", "--weights", str(weights), "--mode", mode, flag, str(video), "--frames", frames,
                  "--steps", "1", "--prompt", "x", "--out", str(tmp_path / f"{mode}.mp4"),
                  "--save-latents", str(tmp_path / f"{mode}.pt")])
        assert exit_info.value.code == 0
        out = torch.load(tmp_path / f"{mode}.pt", weights_only=False)
        given = out["inputs"]["image" if mode == "i2v" else "video"]
        assert out["latents"].shape == expected
        assert torch.equal(out["latents"][:, :, :given.shape[2]], given)
        from megasora.data.video_io import iter_video_clips
        decoded = next(iter_video_clips(tmp_path / f"{mode}.mp4", 8.0, 64, 1 << 30, 1, 1))
        assert decoded.frames.shape[1:3] == (32, 32)  # through the VAE decoder, no zoom


def _preview_worker(rank: int, world: int, root: str):
    import torch.distributed as dist

    from megasora.config import load_config
    from megasora.train.trainer import train
    for name, parallel in (("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2", "train.grad_accum=2",
                                                                 "train.micro_batch_size=1", "train.zero_stage=1"])):
        overrides = [o for o in SAMPLING if not o.startswith("train.zero_stage")] + ["train.zero_stage=2"]
        cfg = load_config(REPO / "configs" / "tiny.yaml", overrides + parallel + [f"run.dir={root}/{name}",
                                                                                    "train.steps=2"])
        train(cfg)
        dist.barrier()


def test_previews_under_tensor_and_pipeline_parallel(tmp_path) -> None:
    """tp shards the EMA, pp splits it over stages: global rank 0 still samples the whole model."""
    from parallel_utils import run_launched
    run_launched(_preview_worker, 2, str(tmp_path))
    for name in ("tp2", "pp2"):
        assert (tmp_path / name / "samples" / "step_2.mp4").stat().st_size > 0, name
