"""MegaSora's Wan family (models/wan.py) vs diffusers' WanTransformer3DModel: forward + backward, CPU fp32.

The same weights on both sides: a random WanTransformer3DModel is saved and loaded with
megasora.models.from_diffusers (outputs are checked to agree first). One training-like step
each — forward on a (B, 16, T, H, W) latent, 512 text tokens (Wan's padded UMT5 context), the
mean square of the output backward — interleaved A B B A so drift and the other processes on
this machine load both sides alike. Reports the median step time (the thread's CPU time:
the machine is shared) of each side and the median over ABBA blocks of (ours + ours) / (theirs + theirs).

    OMP_NUM_THREADS=1 python bench/bench_wan.py --reps 12

Optional --profile prints torch.profiler's top ops for one step of each side.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch
from diffusers import WanTransformer3DModel

from megasora.models import from_diffusers

# Tiny-ish: 6 heads of 64 (Wan's RoPE split at head dim 64: 12 / 10 / 10 pairs), 4 blocks.
CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=64, in_channels=16, out_channels=16,
              text_dim=512, freq_dim=256, ffn_dim=1536, num_layers=4, cross_attn_norm=True)
LATENTS = (1, 16, 5, 16, 24)  # 5 x 8 x 12 = 480 video tokens
TEXT_LEN, CAPTION = 512, 40


def build() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    theirs = WanTransformer3DModel(**CONFIG)
    with tempfile.TemporaryDirectory() as path:
        theirs.save_pretrained(path)
        ours = from_diffusers(path)
    return theirs.train(), ours.train()


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = torch.randn(1, CAPTION, CONFIG["text_dim"], generator=g)
    mask = torch.ones(1, CAPTION, dtype=torch.bool)
    return {"latents": torch.randn(*LATENTS, generator=g), "t": torch.tensor([0.6]), "text": text, "mask": mask,
            "padded": torch.nn.functional.pad(text, (0, 0, 0, TEXT_LEN - CAPTION))}


def step_theirs(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(x["latents"], x["t"] * 1000, x["padded"], return_dict=False)[0]
    out.square().mean().backward()
    return out


def step_ours(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(x["latents"], x["t"], x["text"], x["mask"])
    out.square().mean().backward()
    return out


def timed(step, model: torch.nn.Module, x: dict[str, torch.Tensor]) -> float:
    """This thread's CPU seconds for one step: with one intra-op thread that is the step's work, and,
    unlike wall time, the other processes sharing the cores do not inflate it."""
    model.zero_grad(set_to_none=True)
    start = time.thread_time()
    step(model, x)
    return time.thread_time() - start


def profile(step, model: torch.nn.Module, x: dict[str, torch.Tensor], label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, x)
    print(f"--- {label}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=12, help="ABBA blocks (each: 2 steps per side)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    theirs, ours = build()
    x = inputs()
    with torch.no_grad():
        a = ours(x["latents"], x["t"], x["text"], x["mask"])
        b = theirs(x["latents"], x["t"] * 1000, x["padded"], return_dict=False)[0]
        diff = (a - b).abs().max().item()
    assert diff < 1e-4, f"the two models disagree by {diff}"
    for _ in range(args.warmup):
        timed(step_ours, ours, x)
        timed(step_theirs, theirs, x)
    ours_s, theirs_s, ratios = [], [], []
    for _ in range(args.reps):  # A B B A
        a1 = timed(step_ours, ours, x)
        b1 = timed(step_theirs, theirs, x)
        b2 = timed(step_theirs, theirs, x)
        a2 = timed(step_ours, ours, x)
        ours_s += [a1, a2]
        theirs_s += [b1, b2]
        ratios.append((a1 + a2) / (b1 + b2))
    params = sum(p.numel() for p in ours.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
          f"model {params / 1e6:.1f}M parameters, {LATENTS[2] * LATENTS[3] * LATENTS[4] // 4} video tokens, "
          f"{TEXT_LEN} text tokens; outputs agree to {diff:.1e}")
    print(f"median step CPU time (forward + backward): MegaSora {statistics.median(ours_s) * 1e3:.1f} ms, "
          f"diffusers {statistics.median(theirs_s) * 1e3:.1f} ms")
    print(f"ratio MegaSora / diffusers: median over {args.reps} ABBA blocks {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    if args.profile:
        profile(step_ours, ours, x, "MegaSora")
        profile(step_theirs, theirs, x, "diffusers")


if __name__ == "__main__":
    main()
