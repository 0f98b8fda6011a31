"""Wan 2.1 text-to-video transformer, exact to diffusers' WanTransformer3DModel (docs/wan.md).

It is a DiT (models/dit.py) with the same forward contract — model(latents, t, text, text_mask)
with t in [0, 1] (diffusers' timestep is 1000 t), block ranges for pipeline stages, the
`sequence` and `checkpoint` hooks — and the same module names where the parts are the same
(patch_embed, t_embed, caption, blocks.i.attn / cross_attn / mlp, final), so parallelize(), the
TP plan's linears, activation checkpointing and DiTStage apply unchanged. Where Wan differs:

- conditioning: ONE time projection SiLU -> Linear(D, 6D) shared by all blocks, plus a learned
  (1, 6, D) table per block added to it (the DiT has an adaLN MLP per block). `cond` is
  therefore (B, c, 7D): the raw time embedding (the output head's input) and its 6D projection;
  it crosses pipeline stages as 7c rows of D (pack / unpack).
- qk-norm: RMS over ALL heads' features with a (D,) weight, before the head split
  (HeadsRMSNorm; under tp its mean of squares spans ranks, so parallel code swaps the module).
- RoPE: axial with Wan's 22/21/21 split at head dim 128 (embeddings.wan_rope_axis_dims) and
  adjacent pairs (2i, 2i+1); the q/k rows of self-attention are stored permuted within each
  head (models/convert.py: rope_row_order) so the shared rotate-half kernel applies.
- block: self-attention -> cross-attention (ungated, after an affine LayerNorm) -> FFN, the
  residual adds in fp32.
- text: zeroed past its mask and zero-padded to text_len (512 UMT5 tokens), attended unmasked
  (the padding's identical tokens computed as one, weighted by their count: WanCrossAttention),
  as Wan's pipeline feeds it.
- output: norm with (table + raw time embedding) shift/scale; diffusers' proj_out rows are in
  (pt, ph, pw, C) order, stored here in patchify's (C, pt, ph, pw) (models/convert.py), so the
  DiT's unpatchify and per-token loss apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megasora import kernels
from megasora.models.attention import (
    AttentionProjections,
    CrossAttention,
    RMSNorm,
    SelfAttention,
    local_attention,
    split_heads,
)
from megasora.models.dit import DiT, DiTArch, DiTBlock, Mlp, NoSequenceSharding, ParamInit, TokenState
from megasora.models.embeddings import TimestepEmbedder
from megasora.models.patch import PatchEmbed3D

MODULATIONS = 6  # shift, scale, gate of self-attention, then of the FFN


@dataclass(frozen=True)
class WanArch(DiTArch):
    """DiTArch plus Wan's own hyper-parameters (diffusers config names in the comments)."""
    ffn_dim: int = 0             # ffn_dim; 0 = hidden * mlp_ratio
    text_len: int = 512          # the text encoder's context length (UMT5: 512)
    freq_dim: int = 256          # freq_dim
    eps: float = 1e-6            # eps
    cross_attn_norm: bool = True  # cross_attn_norm
    rope_layout: str = "wan"

    @property
    def ffn_width(self) -> int:
        return self.ffn_dim or int(self.hidden * self.mlp_ratio)


