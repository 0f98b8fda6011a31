"""Per-step metrics: metrics.jsonl, TensorBoard scalars, a progress bar on a TTY and plain
periodic log lines otherwise (Slurm logs), and a loss-curve plot at the end."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("megasora")


class MetricsLogger:
    """Only the rank that owns the run directory (global rank 0) constructs one with enabled=True."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool,
                 plain_every_s: float = 30.0) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.plain_every_s = plain_every_s
        self._last_plain = 0.0
        self._bar = None
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter  # lazy: ~1.4 s to import; only rank 0 writes
        self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._jsonl is None or self._tb is None:  # not enabled (not rank 0)
            return
        record = {"step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            self._bar.update(step - self._bar.n)
        elif time.monotonic() - self._last_plain >= self.plain_every_s or step in (1, self.total_steps):
            self._last_plain = time.monotonic()
            log.info("step %d/%d loss %.5f grad_norm %.3f lr %.2e %.1f samples/s %.3g FLOP/s",
                     step, self.total_steps, metrics["loss"], metrics["grad_norm"], metrics["lr"],
                     metrics["samples_per_s"], metrics["flops_per_s"])

    def close(self) -> None:
        if self._jsonl is None or self._tb is None:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._jsonl.close()
        plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out_path: Path) -> None:
    """Loss and learning-rate curves, because people look at curves, not tables."""
    import matplotlib  # lazy: ~1 s to import, and only rank 0 draws, once at the end
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend
    records = read_metrics(metrics_path)
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(steps, [r["loss"] for r in records])
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax_lr.set(xlabel="step", ylabel="lr", title="learning rate")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
