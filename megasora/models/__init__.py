"""Plain single-device models: the DiT, its embeddings, the text encoder."""
from __future__ import annotations

from megasora import kernels
from megasora.config import Config
from megasora.models.dit import DiT, DiTArch


def dit_arch(cfg: Config) -> DiTArch:
    m = cfg.model
    return DiTArch(in_channels=m.in_channels, hidden=m.hidden, depth=m.depth, heads=m.heads,
                   text_dim=cfg.text.dim, patch=m.patch_size, mlp_ratio=m.mlp_ratio,
                   qk_norm=m.qk_norm, rope_theta=m.rope_theta, rope_layout=m.rope_layout,
                   pooled_text=m.pooled_text)


def build_dit(cfg: Config) -> DiT:
    kernels.set_backend(cfg.model.kernels)  # a process-wide choice of op implementation, not model state
    return DiT(dit_arch(cfg))
