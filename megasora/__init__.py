"""MegaSora: spacetime diffusion transformers trained with DeepSpeed and Megatron-style parallelism."""

__version__ = "0.1.0"
