"""`megasora scale report DIR`: one row per point in scaling.csv and scaling.md, plus the plots.

Per point, over the steps after the warm-up (`--warmup` steps are compile/allocator/cache
warm-up, not the steady state): mean step time and its components, throughput as measured
samples (tokens) over measured seconds, MFU/HFU, peak memory per GPU (the maximum of the
logged `mem_bytes`), communication seconds and bytes per axis, and the planner's predicted
step time. Scaling efficiency is throughput per GPU relative to the smallest point that
finished; the ideal line is that point's throughput per GPU times the GPUs. Keys a run did
not log (older runs, pipeline-only metrics) are left empty, never guessed.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from megasora.scale.markdown import write_markdown
from megasora.scale.plots import comm_axes, write_plots
from megasora.scale.predict import predicted_columns
from megasora.scale.status import DONE, point_status
from megasora.scale.study import Point, Study

MEAN_KEYS = ("mfu", "hfu", "time/data_s", "time/fwd_s", "time/bwd_s", "time/opt_s", "pp_bubble")
COLUMNS = ["point", "status", "reason", "nodes", "procs_per_node", "gpus", "dp", "tp", "ulysses", "ring", "pp",
           "zero_stage", "global_batch", "grad_accum", "steps_measured", "step_time_s", "step_time_std_s",
           "samples_per_s", "tokens_per_s", "ideal_samples_per_s", "efficiency", *MEAN_KEYS, "mem_bytes",
           "predicted_step_time_s", "predicted_over_measured"]


def measured_records(run_dir: str | Path, warmup: int) -> list[dict[str, Any]]:
    """metrics.jsonl after the warm-up; a resumed run's later line for a step wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step) if s > warmup]


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The steady-state numbers of one run (see the module docstring)."""
    times = [r["step_time_s"] for r in records]
    total = sum(times)
    mean_t = total / len(times)
    row: dict[str, Any] = {
        "steps_measured": len(records), "step_time_s": mean_t,
        "step_time_std_s": math.sqrt(sum((t - mean_t) ** 2 for t in times) / len(times)),
        # samples per step = samples_per_s x step_time_s, summed: measured samples / measured seconds
        "samples_per_s": sum(r["samples_per_s"] * r["step_time_s"] for r in records) / total,
        "tokens_per_s": sum(r.get("tokens_per_s", 0.0) * r["step_time_s"] for r in records) / total,
        "mem_bytes": max((r["mem_bytes"] for r in records if "mem_bytes" in r), default=None),
    }
    for key in MEAN_KEYS:
        row[key] = _mean([r[key] for r in records if key in r])
    comm_keys = sorted({k for r in records for k in r if k.startswith(("comm_s/", "comm_bytes/"))})
    for key in comm_keys:
        row[key] = _mean([r.get(key, 0.0) for r in records])
    return row


def point_row(study: Study, point: Point) -> dict[str, Any]:
    status = point_status(study, point)
    row: dict[str, Any] = {"point": point.name, "status": status.state, "reason": status.reason,
                           "nodes": point.nodes, "procs_per_node": point.procs_per_node, "gpus": point.world_size,
                           **point.layout, "global_batch": point.global_batch, "grad_accum": point.grad_accum}
    if status.state != DONE:
        return row
    records = measured_records(point.run_dir, study.warmup)
    if not records:
        return {**row, "status": "failed", "reason": f"no steps after the {study.warmup} warm-up steps"}
    row.update(summarize_records(records))
    row.update(predicted_columns(study, point, records))
    if row.get("predicted_step_time_s") is not None:
        row["predicted_over_measured"] = row["predicted_step_time_s"] / row["step_time_s"]
    return row


def add_scaling(rows: list[dict[str, Any]]) -> None:
    """Ideal throughput and efficiency against the smallest finished point, per GPU."""
    done = [r for r in rows if r["status"] == DONE]
    if not done:
        return
    base = min(done, key=lambda r: r["gpus"])
    per_gpu = base["samples_per_s"] / base["gpus"]
    for row in done:
        row["ideal_samples_per_s"] = per_gpu * row["gpus"]
        row["efficiency"] = row["samples_per_s"] / row["ideal_samples_per_s"]


def collect(study: Study) -> list[dict[str, Any]]:
    rows = [point_row(study, p) for p in study.points]
    add_scaling(rows)
    for row in rows:
        for axis in comm_axes(rows):
            if row.get(f"comm_s/{axis}") is not None and row.get("step_time_s"):
                row[f"comm_share/{axis}"] = row[f"comm_s/{axis}"] / row["step_time_s"]
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))  # comm_s/<axis>, comm_bytes/<axis>, ...
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})


def _csv_value(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def report(study: Study) -> tuple[list[dict[str, Any]], list[Path]]:
    """Write scaling.csv, scaling.md and the plots into the study directory; return rows and files."""
    out = Path(study.out)
    rows = collect(study)
    write_csv(rows, out / "scaling.csv")
    plots = write_plots(study, rows, out)
    write_markdown(study, rows, plots, out / "scaling.md")
    return rows, [out / "scaling.csv", out / "scaling.md", *plots]
