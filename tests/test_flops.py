"""The DiT FLOPs model (megasora/models/flops.py) against a hand count and against torch's own
FlopCounterMode on the tiny model, recompute included."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megasora.config import load_config
from megasora.models import build_dit, dit_arch
from megasora.models.dit import DiTArch
from megasora.models.flops import dit_forward_flops, dit_train_flops
from megasora.parallel.activation_checkpointing import apply_activation_checkpointing
from megasora.train.recompute import dit_recompute_flops

REPO = Path(__file__).resolve().parents[1]
B, TEXT = 2, 8
LATENTS = (B, 3, 2, 8, 8)  # 2 x 4 x 4 = 32 tokens with patch (1, 2, 2)
TOKENS = 32


def test_forward_flops_hand_count():
    # d=8, depth=1, mlp 16, 4 heads, 1 input channel, patch (1,1,1), text_dim 4; n=2 tokens, l=1 text token.
    arch = DiTArch(in_channels=1, hidden=8, depth=1, heads=4, text_dim=4, patch=(1, 1, 1), mlp_ratio=2.0)
    n, l, d = 2, 1, 8
    block = (2 * n * 4 * d * d      # self-attn q,k,v,out: 2 tokens x 4 x 64 MACs      = 1024
             + 2 * 2 * n * n * d    # QK^T and AV: 2 x (2x2x8) MACs                    = 128
             + 2 * n * 2 * d * d    # cross-attn q and out on video tokens             = 512
             + 2 * l * 2 * d * d    # cross-attn k, v on the text token                = 256
             + 2 * 2 * n * l * d    # cross scores and weighted sum                    = 64
             + 2 * n * 2 * d * 16   # MLP fc1 + fc2                                   = 1024
             + 2 * d * 6 * d)       # adaLN, once per sample                           = 768
    assert block == 3776
    embed = (2 * n * 1 * d           # patch embedding                                  = 32
             + 2 * (256 * d + d * d)  # timestep MLP, once per sample                   = 4224
             + 2 * l * (4 * d + d * d)  # caption projection                            = 192
             + 2 * d * 2 * d          # final adaLN                                     = 256
             + 2 * n * d * 1)         # final linear                                    = 32
    assert embed == 4736
    assert dit_forward_flops(arch, n, l) == 3776 + 4736
    assert dit_train_flops(arch, n, l) == 3 * (3776 + 4736)


def _tiny():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.hidden=32", "model.heads=4", "model.depth=2",
                                                      "model.mlp_ratio=2.0", f"text.max_length={TEXT}"])
    torch.manual_seed(0)
    return cfg, build_dit(cfg)


def _inputs(cfg):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(LATENTS, generator=g), torch.rand(B, generator=g),
            torch.randn(B, TEXT, cfg.text.dim, generator=g), torch.ones(B, TEXT, dtype=torch.bool),
            torch.zeros(B, dtype=torch.bool))


def _counted(model, inputs, backward: bool) -> int:
    """Matmul FLOPs torch counts (SDPA on the math backend, so its products are counted as bmm)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(*inputs)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops()


def test_forward_flops_match_flop_counter():
    cfg, model = _tiny()
    model_flops = B * dit_forward_flops(dit_arch(cfg), TOKENS, TEXT)
    assert _counted(model, _inputs(cfg), backward=False) == pytest.approx(model_flops, rel=0.02)


def test_train_flops_match_flop_counter():
    """Backward = 2 x forward up to the input gradients nobody needs (latents, text): < 2%."""
    cfg, model = _tiny()
    model_flops = B * dit_train_flops(dit_arch(cfg), TOKENS, TEXT)
    assert _counted(model, _inputs(cfg), backward=True) == pytest.approx(model_flops, rel=0.02)


@pytest.mark.parametrize("mode,every", [("full", 1), ("full", 2), ("selective", 1)])
def test_recompute_flops_match_flop_counter(mode, every):
    """What checkpointing re-runs in backward is exactly what the recompute model adds."""
    cfg, model = _tiny()
    arch = dit_arch(cfg)
    plain = _counted(model, _inputs(cfg), backward=True)
    apply_activation_checkpointing(model, mode, every)
    checkpointed = _counted(model, _inputs(cfg), backward=True)
    recompute = B * dit_recompute_flops(arch, TOKENS, TEXT, mode, every)
    assert recompute > 0
    assert checkpointed - plain == pytest.approx(recompute, rel=0.02)


def test_recompute_flops_by_mode():
    arch = DiTArch(in_channels=4, hidden=64, depth=4, heads=4, text_dim=32)
    full, selective = (dit_recompute_flops(arch, 256, 16, m) for m in ("full", "selective"))
    assert dit_recompute_flops(arch, 256, 16, "none") == 0
    assert dit_recompute_flops(arch, 256, 16, "full", every=2) == full / 2  # blocks 0 and 2
    attention = 4 * 4 * 256 * 256 * 64  # depth x (QK^T + AV) per block
    assert full - selective == attention


@pytest.mark.parametrize("targets", [("attn.q", "attn.k", "attn.v", "attn.out"),
                                     ("attn.q", "cross_attn.k", "cross_attn.v", "mlp.fc1", "mlp.fc2")])
def test_lora_train_flops_match_flop_counter(targets):
    """LoRA: the frozen base's backward computes input gradients only (no weight-gradient GEMMs),
    the adapters' products count forward + backward: what FlopCounterMode sees, within 2% (12
    blocks: block 0's cross-attention, which needs no backward, is counted)."""
    from megasora.config import LoRAConfig  # lazy: only this test builds adapters
    from megasora.parallel.lora import apply_lora
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.hidden=32", "model.heads=4", "model.depth=12",
                                                      "model.mlp_ratio=2.0", f"text.max_length={TEXT}"])
    torch.manual_seed(0)
    model = apply_lora(build_dit(cfg), LoRAConfig(rank=4, targets=list(targets)))
    model_flops = B * dit_train_flops(dit_arch(cfg), TOKENS, TEXT, 4, targets)
    assert model_flops < 0.8 * B * dit_train_flops(dit_arch(cfg), TOKENS, TEXT)  # no base weight gradients
    assert _counted(model, _inputs(cfg), backward=True) == pytest.approx(model_flops, rel=0.02)
