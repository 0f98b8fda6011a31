"""The study's PNG plots (matplotlib Agg), one question per file; docs/scaling.md says how to read them.

throughput.png    samples/s and tokens/s against GPUs, with the ideal (linear) line
efficiency.png    throughput per GPU relative to the smallest point (1 = perfect scaling)
mfu.png           model FLOPs utilisation (and HFU, counting recompute) per point
memory.png        peak memory per GPU
comm_share.png    communication seconds per axis as a share of the step time, stacked
step_time.png     measured step time next to the planner's prediction

Failed points are named on every plot (their numbers do not exist), not silently dropped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from megasora.scale.status import DONE
from megasora.scale.study import Study

GiB = 1024 ** 3


def comm_axes(rows: list[dict[str, Any]]) -> list[str]:
    """Axes with a `comm_s/<axis>` total (not the `comm_s/<axis>/<kind>` parts of it)."""
    return sorted({k.split("/")[1] for r in rows for k in r if k.startswith("comm_s/") and k.count("/") == 1})


def _pyplot():
    import matplotlib  # lazy: ~1 s to import, and only `scale report` draws
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend
    return plt


def _finish(fig, ax, study: Study, rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Shared axes, the failed-point note and the save."""
    gpus = [r["gpus"] for r in rows]
    for a in (ax if isinstance(ax, (list, tuple)) else [ax]):
        a.set_xticks(gpus)
        a.set_xlabel("GPUs (ranks)")
        a.grid(alpha=0.3)
    failed = [f"{r['point']}: {r['status']}" + (f" ({r['reason'][:40]})" if r.get("reason") else "")
              for r in rows if r["status"] != DONE]
    fig.suptitle(f"{title} — {study.mode} scaling, {Path(study.config).stem}", fontsize=10)
    if failed:
        fig.text(0.01, 0.01, "not measured: " + "; ".join(failed), fontsize=7, color="tab:red")
    fig.tight_layout(rect=(0, 0.05 if failed else 0, 1, 1))
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)
    return path


def _done(rows: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == DONE and all(r.get(k) is not None for k in keys)]


def plot_throughput(study: Study, rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    done = _done(rows, "samples_per_s")
    for ax, key, label in zip(axes, ("samples_per_s", "tokens_per_s"), ("samples/s", "tokens/s")):
        if done:
            base = min(done, key=lambda r: r["gpus"])
            ideal = [base[key] / base["gpus"] * r["gpus"] for r in done]
            ax.plot([r["gpus"] for r in done], ideal, "--", color="gray", label="ideal (linear)")
            ax.plot([r["gpus"] for r in done], [r[key] for r in done], "o-", label="measured")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    return _finish(fig, list(axes), study, rows, "Throughput", path)


def _single(ylabel: str, draw: Callable[[Any, list[dict[str, Any]]], None], keys: tuple[str, ...]
            ) -> Callable[[Study, list[dict[str, Any]], Path, str], Path]:
    def plot(study: Study, rows: list[dict[str, Any]], path: Path, title: str) -> Path:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        draw(ax, _done(rows, *keys))
        ax.set_ylabel(ylabel)
        return _finish(fig, ax, study, rows, title, path)
    return plot


def _draw_efficiency(ax, done: list[dict[str, Any]]) -> None:
    ax.axhline(1.0, ls="--", color="gray", label="ideal")
    ax.plot([r["gpus"] for r in done], [r["efficiency"] for r in done], "o-", label="measured")
    ax.set_ylim(0, max([1.1, *[r["efficiency"] * 1.1 for r in done]]))
    ax.legend(fontsize=8)


def _draw_mfu(ax, done: list[dict[str, Any]]) -> None:
    ax.plot([r["gpus"] for r in done], [100 * r["mfu"] for r in done], "o-", label="MFU")
    with_hfu = [r for r in done if r.get("hfu") is not None]
    if with_hfu:
        ax.plot([r["gpus"] for r in with_hfu], [100 * r["hfu"] for r in with_hfu], "s--", label="HFU (with recompute)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def _bar_width(gpus: list[int]) -> float:
    gaps = [b - a for a, b in zip(sorted(gpus), sorted(gpus)[1:])]
    return 0.4 * min(gaps, default=1.0)


def _draw_memory(ax, done: list[dict[str, Any]]) -> None:
    gpus = [r["gpus"] for r in done]
    ax.bar(gpus, [r["mem_bytes"] / GiB for r in done], width=_bar_width(gpus), color="tab:purple")


def _draw_step_time(ax, done: list[dict[str, Any]]) -> None:
    gpus = [r["gpus"] for r in done]
    ax.errorbar(gpus, [r["step_time_s"] for r in done], yerr=[r["step_time_std_s"] for r in done],
                fmt="o-", capsize=3, label="measured (mean ± std)")
    predicted = [r for r in done if r.get("predicted_step_time_s") is not None]
    if predicted:
        ax.plot([r["gpus"] for r in predicted], [r["predicted_step_time_s"] for r in predicted], "s--",
                label="predicted (megasora.plan)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def plot_comm_share(study: Study, rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    done = _done(rows, "step_time_s")
    gpus, bottom = [r["gpus"] for r in done], [0.0] * len(done)
    for axis in comm_axes(done):
        share = [100 * (r.get(f"comm_share/{axis}") or 0.0) for r in done]
        ax.bar(gpus, share, bottom=bottom, width=_bar_width(gpus), label=axis)
        bottom = [b + s for b, s in zip(bottom, share)]
    if comm_axes(done):
        ax.legend(fontsize=8, title="axis", title_fontsize=8)
    else:
        ax.text(0.5, 0.5, "no comm_s/<axis> in metrics.jsonl", ha="center", transform=ax.transAxes)
    ax.set_ylabel("% of step time in communication")
    return _finish(fig, ax, study, rows, "Communication share", path)


PLOTS = {
    "efficiency.png": (_single("throughput per GPU / smallest point's", _draw_efficiency, ("efficiency",)),
                       "Scaling efficiency"),
    "mfu.png": (_single("% of peak FLOP/s", _draw_mfu, ("mfu",)), "MFU"),
    "memory.png": (_single("peak memory per GPU (GiB)", _draw_memory, ("mem_bytes",)), "Peak memory"),
    "step_time.png": (_single("step time (s)", _draw_step_time, ("step_time_s",)), "Step time"),
}


def write_plots(study: Study, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    paths = [plot_throughput(study, rows, out / "throughput.png")]
    for name, (plot, title) in PLOTS.items():
        paths.append(plot(study, rows, out / name, title))
    paths.append(plot_comm_share(study, rows, out / "comm_share.png"))
    return paths
