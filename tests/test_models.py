"""The plain DiT: patches, RoPE, adaLN-Zero, per-token timesteps."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megasora import kernels
from megasora.models.dit import DiT, DiTArch, DiTBlock, TokenState
from megasora.models.embeddings import rope_3d, rope_axis_dims, rope_frequencies
from megasora.models.patch import patch_grid, patchify, unpatchify

ARCH = DiTArch(in_channels=3, hidden=48, depth=2, heads=4, text_dim=16, patch=(1, 2, 2))
POOLED = dataclasses.replace(ARCH, pooled_text=True)


@pytest.mark.parametrize("shape,patch", [
    ((1, 8, 8), (1, 2, 2)),      # an image: one latent frame
    ((4, 8, 12), (1, 2, 2)),
    ((6, 4, 4), (2, 2, 2)),
    ((3, 6, 10), (3, 3, 5)),
    ((5, 7, 9), (1, 1, 1)),
])
def test_patchify_unpatchify_is_identity(shape, patch) -> None:
    x = torch.randn(2, 5, *shape)
    tokens = patchify(x, patch)
    grid = patch_grid(shape, patch)
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 5 * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(tokens, grid, patch, 5), x)


def test_patchify_token_order_is_t_major() -> None:
    x = torch.zeros(1, 1, 2, 2, 2)
    x[0, 0, 1, 0, 1] = 1.0  # t=1, h=0, w=1 -> token index 1*4 + 0*2 + 1 = 5
    assert patchify(x, (1, 1, 1))[0, :, 0].nonzero().item() == 5


def test_patchify_rejects_indivisible_sizes() -> None:
    with pytest.raises(ValueError, match="not divisible by patch"):
        patchify(torch.zeros(1, 1, 3, 8, 8), (2, 2, 2))


def rope_scores(grid: tuple[int, int, int], head_dim: int, layout: str, seed: int = 0) -> dict[tuple, float]:
    """q·k of one random query/key pair rotated at every position, keyed by the (dt, dh, dw) offset;
    asserts on the way that equal offsets give equal scores."""
    gen = torch.Generator().manual_seed(seed)
    cos, sin = rope_3d(grid, head_dim, layout=layout)
    q, k = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)
    n = grid[0] * grid[1] * grid[2]
    qr = kernels.apply_rope(q.expand(1, n, 1, head_dim).contiguous(), cos, sin)[0, :, 0]
    kr = kernels.apply_rope(k.expand(1, n, 1, head_dim).contiguous(), cos, sin)[0, :, 0]
    scores = qr @ kr.T  # (N, N)
    pos = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    by_offset: dict[tuple, float] = {}
    for i in range(n):
        for j in range(n):
            offset = tuple((pos[j] - pos[i]).tolist())
            if offset in by_offset:
                assert abs(scores[i, j] - by_offset[offset]) < 1e-4, (layout, offset)
            else:
                by_offset[offset] = scores[i, j].item()
    assert len(by_offset) < n * n  # offsets actually repeated, so the check above ran
    return by_offset


@pytest.mark.parametrize("layout", ["axial", "mixed"])
def test_rope_scores_depend_only_on_position_differences(layout: str) -> None:
    by_offset = rope_scores((3, 4, 5), 24, layout)
    # and each axis has its own frequencies: moving in t, h or w changes the score differently
    assert len({round(by_offset[o], 3) for o in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]}) == 3


def test_axial_rope_cannot_tell_motion_directions_apart_and_mixed_can() -> None:
    """Axial scores are sums of per-axis terms, so for (dt, dw) offsets the two "moving left"
    pairs (+1, -1), (-1, +1) always sum to the same as the "moving right" pairs (+1, +1),
    (-1, -1): no query/key can prefer one motion direction both forwards and backwards in time.
    Mixed frequencies (t±w diagonals) break that identity."""
    for seed in range(3):
        for layout, separable in (("axial", True), ("mixed", False)):
            s = rope_scores((3, 1, 3), 32, layout, seed)
            left = s[(1, 0, -1)] + s[(-1, 0, 1)]
            right = s[(1, 0, 1)] + s[(-1, 0, -1)]
            assert (abs(left - right) < 1e-4) == separable, (layout, seed, left, right)


def test_rope_frequency_layouts() -> None:
    axial = rope_frequencies(64, 10.0, "axial")
    assert axial.shape == (32, 3) and ((axial != 0).sum(1) == 1).all()  # every pair turns along one axis
    assert [int((axial[:, a] != 0).sum()) for a in range(3)] == list(rope_axis_dims(64))
    mixed = rope_frequencies(64, 10.0, "mixed")
    diagonal = (mixed != 0).sum(1) == 2
    assert int(diagonal.sum()) == 20 and int(mixed[:, 0].ne(0).sum()) == 18  # 32 pairs cycling over 9 directions
    assert torch.allclose(mixed.abs().max(1).values[:9], torch.ones(9, dtype=torch.float64))  # rung 0 at freq 1
    with pytest.raises(ValueError, match="layout"):
        rope_frequencies(64, 10.0, "spiral")


def test_rope_axis_split_covers_head_dim() -> None:
    for head_dim in (6, 16, 64, 128):
        t, h, w = rope_axis_dims(head_dim)
        assert t + h + w == head_dim // 2 and min(t, h, w) >= 1


def test_fresh_block_is_identity() -> None:
    torch.manual_seed(0)
    model = DiT(ARCH)
    block = model.blocks[0]
    assert isinstance(block, DiTBlock)
    x = torch.randn(2, 12, ARCH.hidden)
    cos, sin = rope_3d((1, 3, 4), ARCH.hidden // ARCH.heads)
    state = TokenState(x=x, cond=torch.randn(2, 1, ARCH.hidden), rope=(cos, sin), key_padding_mask=None)
    text = torch.randn(2, 5, ARCH.hidden)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(block(state, text, mask), x)


def test_model_output_shape_and_gradients_flow() -> None:
    torch.manual_seed(0)
    model = DiT(ARCH)
    for p in model.parameters():  # open the adaLN-Zero gates so every weight gets gradient
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 2, 8, 8)
    text, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(x, torch.rand(2), text, mask)
    assert out.shape == x.shape
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == ["caption.null_embedding"]  # only used when captions are dropped


@pytest.mark.parametrize("arch", [ARCH, POOLED], ids=["cross-attention", "pooled"])
def test_text_padding_is_ignored(arch: DiTArch) -> None:
    torch.manual_seed(0)
    model = DiT(arch)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 3, 1, 4, 4), torch.rand(1)
    text, mask = torch.randn(1, 6, 16), torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    other = text.clone()
    other[:, 3:] = torch.randn(1, 3, 16) * 100
    assert torch.allclose(model(x, t, text, mask), model(x, t, other, mask), atol=1e-6)


def test_per_token_timesteps_equal_per_sample_when_uniform() -> None:
    torch.manual_seed(0)
    model = DiT(ARCH)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 2, 4, 4)
    text, mask = torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    t = torch.tensor([0.3, 0.8])
    n = 2 * 2 * 2
    per_sample = model(x, t, text, mask)
    per_token = model(x, t[:, None].expand(2, n), text, mask)
    assert torch.allclose(per_sample, per_token, atol=1e-5)
    # and a clean first frame (t=0 on its tokens) changes the prediction
    t_tok = t[:, None].expand(2, n).clone()
    t_tok[:, :4] = 0
    assert not torch.allclose(model(x, t_tok, text, mask), per_sample, atol=1e-4)


@pytest.mark.parametrize("arch", [ARCH, POOLED], ids=["cross-attention", "pooled"])
def test_dropped_captions_use_the_null_embedding(arch: DiTArch) -> None:
    torch.manual_seed(0)
    model = DiT(arch)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 1, 4, 4), torch.rand(2)
    mask = torch.ones(2, 4, dtype=torch.bool)
    drop = torch.tensor([True, True])
    a = model(x, t, torch.randn(2, 4, 16), mask, drop)
    b = model(x, t, torch.randn(2, 4, 16), mask, drop)
    assert torch.allclose(a, b, atol=1e-6)  # caption content no longer matters


def test_pooled_caption_conditions_adaln() -> None:
    """With every cross-attention closed, the caption still reaches the output through the pooled
    vector added to the timestep embedding; without model.pooled_text the parameters are unchanged
    (older checkpoints load)."""
    assert not any(name.startswith("caption.pool") for name in DiT(ARCH).state_dict())
    torch.manual_seed(0)
    model = DiT(POOLED)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for block in model.blocks:
        torch.nn.init.zeros_(block.cross_attn.out.weight)
        torch.nn.init.zeros_(block.cross_attn.out.bias)
    x, t, mask = torch.randn(2, 3, 2, 4, 4), torch.rand(2), torch.ones(2, 3, dtype=torch.bool)
    a = model(x, t, torch.randn(2, 3, 16), mask)
    b = model(x, t, torch.randn(2, 3, 16), mask)
    assert not torch.allclose(a, b, atol=1e-4)
    torch.nn.init.zeros_(model.caption.pool[2].weight)  # close the pooled path too: the caption is gone
    torch.nn.init.zeros_(model.caption.pool[2].bias)
    assert torch.allclose(model(x, t, torch.randn(2, 3, 16), mask), model(x, t, torch.randn(2, 3, 16), mask))
