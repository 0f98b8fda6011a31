"""`megasora env`: what a bug report needs, like DeepSpeed's ds_report.

Versions of Python, torch (+ CUDA, NCCL), DeepSpeed and the data/model libraries, OpenMPI;
whether the csrc extensions load (prebuilt or JIT-built) and which kernels run; whether NVIDIA
apex is importable; the devices torch sees; and the launcher environment this process is in.
Paste its output into bug reports. It imports but never initialises a process group.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

import torch

import megasora
from megasora import kernels
from megasora.kernels import fused
from megasora.launcher.env import LaunchError, discover
from megasora.train.engine import apex_fused_adam

PACKAGES = [("deepspeed", "deepspeed"), ("transformers", "transformers"), ("diffusers", "diffusers"),
            ("webdataset", "webdataset"), ("av", "PyAV"), ("mpi4py", "mpi4py"), ("numpy", "numpy"),
            ("safetensors", "safetensors")]
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "TORCH_EXTENSIONS_DIR", "MEGASORA_CACHE", "MEGASORA_JIT", "DS_ACCELERATOR",
            "OMP_NUM_THREADS", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("env", help="versions, extensions, kernels, devices, launcher (for bug reports)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--no-build", action="store_true",
                   help="only look for the prebuilt extension; do not JIT-build a missing one")
    p.set_defaults(func=run)


def version_of(module: str) -> str:
    """Installed version of a distribution/module, or why it is missing (never raises)."""
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed (version unknown)"))
    except Exception as err:  # a broken install is exactly what this report is for
        return f"not installed ({type(err).__name__})"


def openmpi_version() -> str:
    if shutil.which("mpirun") is None:
        return "not found (no mpirun on PATH)"
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"mpirun failed ({type(err).__name__})"
    return out.strip().splitlines()[0] if out.strip() else "mpirun printed nothing"


def torch_section() -> dict[str, Any]:
    nccl = "n/a"
    if torch.cuda.is_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as err:  # CUDA build without NCCL
            nccl = f"unavailable ({type(err).__name__})"
    from torch.utils.cpp_extension import CUDA_HOME  # lazy: loads setuptools (0.3 s) for one line of `env`
    return {"torch": torch.__version__, "torch CUDA build": torch.version.cuda or "none (CPU build)",
            "CUDA toolkit (CUDA_HOME)": CUDA_HOME or "not found", "NCCL": nccl,
            "torch threads": torch.get_num_threads()}


def devices() -> list[str]:
    if not torch.cuda.is_available():
        return [f"cpu ({os.cpu_count()} cores); no CUDA device visible"]
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {p.name}, {p.total_memory / 2 ** 30:.0f} GiB, sm_{p.major}{p.minor}")
    return out


def kernels_section(build: bool) -> dict[str, Any]:
    if build:
        fused.ensure_loaded()  # JIT-builds a missing extension, as training would
    return {"CPU extension": fused.HOW if fused.AVAILABLE else f"unavailable: {fused.LOAD_ERROR}",
            "CUDA extension": fused.CUDA_HOW if fused.CUDA_AVAILABLE else f"unavailable: {fused.CUDA_LOAD_ERROR}",
            "model.kernels=auto runs": kernels.describe()}


def optimizer_section() -> dict[str, Any]:
    apex = apex_fused_adam()
    return {"NVIDIA apex FusedAdam": f"importable ({apex.__module__})" if apex else "not importable "
            "(train.optimizer=apex_adam unavailable)",
            "DeepSpeed CPUAdam op": deepspeed_op_status("CPUAdamBuilder"),
            "DeepSpeed FusedAdam op": deepspeed_op_status("FusedAdamBuilder")}


def deepspeed_op_status(name: str) -> str:
    """Whether DeepSpeed could build the op here (its own compatibility check; no build)."""
    try:
        from deepspeed.accelerator import get_accelerator  # lazy: DeepSpeed takes seconds; a broken install is reported
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            return f"not offered by the {get_accelerator().device_name()} accelerator"
        where = f"on the {get_accelerator().device_name()} accelerator"
        ok = builder.is_compatible(verbose=False)
        return f"compatible {where} (JIT-built on first use)" if ok else f"incompatible {where}"
    except Exception as err:
        return f"unknown ({type(err).__name__}: {err})"


def launcher_section() -> dict[str, Any]:
    try:
        found = discover()
        launch = (f"{found.launcher}: rank {found.rank}/{found.world_size}, local rank {found.local_rank}/"
                  f"{found.local_world_size}, master {found.master_addr}:{found.master_port}")
    except LaunchError as err:
        launch = f"invalid: {err}"
    return {"detected": launch, **{k: os.environ[k] for k in ENV_VARS if k in os.environ}}


def collect(build: bool = True) -> dict[str, dict[str, Any]]:
    packages = {label: version_of(module) for module, label in PACKAGES}
    return {
        "system": {"megasora": f"{version_of('megasora')} at {os.path.dirname(megasora.__file__)}",
                   "python": f"{platform.python_version()} ({sys.executable})",
                   "platform": platform.platform(), "OpenMPI": openmpi_version()},
        "torch": torch_section(),
        "packages": packages,
        "devices": {"visible": devices()},
        "kernels": kernels_section(build),
        "optimizers": optimizer_section(),
        "launcher": launcher_section(),
    }


def render(report: dict[str, dict[str, Any]]) -> str:
    width = max(len(k) for section in report.values() for k in section) + 2
    lines = []
    for title, section in report.items():
        lines.append(f"{title}")
        for key, value in section.items():
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                lines.append(f"  {(key if i == 0 else ''):<{width}}{item}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect(build=not args.no_build)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0
