"""scaling.md: the study's table, its failed points with their reasons, and the plots embedded."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megasora.scale.status import DONE
from megasora.scale.study import Study

GiB = 1024 ** 3


def _fmt(value: Any, spec: str = ".3g", scale: float = 1.0, suffix: str = "") -> str:
    return "–" if value is None else f"{value * scale:{spec}}{suffix}"


def _layout(row: dict[str, Any]) -> str:
    parts = [f"dp{row['dp']}"] + [f"{k}{row[k]}" for k in ("tp", "ulysses", "ring", "pp") if row.get(k, 1) > 1]
    return "×".join(parts) + f" z{row['zero_stage']}"


def _comm(row: dict[str, Any]) -> str:
    shares = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("comm_share/") and v}
    return ", ".join(f"{axis} {100 * v:.0f}%" for axis, v in sorted(shares.items(), key=lambda kv: -kv[1])) or "–"


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = ("| point | GPUs | layout | global batch | status | step time (s) | predicted (s) | samples/s | "
            "ideal | efficiency | tokens/s | MFU | peak mem/GPU | comm share |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        done = r["status"] == DONE
        lines.append("| " + " | ".join([
            r["point"], str(r["gpus"]), _layout(r), f"{r['global_batch']} (ga {r['grad_accum']})",
            r["status"] if done else f"**{r['status']}**",
            _fmt(r.get("step_time_s")), _fmt(r.get("predicted_step_time_s")), _fmt(r.get("samples_per_s")),
            _fmt(r.get("ideal_samples_per_s")), _fmt(r.get("efficiency"), ".0%"), _fmt(r.get("tokens_per_s")),
            _fmt(r.get("mfu"), ".2%"), _fmt(r.get("mem_bytes"), ".2f", 1 / GiB, " GiB"), _comm(r) if done else "–",
        ]) + " |")
    return lines


def write_markdown(study: Study, rows: list[dict[str, Any]], plots: list[Path], path: Path) -> None:
    failed = [r for r in rows if r["status"] != DONE]
    lines = [
        f"# Scaling study: {Path(study.config).name}, {study.mode} scaling",
        "",
        f"{study.launcher} launcher, {len(study.points)} points, {study.steps} steps each, the first "
        f"{study.warmup} left out as warm-up. Overrides: {' '.join(study.overrides) or 'none'}."
        + (" Layouts from the planner (`--plan`)." if study.planned_layouts else ""),
        "",
        *table(rows),
        "",
    ]
    if failed:
        lines += ["Not measured:", ""] + [f"- {r['point']}: {r['status']}: {r['reason'] or '–'}" for r in failed] + [""]
    lines += ["Numbers: scaling.csv (every metric, per axis). How to read the plots: docs/scaling.md.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")
