"""Spacetime diffusion transformer (plain single-device PyTorch).

latents (B, C, T, H, W) -> patch tokens (B, N, D) -> blocks of
[cross-attention to text, spacetime self-attention with 3-D RoPE, MLP] under adaLN-Zero
timestep conditioning -> predicted velocity (B, C, T, H, W).

Parallelism is applied from outside (megasora/parallel/parallelize.py): it swaps linears,
each SelfAttention's `attention` callable, and this model's `sequence` hook, which says which
tokens (a TokenSpan) this rank holds: only those are patch-embedded, get RoPE rows and
conditioning. Training feeds each rank only its span's patch tokens and gets the velocity of
those tokens back (the loss is taken per span, train/objective.py); given whole latents
(sampling), the model slices its span itself and gathers the output before unpatchify. Activation
checkpointing sets each checkpointed block's `checkpoint` hook. A pipeline stage
(megasora/parallel/pipeline.py) is this model holding one contiguous run of the blocks,
and runs this forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Protocol, cast

import torch
from torch import nn

from megasora import kernels
from megasora.models.attention import CrossAttention, SelfAttention
from megasora.models.embeddings import TimestepEmbedder, rope_at
from megasora.models.patch import PatchEmbed3D, TokenSpan, patch_grid, unpatchify


@dataclass(frozen=True)
class DiTArch:
    """Architecture hyper-parameters (mirrors config.ModelConfig, kept free of config parsing)."""
    in_channels: int
    hidden: int
    depth: int
    heads: int
    text_dim: int
    patch: tuple[int, int, int] = (1, 2, 2)
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    rope_theta: float = 10000.0
    rope_layout: str = "axial"  # config.ROPE_LAYOUTS
    pooled_text: bool = False   # the caption's mean feature also conditions adaLN


@dataclass
class TokenState:
    """What every block needs, for the (possibly sharded) token sequence."""
    x: torch.Tensor                 # (B, N, D)
    cond: torch.Tensor              # (B, 1, D) per-sample or (B, N, D) per-token timestep embedding
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (N, Dh/2)
    key_padding_mask: Optional[torch.Tensor]  # (B, N) bool, True = real token; None = no padding


def rope_tables(arch: DiTArch, span: TokenSpan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos, sin (n, head_dim/2) fp32 of the span's positions only."""
    return rope_at(span.positions(device), span.grid, arch.hidden // arch.heads, arch.rope_theta, arch.rope_layout)


def key_padding_mask(span: TokenSpan, batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """(B, n) True = real token over the span, or None when the sequence has no padding at all
    (every rank agrees: the choice depends on the clip, not on the rank's span)."""
    if span.padded == span.num_tokens:
        return None
    return (span.positions(device) < span.num_tokens).expand(batch, -1)


# Fills one parameter in place, drawing from the global RNG like the constructors do.
ParamInit = Callable[[torch.Tensor], object]


class SequenceHook(Protocol):
    def span(self, grid: tuple[int, int, int]) -> TokenSpan:
        """This rank's residual-stream tokens (x, per-token cond, final layer)."""
    def attention_span(self, grid: tuple[int, int, int]) -> TokenSpan:
        """The tokens this rank's self-attention sees (RoPE rows, key-padding mask)."""
    def gather(self, tokens: torch.Tensor, span: TokenSpan) -> torch.Tensor:
        """(B, n, E) of `span` -> (B, N, E) whole on every rank."""
    def sum(self, local: torch.Tensor) -> torch.Tensor:
        """A loss summed over the ranks' spans (the gradient of each rank's part stays its own)."""


class NoSequenceSharding:
    """Single device: the whole sequence stays local."""

    def span(self, grid: tuple[int, int, int]) -> TokenSpan:
        return TokenSpan.whole(grid)

    def attention_span(self, grid: tuple[int, int, int]) -> TokenSpan:
        return TokenSpan.whole(grid)

    def gather(self, tokens: torch.Tensor, span: TokenSpan) -> torch.Tensor:
        return tokens

    def sum(self, local: torch.Tensor) -> torch.Tensor:
        return local


class BlockCheckpoint(Protocol):
    """Runs `block.body` so that backward recomputes it (set by parallel/activation_checkpointing.py)."""
    mode: str

    def __call__(self, block: DiTBlock, state: TokenState, text: torch.Tensor,
                 text_mask: torch.Tensor) -> torch.Tensor: ...


class Mlp(nn.Module):
    def __init__(self, hidden: int, ratio: float, inner: int = 0) -> None:
        """inner: the hidden width (0 = hidden * ratio), for widths no float ratio gives exactly."""
        super().__init__()
        width = inner or int(hidden * ratio)
        self.fc1 = nn.Linear(hidden, width)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """x += cross(norm(x)); x += g1*attn(mod(x)); x += g2*mlp(mod(x)), adaLN-Zero gates start at 0.

    Cross-attention comes first so the self-attention residual and the MLP's modulated
    norm meet at one seam, which the fused `gated_residual_modulated_norm` kernel covers.
    """

    def __init__(self, arch: DiTArch) -> None:
        super().__init__()
        d = arch.hidden
        self.cross_norm = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = CrossAttention(d, arch.heads, arch.qk_norm)
        self.attn = SelfAttention(d, arch.heads, arch.qk_norm)
        self.mlp = Mlp(d, arch.mlp_ratio)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.checkpoint: Optional[BlockCheckpoint] = None  # a plain attribute: parameter names stay the same

    def forward(self, state: TokenState, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        if self.checkpoint is not None:
            return self.checkpoint(self, state, text, text_mask)
        return self.body(state, text, text_mask)

    def body(self, state: TokenState, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = state.x
        x = x + self.cross_attn(self.cross_norm(x), text, text_mask)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(state.cond).chunk(6, dim=-1)
        h = kernels.modulated_norm(x, shift1, scale1)
        attn_out = self.attn(h, state.rope, state.key_padding_mask)
        x, h = kernels.gated_residual_modulated_norm(x, gate1, attn_out, shift2, scale2)
        return kernels.gated_residual(x, gate2, self.mlp(h))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln(cond).chunk(2, dim=-1)
        return self.linear(kernels.modulated_norm(x, shift, scale))


def caption_mask(mask: torch.Tensor, drop: Optional[torch.Tensor]) -> torch.Tensor:
    """The text mask (B, L) after caption dropout: a dropped caption is one null token followed by padding."""
    if drop is None:
        return mask
    null_mask = torch.zeros_like(mask)
    null_mask[:, 0] = True
    return torch.where(drop[:, None], null_mask, mask)


class CaptionProjection(nn.Module):
    """Text encoder features -> model width; holds the learned null caption used for CFG.

    With `pooled`, it also maps the masked mean of the features to one (B, 1, D) vector that
    the DiT adds to the timestep embedding (SD3 / Flux style), so every block's adaLN scale,
    shift and gate depend on the caption, not only the cross-attention outputs.
    """

    def __init__(self, text_dim: int, hidden: int, pooled: bool = False) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(approximate="tanh"),
                                  nn.Linear(hidden, hidden))
        self.null_embedding = nn.Parameter(torch.empty(text_dim))
        self.reset_parameters()  # draws between proj's and pool's default inits (the seeded init's order)
        self.pool = nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) if pooled else None

    def reset_parameters(self) -> None:
        """This module's own parameter (torch's convention: children reset themselves)."""
        n = self.null_embedding.numel()
        with torch.no_grad():
            self.null_embedding.copy_(torch.randn(n, device=self.null_embedding.device) * n ** -0.5)

    def forward(self, text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """-> projected tokens (B, L, D), their mask (B, L), pooled caption (B, 1, D) or None."""
        if drop is not None:
            null_text = torch.zeros_like(text)
            null_text[:, 0] = self.null_embedding.to(text.dtype)
            text = torch.where(drop[:, None, None], null_text, text)
        mask = caption_mask(mask, drop)
        pooled = None
        if self.pool is not None:
            weights = mask.to(text.dtype)[..., None]  # (B, L, 1)
            pooled = self.pool((text * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1))
        return self.proj(text), mask, pooled


def conditioning(t_embedding: torch.Tensor, pooled_caption: Optional[torch.Tensor]) -> torch.Tensor:
    """adaLN input: timestep embedding (B, 1 or N, D), plus the pooled caption (B, 1, D) if the model has one."""
    return t_embedding if pooled_caption is None else t_embedding + pooled_caption


def pack_message(state: TokenState, text_tokens: torch.Tensor) -> torch.Tensor:
    """What one run of blocks hands the next: x (B, n, D), cond (B, c, D), text (B, L) -> (B, n + c + L, D).

    Only the tensors that need a gradient; the rest of TokenState and the text mask carry
    none, so the receiving side recomputes them (DiT.token_layout, caption_mask).
    """
    return torch.cat([state.x, state.cond, text_tokens], dim=1)


def unpack_message(message: torch.Tensor, layout: TokenState) -> tuple[TokenState, torch.Tensor]:
    """pack_message's inverse; `layout` (DiT.token_layout) gives the sizes, RoPE rows and padding mask."""
    n, c = layout.x.shape[1], layout.cond.shape[1]
    x, cond, text_tokens = message.split([n, c, message.shape[1] - n - c], dim=1)
    return TokenState(x=x, cond=cond, rope=layout.rope, key_padding_mask=layout.key_padding_mask), text_tokens


class DiT(nn.Module):
    def __init__(self, arch: DiTArch) -> None:
        super().__init__()
        if arch.hidden % arch.heads:
            raise ValueError(f"hidden={arch.hidden} is not divisible by heads={arch.heads}")
        self.arch = arch
        self.patch_embed = PatchEmbed3D(arch.in_channels, arch.hidden, arch.patch)
        self.t_embed = TimestepEmbedder(arch.hidden)
        self.caption = CaptionProjection(arch.text_dim, arch.hidden, arch.pooled_text)
        self.blocks = nn.ModuleList(DiTBlock(arch) for _ in range(arch.depth))
        patch_volume = arch.patch[0] * arch.patch[1] * arch.patch[2]
        self.final = FinalLayer(arch.hidden, patch_volume * arch.in_channels)
        self.sequence: SequenceHook = NoSequenceSharding()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, init in self.reset_steps():
                init(self.get_parameter(name))

    def reset_steps(self) -> list[tuple[str, ParamInit]]:
        """reset_parameters as (parameter name, in-place init) in the order it draws from the RNG.

        parallel/materialize.py replays these on one full-size parameter at a time, so a rank
        can hold only its shard and still get the values this method gives the whole model.
        """
        steps: list[tuple[str, ParamInit]] = []
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                steps += [(f"{name}.weight", nn.init.xavier_uniform_), (f"{name}.bias", nn.init.zeros_)]
        steps += [(f"t_embed.mlp.{i}.weight", partial(nn.init.normal_, std=0.02)) for i in (0, 2)]
        # The pooled caption MLP keeps its xavier init: it feeds adaLN, whose weights start at zero,
        # so shrinking it too would start the caption's modulation at a product of two near-zeros
        # (a saddle; docs/prompt_following.md: it delayed learning the direction word by ~1000 steps).
        # adaLN-Zero: every residual branch starts closed, so each block is the identity.
        closed = ["final.adaln", "final.linear"]
        for index in range(self.arch.depth):
            closed += [f"blocks.{index}.adaln", f"blocks.{index}.cross_attn.out"]
        for prefix in closed:
            steps += [(name, nn.init.zeros_) for name, _ in self.get_submodule(prefix).named_parameters(prefix)]
        return steps

    def forward(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                drop_text: Optional[torch.Tensor] = None, received: Optional[torch.Tensor] = None,
                blocks: Optional[range] = None, grid: Optional[tuple[int, int, int]] = None) -> torch.Tensor:
        """latents (B, C, T, H, W); t (B,) or per-token (B, N) in [0, 1]; text (B, L, Dt); mask (B, L).

        Returns the predicted velocity (noise - data), same shape as latents.

        Or, as training calls it: latents = this rank's patch tokens (B, n, C*pt*ph*pw) of its
        span (self.sequence.span(grid)) of a clip with token grid `grid`, t (B,) or (B, n) for
        the span; returns the velocity of those tokens (B, n, C*pt*ph*pw), nothing gathered.

        `blocks` (default: every block this module holds) runs a contiguous run of the blocks,
        as a pipeline stage does: the inputs are embedded only if it starts at block 0, else
        `received`, the message (pack_message) of the run before, is unpacked; the final layer
        runs only if it ends at the last block, else the message for the next run is returned.
        """
        blocks = self.held_blocks() if blocks is None else blocks
        if blocks.start == 0:
            state, text_tokens, text_mask = self.embed(latents, t, text, text_mask, drop_text, grid)
        elif received is None:
            raise ValueError(f"blocks {blocks.start}..{blocks.stop - 1} need `received`, the message of the "
                             f"blocks before")
        else:
            state, text_tokens = self.unpack(received, self.token_layout(latents, t, grid))
            text_mask = caption_mask(text_mask, drop_text)
        for index in blocks:
            state.x = self.block(index)(state, text_tokens, text_mask)
        if blocks.stop < self.arch.depth:
            return self.pack(state, text_tokens)  # (B, n + c + L, D)
        return self.head(state, self.token_grid(latents, grid), whole=latents.dim() == 5)

    def pack(self, state: TokenState, text_tokens: torch.Tensor) -> torch.Tensor:
        """The message to the next run of blocks (a family with a wider cond packs it its own way)."""
        return pack_message(state, text_tokens)

    def unpack(self, message: torch.Tensor, layout: TokenState) -> tuple[TokenState, torch.Tensor]:
        """pack's inverse."""
        return unpack_message(message, layout)

    def held_blocks(self) -> range:
        """Global indices of the blocks this module holds: all, or a pipeline stage's run."""
        indices = [int(name) for name, _ in self.blocks.named_children()]
        return range(indices[0], indices[-1] + 1)

    def block(self, index: int) -> DiTBlock:
        """Block `index` (global: a pipeline stage holding it looks it up by the same index)."""
        return cast(DiTBlock, self.blocks[index])

    def token_grid(self, latents: torch.Tensor, grid: Optional[tuple[int, int, int]] = None) -> tuple[int, int, int]:
        """(T', H', W') patch grid of latents (B, C, T, H, W); patch tokens (B, n, E) come with theirs, `grid`."""
        if latents.dim() == 5:
            _, _, frames, height, width = latents.shape
            return patch_grid((frames, height, width), self.arch.patch)
        if grid is None:
            raise ValueError("patch tokens (B, n, E) need the clip's token `grid` (T', H', W')")
        return grid

    def embed(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
              drop_text: Optional[torch.Tensor], grid: Optional[tuple[int, int, int]] = None
              ) -> tuple[TokenState, torch.Tensor, torch.Tensor]:
        """Inputs -> this rank's TokenState, the projected text tokens (B, L, D) and their mask (B, L).

        Only the span's tokens are patch-embedded, conditioned and given RoPE rows.
        """
        grid = self.token_grid(latents, grid)
        span = self.sequence.span(grid)
        if latents.dim() == 5:  # the whole clip: keep the span's latent frames, then its tokens
            latents = span.patches(span.latent_rows(latents, self.arch.patch[0]), self.arch.patch)
            t = span.take(t) if t.dim() == 2 else t  # (B, N) -> (B, n)
        text_tokens, text_mask, pooled = self.caption(text, text_mask, drop_text)
        x = self.patch_embed.project(latents)  # (B, n, D)
        attention = self.sequence.attention_span(grid)
        state = TokenState(x=x, cond=conditioning(self.t_embed(t), pooled),
                           rope=rope_tables(self.arch, attention, x.device),
                           key_padding_mask=key_padding_mask(attention, x.shape[0], x.device))
        return state, text_tokens, text_mask

    def token_layout(self, latents: torch.Tensor, t: torch.Tensor,
                     grid: Optional[tuple[int, int, int]] = None) -> TokenState:
        """This rank's TokenState for these inputs with feature width 1, embedding nothing:
        the local RoPE rows, padding mask and token counts (x and cond are zeros)."""
        grid = self.token_grid(latents, grid)
        span, attention = self.sequence.span(grid), self.sequence.attention_span(grid)
        b = latents.shape[0]
        cond_tokens = 1 if t.dim() == 1 else span.length
        return TokenState(x=latents.new_zeros(b, span.length, 1), cond=latents.new_zeros(b, cond_tokens, 1),
                          rope=rope_tables(self.arch, attention, latents.device),
                          key_padding_mask=key_padding_mask(attention, b, latents.device))

    def message_shape(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                      grid: Optional[tuple[int, int, int]] = None) -> tuple[int, int, int]:
        """Shape (B, n + c + L, D) of pack_message's message for these inputs, on this rank."""
        local = self.token_layout(latents, t, grid)
        b, n, _ = local.x.shape
        return b, n + local.cond.shape[1] + text.shape[1], self.arch.hidden

    def head(self, state: TokenState, grid: tuple[int, int, int], whole: bool = True) -> torch.Tensor:
        """Final layer on this rank's tokens -> their velocity (B, n, pt*ph*pw*C), or with `whole`
        the whole sequence gathered -> velocity (B, C, T, H, W)."""
        out = self.final(state.x, state.cond)  # (B, n, pt*ph*pw*C)
        if not whole:
            return out
        out = self.sequence.gather(out, self.sequence.span(grid))  # (B, N, pt*ph*pw*C)
        return unpatchify(out, grid, self.arch.patch, self.arch.in_channels)
