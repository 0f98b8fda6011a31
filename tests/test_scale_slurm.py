"""Integration: a scaling study on the real 2-node local Slurm cluster (slurm/testing/cluster.py).

`megasora scale submit` queues one job per node count through `megasora submit`'s path,
`megasora scale status` follows them through squeue/sacct until both are done, and
`megasora scale report` writes the csv, the markdown and the plots with both points.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
from test_slurm_cluster import cluster, job_info, run, wait_for  # noqa: F401  (cluster: the module-scoped fixture)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
PLOTS = ("throughput", "efficiency", "mfu", "memory", "comm_share", "step_time")

pytestmark = [
    pytest.mark.slurm, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster runs as root (SlurmUser=root)"),
]


def scale(env: dict[str, str], *args: str, timeout: float = 120):
    return run([sys.executable, "-m", "megasora", "scale", *args], env, timeout=timeout)


def states(env: dict[str, str], out: Path) -> dict[str, str]:
    proc = scale(env, "status", str(out))
    assert proc.returncode == 0, proc.stderr
    return {line.split()[0]: line.split()[3] for line in proc.stdout.splitlines()[1:]}


def test_scale_submit_status_report_on_two_nodes(cluster: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "study"
    proc = scale(cluster, "submit", "--config", str(TINY), "--nodes", "1", "2", "--mode", "weak",
                 "--steps", "4", "--warmup", "1", "--out", str(out), "--time", "00:30:00",
                 "--set", "train.ema_decay=0")
    assert proc.returncode == 0, proc.stderr
    assert "n1: submitted job" in proc.stderr and "n2: submitted job" in proc.stderr

    seen = set()

    def all_done() -> bool:
        now = states(cluster, out)
        seen.update(now.values())
        assert "failed" not in now.values(), scale(cluster, "status", str(out)).stdout
        return set(now.values()) == {"done"}
    wait_for(all_done, 900, "both points of the study", poll=2)
    assert seen & {"pending", "running"}, seen  # status followed the jobs through the queue
    jobs = {p["name"]: p["job_id"] for p in json.loads((out / "study.json").read_text())["points"]}
    assert {name: job_info(job, cluster)["NumNodes"] for name, job in jobs.items()} == {"n1": "1", "n2": "2"}

    proc = scale(cluster, "report", str(out))
    assert proc.returncode == 0, proc.stderr
    with open(out / "scaling.csv") as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    assert {k: (r["status"], r["nodes"], r["gpus"], r["global_batch"], r["steps_measured"]) for k, r in rows.items()} \
        == {"n1": ("done", "1", "1", "2", "3"), "n2": ("done", "2", "2", "4", "3")}
    assert float(rows["n2"]["samples_per_s"]) > 0 and float(rows["n1"]["efficiency"]) == 1.0
    md = (out / "scaling.md").read_text()
    assert "| n1 | 1 |" in md and "| n2 | 2 |" in md
    for name in PLOTS:
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and f"({name}.png)" in md


def test_a_point_that_fails_in_its_job_is_reported_with_the_reason(cluster: dict[str, str],  # noqa: F811
                                                                   tmp_path: Path) -> None:
    # The point is planned fine but its job stops at start-up (the shards directory does not exist
    # on the nodes): status asks Slurm and the logs why; the report still writes, naming it.
    # (A failed point next to finished ones: tests/test_scale.py, from metrics files.)
    out = tmp_path / "study"
    proc = scale(cluster, "submit", "--config", str(TINY), "--nodes", "2", "--steps", "3", "--warmup", "1",
                 "--out", str(out), "--time", "00:30:00", "--set", "data.kind=shards",
                 "--set", f"data.shards={tmp_path / 'no-shards'}")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: states(cluster, out) == {"n2": "failed"}, 600, "the job to fail", poll=2)
    status = scale(cluster, "status", str(out)).stdout
    assert "failed (exit 2:0) after 0/3 steps: megasora: data error: data.shards=" in status, status
    assert scale(cluster, "report", str(out)).returncode == 0
    with open(out / "scaling.csv") as f:
        assert [(r["point"], r["status"], r["step_time_s"]) for r in csv.DictReader(f)] == [("n2", "failed", "")]
    assert "- n2: failed: failed (exit 2:0)" in (out / "scaling.md").read_text()
