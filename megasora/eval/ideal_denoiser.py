"""What each caption word is worth to the denoising loss, at each noise level, for the synthetic shapes.

The synthetic data distribution is finite and known: for a caption, the clip is one of
H*W start positions. So the Bayes-optimal velocity prediction E[v | x_t, caption] can be
computed exactly (a softmax over candidate clips), with and without a caption word: the
difference of the two optimal losses is the most any model can gain from that word at t.
Weighting it by the training density of t shows how much the objective rewards learning it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from megasora.data.synthetic import COLORS, DIRECTIONS, SHAPES, render_attributes


@functools.lru_cache(maxsize=None)
def _positions(color: str, shape: str, direction: str, frames: int, height: int, width: int) -> torch.Tensor:
    clips = [render_attributes(color, shape, direction, y, x, frames, height, width)
             for y in range(height) for x in range(width)]
    return torch.from_numpy(np.stack(clips)).flatten(1).double()


def candidate_clips(colors, shapes, directions, frames: int, height: int, width: int) -> torch.Tensor:
    """Every start position of every listed (colour, shape, direction): (K, 3*T*H*W)."""
    return torch.cat([_positions(c, s, d, frames, height, width)
                      for c in colors for s in shapes for d in directions])


def optimal_loss(x0: torch.Tensor, noise: torch.Tensor, t: float, candidates: torch.Tensor,
                 clean: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE of the optimal velocity (x_t - E[x0|x_t]) / t when x0 is one of `candidates`.

    x0, noise: (B, D); candidates: (K, D). x_t = (1-t) x0 + t noise, so
    p(x0=c | x_t) ~ exp(-|x_t - (1-t) c|^2 / (2 t^2)) and the velocity error is |x0 - E[x0|x_t]| / t.
    clean (D,) bool marks elements given clean (conditioning frames): candidates must match them
    exactly, and they are left out of the loss, as in training.
    """
    x_t = (1 - t) * x0 + t * noise
    logits = -torch.cdist(x_t, (1 - t) * candidates).pow(2) / (2 * t * t)  # (B, K)
    if clean is not None:
        mismatch = (candidates[:, clean][None] != x0[:, None, clean]).any(-1)  # (B, K)
        logits = logits.masked_fill(mismatch, float("-inf"))
    mean = torch.softmax(logits, dim=-1) @ candidates  # (B, D)
    keep = torch.ones(x0.shape[-1], dtype=torch.bool) if clean is None else ~clean
    return (x0 - mean)[:, keep].pow(2).mean(dim=-1) / (t * t)


@dataclass
class WordValue:
    t: list[float]
    loss_full: list[float]        # optimal loss knowing the whole caption
    loss_without: list[float]     # optimal loss with the word unknown

    def gain(self) -> np.ndarray:
        return np.asarray(self.loss_without) - np.asarray(self.loss_full)

    def expected_gain(self, shift: float, logit_mean: float = 0.0, logit_std: float = 1.0) -> float:
        """E_t[gain] under training's timestep law: t = shift(sigmoid(N(mean, std)))."""
        return float(np.sum(self.gain() * training_weights(self.t, shift, logit_mean, logit_std)))


def training_weights(t_grid: list[float], shift: float, logit_mean: float = 0.0, logit_std: float = 1.0) -> np.ndarray:
    """Probability mass of each t_grid cell (midpoint bins) under the shifted logit-normal law."""
    edges = np.concatenate([[0.0], (np.asarray(t_grid[:-1]) + np.asarray(t_grid[1:])) / 2, [1.0]])
    u = np.clip(_unshift(edges, shift), 1e-12, 1 - 1e-12)
    z = (np.log(u / (1 - u)) - logit_mean) / logit_std
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    return np.diff(cdf)


def _unshift(t: np.ndarray, shift: float) -> np.ndarray:
    """Inverse of shift_timesteps: t = s u / (1 + (s-1) u)  <=>  u = t / (s - (s-1) t)."""
    return t / (shift - (shift - 1) * t)


def word_value(word: str, t_grid: list[float], frames: int = 4, height: int = 16, width: int = 16,
               probes: int = 64, seed: int = 0, clean_frames: int = 0) -> WordValue:
    """Optimal loss with / without knowing the caption's `word` ('direction', 'color' or 'shape').

    clean_frames > 0: the first frames are given clean (image-to-video conditioning)."""
    clean = None
    if clean_frames:
        clean = torch.zeros(3, frames, height, width, dtype=torch.bool)
        clean[:, :clean_frames] = True
        clean = clean.flatten()
    rng = np.random.default_rng(seed)
    colors, shapes, directions = list(COLORS), list(SHAPES), list(DIRECTIONS)
    full, without = [], []
    for t in t_grid:
        lf, lw = [], []
        for _ in range(probes):
            c, s, d = colors[rng.integers(6)], shapes[rng.integers(3)], directions[rng.integers(4)]
            known = {"color": [c], "shape": [s], "direction": [d]}
            pos = rng.integers(height * width)
            x0 = torch.from_numpy(render_attributes(c, s, d, pos // width, pos % width, frames, height,
                                                    width)).flatten()[None].double()
            noise = torch.from_numpy(rng.standard_normal(x0.shape))
            exact = candidate_clips(known["color"], known["shape"], known["direction"], frames, height, width)
            unknown = {**known, word: {"color": colors, "shape": shapes, "direction": directions}[word]}
            loose = candidate_clips(unknown["color"], unknown["shape"], unknown["direction"], frames, height, width)
            lf.append(optimal_loss(x0, noise, t, exact, clean).item())
            lw.append(optimal_loss(x0, noise, t, loose, clean).item())
        full.append(float(np.mean(lf)))
        without.append(float(np.mean(lw)))
    return WordValue(list(t_grid), full, without)
