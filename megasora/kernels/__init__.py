"""Hot-spot ops of the DiT. Model code calls these names; the backend is chosen by
`set_backend` ("auto" | "fused" | "torch"), so swapping never changes parameters."""
from megasora.kernels.reference import (
    apply_rope,
    gated_residual,
    gated_residual_modulated_norm,
    merge_attention_partials,
    modulated_norm,
    normalize,
)

__all__ = [
    "apply_rope",
    "gated_residual",
    "gated_residual_modulated_norm",
    "merge_attention_partials",
    "modulated_norm",
    "normalize",
]
