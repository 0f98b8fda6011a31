"""DeepSpeed engine construction: optimizer, LR schedule and the DeepSpeed config from ours."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megasora.config import Config
from megasora.train.schedule import warmup_cosine


def deepspeed_config(cfg: Config, dp_size: int, load_universal: bool = False) -> dict[str, Any]:
    t = cfg.train
    return {
        # Resuming under a different layout reads a universal checkpoint (see train/universal.py).
        "checkpoint": {"load_universal": load_universal},
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        # We pass torch's AdamW (identical maths on CPU and GPU); DeepSpeed calls it "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: nn.Module, dp_size: int, mpu: Any = None, load_universal: bool = False) -> Any:
    import deepspeed
    t = cfg.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "null_embedding" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, t.steps, t.warmup_steps, t.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dp_size, load_universal), mpu=mpu)
    return engine
