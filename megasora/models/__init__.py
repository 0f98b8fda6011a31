"""Plain single-device models: the DiT (and the Wan family, a DiT), its embeddings, the text encoder."""
from __future__ import annotations

from megasora import kernels
from megasora.config import Config
from megasora.models.convert import from_diffusers
from megasora.models.dit import DiT, DiTArch
from megasora.models.wan import WanArch, WanModel

__all__ = ["DiT", "DiTArch", "WanArch", "WanModel", "build_dit", "dit_arch", "from_diffusers", "wan_arch"]


def dit_arch(cfg: Config) -> DiTArch:
    """The architecture of cfg.model (a WanArch for model.family=wan)."""
    m = cfg.model
    if m.family == "wan":
        return wan_arch(cfg)
    return DiTArch(in_channels=m.in_channels, hidden=m.hidden, depth=m.depth, heads=m.heads,
                   text_dim=cfg.text.dim, patch=m.patch_size, mlp_ratio=m.mlp_ratio,
                   qk_norm=m.qk_norm, rope_theta=m.rope_theta, rope_layout=m.rope_layout,
                   pooled_text=m.pooled_text)


def wan_arch(cfg: Config) -> WanArch:
    m = cfg.model
    ffn = m.ffn_dim or int(m.hidden * m.mlp_ratio)
    return WanArch(in_channels=m.in_channels, hidden=m.hidden, depth=m.depth, heads=m.heads,
                   text_dim=cfg.text.dim, patch=m.patch_size, mlp_ratio=ffn / m.hidden, ffn_dim=ffn,
                   rope_theta=m.rope_theta, text_len=m.text_len, freq_dim=m.freq_dim, eps=m.norm_eps,
                   cross_attn_norm=m.cross_attn_norm)


def build_dit(cfg: Config) -> DiT:
    """The model of cfg.model.family (every family is a DiT: same forward, hooks and parallelize())."""
    kernels.set_backend(cfg.model.kernels)  # a process-wide choice of op implementation, not model state
    arch = dit_arch(cfg)
    return WanModel(arch) if isinstance(arch, WanArch) else DiT(arch)
