"""Builds the csrc/ extension (megasora._C, and megasora._C_cuda with a CUDA toolkit).

Everything else about the package (metadata, dependencies, console script) is in pyproject.toml.
The extension compiles against the torch already installed, so install without build isolation:
`pip install --no-build-isolation -e .[dev]` (launch/bootstrap.sh).
"""
import os
import sys

from setuptools import setup


def _extensions() -> dict:
    """The csrc/ ops: CPU extension always, CUDA extension with a CUDA toolkit + CUDA torch.

    torch is imported here, not at module level, so metadata queries work without it.
    MEGASORA_CUDA=1 forces the CUDA build, MEGASORA_CUDA=0 skips it.
    """
    try:
        import torch
        from torch.utils import cpp_extension as ext
    except ImportError:
        print("megasora: torch not importable at build time; building without csrc/ ops (the first run "
              "JIT-builds them; or use pip install --no-build-isolation to build them now)", file=sys.stderr)
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    cxx = ["-O3", "-fopenmp"]
    modules = [ext.CppExtension("megasora._C", ["csrc/ops_cpu.cpp"], include_dirs=[csrc],
                                extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    want_cuda = os.environ.get("MEGASORA_CUDA")
    if want_cuda is None:
        want_cuda = torch.version.cuda is not None and ext.CUDA_HOME is not None
    else:
        want_cuda = want_cuda == "1"
    if want_cuda:
        if torch.version.cuda is None or ext.CUDA_HOME is None:
            raise RuntimeError("MEGASORA_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
                               f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={ext.CUDA_HOME})")
        nvcc = ["-O3"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # A100 and H100, plus PTX so newer GPUs can JIT.
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
        sources = ["csrc/cuda/ops_cuda.cpp", "csrc/cuda/norm.cu", "csrc/cuda/rope.cu", "csrc/cuda/merge.cu"]
        modules.append(ext.CUDAExtension("megasora._C_cuda", sources, include_dirs=[csrc],
                                         extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc}))
    return {"ext_modules": modules, "cmdclass": {"build_ext": ext.BuildExtension}}


# Metadata, dependencies and the console script are in pyproject.toml; this file only adds csrc/.
setup(**_extensions())
