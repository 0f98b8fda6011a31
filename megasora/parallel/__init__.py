"""Parallelism: mesh (named axes and groups), tensor parallel, Ulysses / ring / USP sequence
parallel, and parallelize() that applies them to a plain model."""
from megasora.parallel.mesh import LayoutError, Mesh, MeshMPU, ParallelLayout, build_mesh
from megasora.parallel.parallelize import init_parallel, parallelize

__all__ = ["LayoutError", "Mesh", "MeshMPU", "ParallelLayout", "build_mesh", "init_parallel", "parallelize"]
