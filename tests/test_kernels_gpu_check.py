"""bench/gpu_check.sh, the prepared GPU check, in its CPU dry mode: every section's plumbing runs
at tiny sizes (the CUDA kernel test selection, the block-attention comparison, the training
features with save and resume, the speed and memory sections), so the script cannot rot while
no GPU is around to run it."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"kernels", "attention", "train", "speed", "memory"}


def gpu_check(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_dry_run_passes_every_section(tmp_path):
    res = gpu_check("--dry", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    checks = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {c["section"] for c in checks} == SECTIONS
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    names = {c["name"] for c in checks if c["section"] == "train"}
    assert {"AC none, ZeRO 0, EMA, accounting", "AC selective, ZeRO 1", "AC full, ZeRO 2", "ZeRO 3"} <= names
    assert any("resumed to step 2" in c["detail"] for c in checks if c["section"] == "train")
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("GPU check: CPU") and "| attention | cpu_flash bfloat16 padded | ok |" in table


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    res = gpu_check("--out", str(tmp_path), timeout=120)
    if res.returncode != 2:
        pytest.skip("a CUDA device is visible: the real check would run")
    assert res.stderr.strip().splitlines() == ["gpu_check: no CUDA device; run it on the GPU machine, or --dry here"]
