"""Integration: `mpirun -np 4 python -m megasora train` with OpenMPI + mpi4py rank discovery.

Nothing is exported: every rank reads OMPI_COMM_WORLD_*, and rank 0 broadcasts the
rendezvous address and port over MPI. Select with `pytest -m mpi`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI not installed")]


def mpi_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "OMPI_"))}
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


def test_mpirun_trains_tiny_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "4",
           sys.executable, "-m", "megasora", "train", "--config", "configs/tiny.yaml",
           "--set", "train.steps=3", "--set", f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=mpi_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # One world of 4 data-parallel ranks (4 x micro-batch 2 per step), not 4 lone processes.
    assert records[-1]["samples"] == 3 * 4 * 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
