"""What a device can do: peak FLOP/s, memory bytes, link bandwidths. The planner divides by these
(megasora/plan), and training divides by the peak for MFU (train/accounting.py).

Sources (vendor datasheets; bandwidths are per GPU and per direction):

- H100 SXM5 80GB: 989 TFLOP/s dense bf16 (1979 is with 2:4 sparsity), 80 GB HBM3 (nvidia-smi
  reports 81559 MiB), NVLink 4 900 GB/s bidirectional = 450 GB/s each way; one 400 Gb/s
  ConnectX-7 NDR InfiniBand port per GPU (DGX H100) = 50 GB/s.
- H200 SXM 141GB: same compute as H100 (989 TFLOP/s dense bf16), 141 GB HBM3e (143771 MiB),
  NVLink 4 450 GB/s each way, 400 Gb/s NDR per GPU (DGX H200) = 50 GB/s.
- A100 SXM4 80GB: 312 TFLOP/s dense bf16, 80 GB HBM2e (81920 MiB), NVLink 3 600 GB/s
  bidirectional = 300 GB/s each way, one 200 Gb/s HDR port per GPU (DGX A100) = 25 GB/s.
- B200 (HGX/DGX B200): 2250 TFLOP/s dense bf16, 180 GB HBM3e per GPU (DGX B200: 1440 GB for 8),
  NVLink 5 1.8 TB/s bidirectional = 900 GB/s each way, 400 Gb/s ConnectX-7 per GPU = 50 GB/s.

`efficiency` is the fraction of peak a well-tuned bf16 transformer block reaches (large GEMMs
and flash attention, ~50-60% on H100 in Megatron/torchtitan reports); `link_efficiency` the
fraction of link bandwidth NCCL collectives reach (bus bandwidth ~ 70-80% of the wire). Both
are overridable, and both are stated in every `megasora plan` output.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

MIB = 1024 ** 2


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float            # dense bf16 FLOP/s per GPU (on CPU: measured fp32 matmul)
    memory_bytes: float          # device memory per GPU
    intra_bytes_per_s: float     # NVLink (within a node), per GPU per direction
    inter_bytes_per_s: float     # network (across nodes), per GPU per direction
    efficiency: float = 0.5      # achievable fraction of peak_flops
    link_efficiency: float = 0.75  # achievable fraction of link bandwidth
    latency_s: float = 10e-6     # per collective / p2p message start-up
    source: str = ""
    allowance: bool = True       # add memory.py's allocator/workspace allowance (a GPU's caching allocator)


GPUS: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM 80GB", 989e12, 81559 * MIB, 450e9, 50e9, 0.5, 0.75, 10e-6,
                     "NVIDIA H100 datasheet; DGX H100 (8x CX-7 400Gb/s)"),
    "h200": Hardware("H200 SXM 141GB", 989e12, 143771 * MIB, 450e9, 50e9, 0.5, 0.75, 10e-6,
                     "NVIDIA H200 datasheet; DGX H200 (8x CX-7 400Gb/s)"),
    "a100": Hardware("A100 SXM 80GB", 312e12, 81920 * MIB, 300e9, 25e9, 0.5, 0.75, 10e-6,
                     "NVIDIA A100 datasheet; DGX A100 (8x HDR 200Gb/s)"),
    "b200": Hardware("B200 180GB", 2250e12, 180e9, 900e9, 50e9, 0.5, 0.75, 10e-6,
                     "NVIDIA DGX B200 datasheet (8x CX-7 400Gb/s)"),
}


def measure_cpu(size: int = 512, repeats: int = 5) -> Hardware:
    """This machine as a `Hardware`: fp32 matmul FLOP/s (best of `repeats`), RAM, memcpy bandwidth.

    Used to predict CPU runs (gloo over shared memory: both "links" are memory copies), so
    efficiency is 1 (the peak is already an achieved figure).
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    flops = 2 * size ** 3 / best
    buf = torch.empty(16 * MIB, dtype=torch.uint8)
    start = time.perf_counter()
    for _ in range(4):
        buf.clone()
    copy_bw = 4 * buf.numel() / (time.perf_counter() - start)
    ram = _physical_memory_bytes()
    return Hardware("cpu (measured)", flops, ram, copy_bw, copy_bw, 1.0, 1.0, 50e-6,
                    f"measured: {size}^3 fp32 matmul, 16 MiB memcpy", allowance=False)


def _physical_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 16e9
