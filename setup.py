"""MegaSora: Sora-style video diffusion transformers trained at scale."""
from setuptools import find_packages, setup

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
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2"],
    },
    entry_points={"console_scripts": ["megasora=megasora.cli:main"]},
)
