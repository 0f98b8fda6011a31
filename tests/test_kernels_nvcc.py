"""CI compile check of the CUDA sources, no GPU needed: a CUDA build break fails here.

Every csrc/cuda/*.cu compiles standalone with nvcc for sm_80 and sm_90 (the .cu files use
only the CUDA runtime and plain pointers). The torch binding csrc/cuda/ops_cuda.cpp is
syntax-checked with the host compiler against torch's headers and the CUDA toolkit's; the
CPU torch wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h), which the
test writes with the one define a CUDA build of torch ships in it.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]  # as in setup.py


def torch_nvcc_flags() -> list[str]:
    """The flags torch's CUDAExtension adds (C++20, no implicit half/bf16 conversions)."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    except ImportError:
        return ["-std=c++17"]
    return ["-std=c++20", *COMMON_NVCC_FLAGS]


def find_nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or /usr/local/cuda/bin)")


def cuda_include() -> pathlib.Path:
    out = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", "/dev/null"], capture_output=True, text=True)
    for tok in (out.stdout + out.stderr).split():
        if tok.startswith("-I") and (pathlib.Path(tok[2:].strip('"')) / "cuda_runtime_api.h").exists():
            return pathlib.Path(tok[2:].strip('"'))
    return pathlib.Path("/usr/local/cuda/include")


def test_cuda_sources_exist():
    assert {p.name for p in CU_FILES} >= {"norm.cu", "rope.cu", "merge.cu"}


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(cu, tmp_path):
    cmd = [NVCC, "-c", "-O3", *torch_nvcc_flags(), *ARCHS, f"-I{CSRC}", str(cu), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    assert (tmp_path / "k.o").stat().st_size > 0


@needs_nvcc
def test_cuda_binding_compiles(tmp_path):
    torch_utils = pytest.importorskip("torch.utils.cpp_extension")
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    includes = [tmp_path, *torch_utils.include_paths(), cuda_include(), sysconfig.get_paths()["include"], CSRC]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", *(f"-I{p}" for p in includes), str(CSRC / "cuda" / "ops_cuda.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
