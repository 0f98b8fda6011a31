"""Tiny trained runs that several test modules read; conftest.py trains each once per session."""
from __future__ import annotations

# A pixel-space run to sample from: 4 latent frames of 8x8, conditioning masks on, EMA, a preview
# every 2 of its 4 steps (configs/tiny.yaml with these overrides).
SAMPLING = ["model.hidden=32", "model.heads=4", "model.depth=2", "data.frames=4", "data.height=8", "data.width=8",
            "data.num_samples=8", "train.steps=4", "train.warmup_steps=1", "train.zero_stage=0",
            "train.ema_decay=0.9", "train.sample_every=2", "train.sample_steps=2",
            "diffusion.cond_masks.first_frame=0.3", "diffusion.cond_masks.head=0.3",
            "diffusion.cond_masks.first_last=0.3"]