class HeadsRMSNorm(RMSNorm):
    """RMS norm over all heads' features (B, N, H*Dh) with one (H*Dh,) weight (Wan's qk-norm).

    Under tensor parallelism a rank holds H/tp heads, so the mean of squares must be summed
    over the tp group: parallel code replaces this module (it is the seam, not the model).
    """


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (diffusers' FP32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.normalize(x.float(), self.weight, self.bias, self.eps, "layer").type_as(x)


def _heads_qkv(attn: AttentionProjections, x: torch.Tensor, source: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q from x, k/v from source, q/k normalised over all heads before the split: (B, N|L, H, Dh) each."""
    q = split_heads(attn.q_norm(attn.q(x)), attn.head_dim)
    k = split_heads(attn.k_norm(attn.k(source)), attn.head_dim)
    return q, k, split_heads(attn.v(source), attn.head_dim)


class WanSelfAttention(SelfAttention):
    """Self-attention with all-heads qk-norm and 3-D RoPE (q/k rows stored in rotate-half order)."""

    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__(hidden, heads, qk_norm=False)
        self.q_norm = HeadsRMSNorm(hidden, eps)
        self.k_norm = HeadsRMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = _heads_qkv(self, x, x)
        q, k = kernels.apply_rope(q, *rope), kernels.apply_rope(k, *rope)
        out = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_padding_mask)
        return self.out(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, D)


class WanCrossAttention(CrossAttention):
    """Video tokens attend to all text_len text tokens (padding included, as Wan was trained).

    Every zero-padded token has the same key and value, so WanCaption hands over ONE of them
    after the caption's L tokens, and it stands for all text_len - L: its score gets
    + log(text_len - L), i.e. its softmax weight is theirs summed (exact; the output and every
    gradient are those of the text_len-token attention, at L + 1 tokens' cost).
    """

    def __init__(self, hidden: int, heads: int, eps: float, text_len: int = 0) -> None:
        super().__init__(hidden, heads, qk_norm=False)
        self.q_norm = HeadsRMSNorm(hidden, eps)
        self.k_norm = HeadsRMSNorm(hidden, eps)
        self.text_len = text_len

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in _heads_qkv(self, x, text))  # (B, H, N|L, Dh)
        rows = text.shape[1]
        if rows < self.text_len:  # the last row stands for text_len - rows + 1 padded tokens
            bias = torch.zeros(rows, dtype=q.dtype, device=q.device)
            bias[-1] = math.log(self.text_len - rows + 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[2], rows))  # (N, L+1)
        else:
            out = local_attention(q, k, v, None)
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


class WanBlock(DiTBlock):
    """x += g1*attn(mod(x)); x += cross(norm(x)); x += g2*ffn(mod(x)), residuals in fp32.

    (shift, scale, gate) x 2 = scale_shift_table + the model's shared 6D time projection.
    """

    def __init__(self, arch: WanArch) -> None:
        nn.Module.__init__(self)  # DiTBlock.__init__ would build the DiT's adaLN MLP
        d = arch.hidden
        self.eps = arch.eps
        self.attn = WanSelfAttention(d, arch.heads, arch.eps)
        self.cross_norm = WanLayerNorm(d, eps=arch.eps) if arch.cross_attn_norm else nn.Identity()  # type: ignore[assignment]
        self.cross_attn = WanCrossAttention(d, arch.heads, arch.eps, arch.text_len)
        self.mlp = Mlp(d, arch.mlp_ratio, arch.ffn_width)
        self.scale_shift_table = nn.Parameter(torch.empty(1, MODULATIONS, d))
        self.checkpoint = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This module's own parameter, as diffusers draws it: randn / sqrt(D)."""
        with torch.no_grad():
            self.scale_shift_table.copy_(torch.randn_like(self.scale_shift_table) / self.scale_shift_table.shape[-1] ** 0.5)

    def body(self, state: TokenState, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = state.x
        d = x.shape[-1]
        mod = self.scale_shift_table.float() + state.cond[..., d:].unflatten(-1, (MODULATIONS, d)).float()
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)  # (B, c, D) each
        h = kernels.modulated_norm(x.float(), shift1, scale1, eps=self.eps).type_as(x)
        attn_out = self.attn(h, state.rope, state.key_padding_mask)
        x = kernels.gated_residual(x.float(), gate1, attn_out).type_as(x)
        x = x + self.cross_attn(self.cross_norm(x), text, text_mask)
        h = kernels.modulated_norm(x.float(), shift2, scale2, eps=self.eps).type_as(x)
        return kernels.gated_residual(x.float(), gate2, self.mlp(h).float()).type_as(x)


class WanTimeEmbedding(TimestepEmbedder):
    """t (B,) or (B, N) -> cond (B, c, 7D): the time embedding and its shared 6D projection.

    The projection lives here, on the embedding side, so a pipeline's first stage owns it
    and its gradient flows back through the message like the embedding's.
    """

    def __init__(self, hidden: int, freq_dim: int) -> None:
        super().__init__(hidden, freq_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, MODULATIONS * hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        temb = super().forward(t)  # (B, c, D)
        return torch.cat([temb, self.modulation(temb)], dim=-1)


def text_rows(caption_tokens: int, text_len: int) -> int:
    """Text tokens a Wan block computes for a caption of `caption_tokens`: those, plus one that stands
    for the text_len - caption_tokens zero-padded ones (WanCrossAttention), at most text_len."""
    return min(caption_tokens + 1, text_len)


class WanCaption(nn.Module):
    """Text features (B, L, Dt), L <= text_len -> (B, text_rows(L), D) tokens, all attended.

    Features past the mask are zeroed and the caption zero-padded to text_len, which is how
    Wan's pipeline feeds UMT5's output, so any padding of the input gives the same result; the
    padding past L is one row, which WanCrossAttention counts text_len - L times. A
    dropped caption (drop) becomes all zeros here; Wan's own null caption is the empty
    string's embedding, which the data path substitutes before the model.
    """

    def __init__(self, text_dim: int, hidden: int, text_len: int) -> None:
        super().__init__()
        self.text_len = text_len
        self.proj = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(approximate="tanh"),
                                  nn.Linear(hidden, hidden))

    def forward(self, text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, None]:
        b, length, _ = text.shape
        if length > self.text_len:
            raise ValueError(f"text of {length} tokens is longer than the model's text_len={self.text_len}; "
                             f"set text.max_length <= {self.text_len}")
        keep = mask if drop is None else mask & ~drop[:, None]
        # one zero row stands for all text_len - length padded tokens (WanCrossAttention weighs it)
        rows = text_rows(length, self.text_len)
        text = F.pad(text * keep[..., None].to(text.dtype), (0, 0, 0, rows - length))
        return self.proj(text), torch.ones(b, rows, dtype=torch.bool, device=text.device), None


class WanFinalLayer(nn.Module):
    """norm(x) * (1 + scale) + shift with (shift, scale) = table + raw time embedding, then proj_out."""

    def __init__(self, hidden: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(hidden, out_dim)
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.scale_shift_table.copy_(torch.randn_like(self.scale_shift_table) / self.scale_shift_table.shape[-1] ** 0.5)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = cond[..., :x.shape[-1]].float()  # (B, c, D)
        shift, scale = (self.scale_shift_table.float() + temb[:, :, None]).unbind(2)  # (B, c, D) each
        return self.linear(kernels.modulated_norm(x.float(), shift, scale, eps=self.eps).type_as(x))


class WanModel(DiT):
    """Wan 2.1 T2V (see the module docstring); models/convert.py maps diffusers' weights onto it."""

    arch: WanArch

    def __init__(self, arch: WanArch) -> None:
        nn.Module.__init__(self)  # DiT.__init__ would build the DiT's own modules
        if arch.hidden % arch.heads:
            raise ValueError(f"hidden={arch.hidden} is not divisible by heads={arch.heads}")
        self.arch = arch
        self.patch_embed = PatchEmbed3D(arch.in_channels, arch.hidden, arch.patch)
        self.t_embed = WanTimeEmbedding(arch.hidden, arch.freq_dim)
        self.caption = WanCaption(arch.text_dim, arch.hidden, arch.text_len)  # type: ignore[assignment]
        self.blocks = nn.ModuleList(WanBlock(arch) for _ in range(arch.depth))
        self.final = WanFinalLayer(arch.hidden, math.prod(arch.patch) * arch.in_channels,  # type: ignore[assignment]
                                   arch.eps)
        self.sequence = NoSequenceSharding()
        self.reset_parameters()

    def reset_steps(self) -> list[tuple[str, ParamInit]]:
        """Linears xavier-uniform with zero bias, the time MLP normal(0.02), the output linear zero
        (a fresh model predicts 0); tables and norms keep their construction values."""
        steps: list[tuple[str, ParamInit]] = []
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                steps += [(f"{name}.weight", nn.init.xavier_uniform_), (f"{name}.bias", nn.init.zeros_)]
        steps += [(f"t_embed.mlp.{i}.weight", partial(nn.init.normal_, std=0.02)) for i in (0, 2)]
        steps += [("final.linear.weight", nn.init.zeros_), ("final.linear.bias", nn.init.zeros_)]
        return steps

    def pack(self, state: TokenState, text_tokens: torch.Tensor) -> torch.Tensor:
        """x (B, n, D), cond (B, c, 7D) as 7c rows, text (B, text_len, D) -> (B, n + 7c + text_len, D)."""
        b, c, _ = state.cond.shape
        return torch.cat([state.x, state.cond.reshape(b, c * (1 + MODULATIONS), -1), text_tokens], dim=1)

    def unpack(self, message: torch.Tensor, layout: TokenState) -> tuple[TokenState, torch.Tensor]:
        n, c = layout.x.shape[1], layout.cond.shape[1]
        x, cond, text_tokens = message.split([n, c * (1 + MODULATIONS), message.shape[1] - n - c * (1 + MODULATIONS)],
                                             dim=1)
        cond = cond.reshape(message.shape[0], c, -1)  # (B, c, 7D)
        return TokenState(x=x, cond=cond, rope=layout.rope, key_padding_mask=layout.key_padding_mask), text_tokens

    def message_shape(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, *args: Any,
                      **kwargs: Any) -> tuple[int, int, int]:
        """DiT.message_shape with cond's 7c rows and text_len text rows (same arguments as the DiT's)."""
        b, rows, d = super().message_shape(latents, t, text, *args, **kwargs)  # rows = n + c + L
        rows -= text.shape[1]
        n, c = (rows - 1, 1) if t.dim() == 1 else (rows // 2, rows // 2)  # c = 1 or n (per-token t)
        return b, n + c * (1 + MODULATIONS) + text_rows(text.shape[1], self.arch.text_len), d

    def block(self, index: int) -> WanBlock:
        return self.blocks[index]  # type: ignore[return-value]
