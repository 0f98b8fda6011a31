"""Ablations behind docs/prompt_following.md: which parts of configs/tiny-prompt.yaml make a tiny DiT
follow the direction word.

A plain single-process AdamW loop (constant LR after warmup, EMA, grad clip 1) over megasora's
DiT, flow objective and synthetic clips, scored with megasora/eval at chosen steps: colour and
direction rates of 24 text-to-video prompts, and the real / reversed / static / opposite loss
probe. Faster to iterate than `megasora train` and free of DeepSpeed, so variants are cheap;
the recipe itself is validated through the real CLI by tests/test_prompt_following.py.

  python bench/ablate_prompt_following.py --set model.rope_layout=axial --eval-at 1500,3000
  python bench/ablate_prompt_following.py --only-direction left --eval-at 500,1000   # can it model motion at all?
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import megasora.data.synthetic as synthetic
from megasora.config import Config, load_config
from megasora.diffusion.flow import masked_mse, noise_batch
from megasora.eval.motion_probe import probe_losses
from megasora.eval.prompt_score import prompt_grid, sample_and_score
from megasora.models import build_dit


def restrict_direction(direction: str) -> None:
    """Every synthetic clip (training, probe) moves `direction`; the caption says so."""
    draw = synthetic.clip_attributes

    def one_direction(seed: int, sample_id: int) -> tuple[str, str, str, int, int]:
        color, shape, _, sy, sx = draw(seed, sample_id)
        return color, shape, direction, sy, sx

    synthetic.clip_attributes = one_direction  # render_clip looks it up at call time


def evaluate(model: torch.nn.Module, ema: dict[str, torch.Tensor], cfg: Config, step: int) -> None:
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema)
    model.eval()
    captions = prompt_grid(24, 0)
    grid = sample_and_score(model, cfg, captions, seed=0, steps=30, guidance=4.0)
    probe = probe_losses(model, cfg, num_clips=128)
    print(f"step {step}: {grid.summary()}; probe " + ", ".join(f"{k} {v:.5f}" for k, v in probe.items()), flush=True)
    print("  mean displacement (dy, dx) px/frame per prompt: " + " ".join(
        f"{c.split()[-1]}({s.displacement[0]:+.1f},{s.displacement[1]:+.1f})" for c, s in zip(captions, grid.scores)))
    model.load_state_dict(raw)
    model.train()


def train(cfg: Config, eval_at: set[int]) -> None:
    torch.manual_seed(cfg.train.seed)
    model = build_dit(cfg)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay)
    table = synthetic.CaptionEmbeddings(cfg.text.path, cfg.text.max_length)
    d, batch = cfg.data, cfg.train.micro_batch_size
    rng, start, losses = np.random.default_rng(cfg.train.seed), time.time(), []
    for step in range(cfg.train.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.train.lr * min(1.0, (step + 1) / max(cfg.train.warmup_steps, 1))
        ids = rng.integers(0, d.num_samples, batch)
        clips, captions = zip(*(synthetic.render_clip(cfg.train.seed, int(i), d.frames, d.height, d.width)
                                for i in ids))
        text, mask = table.lookup(list(captions))
        noised = noise_batch(torch.from_numpy(np.stack(clips)), torch.tensor(ids), step, cfg.train.seed,
                             cfg.diffusion, tuple(cfg.model.patch))
        loss = masked_mse(model(noised.x_t, noised.t_tokens, text, mask, noised.drop_text), noised.target,
                          noised.loss_mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        decay = min(cfg.train.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, value in model.state_dict().items():
                ema[name].lerp_(value.float(), 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(f"step {step + 1} loss {np.mean(losses[-250:]):.4f} ({time.time() - start:.0f} s)", flush=True)
        if step + 1 in eval_at or step + 1 == cfg.train.steps:
            evaluate(model, ema, cfg, step + 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-prompt.yaml")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, key.sub=value")
    p.add_argument("--eval-at", default="", help="comma-separated steps to score at (and the last step)")
    p.add_argument("--only-direction", default=None, choices=list(synthetic.DIRECTIONS),
                   help="make every clip move this way (tests motion modelling without the caption)")
    args = p.parse_args()
    if args.only_direction:
        restrict_direction(args.only_direction)
    torch.set_num_threads(1)
    train(load_config(args.config, args.set), {int(s) for s in args.eval_at.split(",") if s})


if __name__ == "__main__":
    main()
