"""Find the compiled csrc/ ops: the prebuilt `megasora._C` (setup.py), else build them on first use.

Like DeepSpeed's JIT ops, a missing prebuilt extension is compiled with
`torch.utils.cpp_extension.load` from the checkout's csrc/ into TORCH_EXTENSIONS_DIR (the
per-checkout cache that launch/bootstrap.sh and tests/run.sh export), once; later processes load
the cached library in milliseconds. Either way the ops register as `torch.ops.megasora.*`.
MEGASORA_JIT=0 turns the build off (then a missing extension stays missing, and says so).

Each `Extension` records how it was found (`how`) or why not (`error`), for the log line at
start, `megasora env` and the one-line error of model.kernels=fused.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megasora.launcher.env import launcher_rank

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[2] / "csrc"  # present in a checkout / editable install
CPU_SOURCES = ["ops_cpu.cpp"]
CUDA_SOURCES = ["cuda/ops_cuda.cpp", "cuda/norm.cu", "cuda/rope.cu", "cuda/merge.cu"]


@dataclass
class Extension:
    available: bool = False
    how: str = ""  # "prebuilt megasora._C" / "JIT-built in <dir>"
    error: str = ""  # why it is not available


def _short(err: BaseException, limit: int = 240) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def jit_enabled() -> bool:
    return os.environ.get("MEGASORA_JIT", "1") != "0"


def build_dir() -> str:
    from torch.utils.cpp_extension import _get_build_directory  # lazy: loads setuptools (0.3 s), for builds only
    return os.path.dirname(_get_build_directory("megasora_jit_cpu", verbose=False))


def import_prebuilt(module: str) -> Extension:
    try:
        __import__(module)
        return Extension(True, f"prebuilt {module}")
    except ImportError as err:  # not built (e.g. an editable install without build_ext), or another torch
        return Extension(False, error=f"prebuilt {module} not importable ({_short(err)})")


def jit_build(name: str, sources: list[str], cuda: bool, prebuilt: Extension) -> Extension:
    """Compile and load `sources` (relative to csrc/) as library `name`; returns what happened."""
    if not jit_enabled():
        return Extension(False, error=f"{prebuilt.error}; JIT build disabled (MEGASORA_JIT=0)")
    missing = [s for s in sources if not (CSRC / s).is_file()]
    if missing:
        return Extension(False, error=f"{prebuilt.error}; cannot JIT-build: {CSRC / missing[0]} not found "
                                      "(csrc/ ships with a checkout, not with a wheel)")
    from torch.utils import cpp_extension  # lazy: loads setuptools (0.3 s), for builds only
    if launcher_rank() == 0:  # every rank builds or waits for the build (a file lock); one says so
        log.warning("megasora.kernels: %s; JIT-building %s from csrc/ into %s (once per checkout, "
                    "minutes)", prebuilt.error, name, build_dir())
    flags = ["-O3", "-fopenmp"] if not cuda else ["-O3"]
    try:
        cpp_extension.load(name=name, sources=[str(CSRC / s) for s in sources], extra_include_paths=[str(CSRC)],
                           extra_cflags=flags, extra_ldflags=["-fopenmp"] if not cuda else [],
                           extra_cuda_cflags=["-O3"] if cuda else None, is_python_module=False, verbose=False)
    except Exception as err:  # compiler missing, headers missing, a build error: report, never crash here
        return Extension(False, error=f"{prebuilt.error}; JIT build failed ({_short(err)})")
    return Extension(True, f"JIT-built in {build_dir()}")


def load_cpu() -> Extension:
    found = import_prebuilt("megasora._C")
    return found if found.available else jit_build("megasora_jit_cpu", CPU_SOURCES, False, found)


def load_cuda() -> Extension:
    """The CUDA kernels; only tried on a CUDA build of torch with a CUDA device and toolkit."""
    found = import_prebuilt("megasora._C_cuda")
    if found.available:
        return found
    if torch.version.cuda is None or not torch.cuda.is_available():
        return Extension(False, error=f"{found.error}; no CUDA device or CUDA build of torch")
    from torch.utils.cpp_extension import CUDA_HOME  # lazy: loads setuptools (0.3 s), for builds only
    if CUDA_HOME is None:
        return Extension(False, error=f"{found.error}; no CUDA toolkit (CUDA_HOME) to JIT-build it")
    return jit_build("megasora_jit_cuda", CUDA_SOURCES, True, found)
