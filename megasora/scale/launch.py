"""Running a study's points locally, one torchrun after another (Slurm jobs: commands/scale.py
queues them through `megasora submit`'s checks and rendering).

Each point trains in its own run directory, <out>/points/<name>/, with the usual contents
(config.yaml, metrics.jsonl, ...). Local runs also leave launch.json (pid, command) while
running and exit.json (return code, seconds) when done, which `megasora scale status` reads.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megasora.scale.status import last_step
from megasora.scale.study import EXIT_FILE, LAUNCH_FILE, LOCAL_LOG, TIMEOUT_RC, Point, Study

log = logging.getLogger("megasora")


def torchrun_command(study: Study, point: Point, python: str = sys.executable) -> list[str]:
    args = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={point.procs_per_node}",
            "-m", "megasora", "train", "--config", study.config]
    for item in point.overrides:
        args += ["--set", item]
    return args


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data) + "\n")


def run_point(study: Study, point: Point, timeout_s: float, poll_s: float = 10.0) -> int:
    """Train one point to completion (or timeout); returns its exit code. Logs progress every poll."""
    run_dir = Path(point.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (EXIT_FILE, "metrics.jsonl"):  # a rerun measures afresh, from step 0
        (run_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    cmd = torchrun_command(study, point)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.monotonic()
    with open(run_dir / LOCAL_LOG, "w") as logfile:
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _write_json(run_dir / LAUNCH_FILE, {"pid": proc.pid, "command": cmd, "started": time.time()})
        rc = _wait(proc, run_dir, study.steps, point.name, start + timeout_s, poll_s)
    _write_json(run_dir / EXIT_FILE, {"rc": rc, "elapsed_s": round(time.monotonic() - start, 1),
                                      "timed_out": rc == TIMEOUT_RC})
    return rc


def _wait(proc: subprocess.Popen, run_dir: Path, steps: int, name: str, deadline: float, poll_s: float) -> int:
    while True:
        try:
            return proc.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            pass
        log.info("%s: step %d/%d", name, last_step(run_dir), steps)
        if time.monotonic() > deadline:
            log.warning("%s: past --timeout, stopping it", name)
            os.killpg(proc.pid, 15)  # its own session: torchrun and every rank it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            return TIMEOUT_RC


def run_points(study: Study, timeout_s: float) -> int:
    """Every point in turn, smallest first; a failed point does not stop the study."""
    failed = 0
    for i, point in enumerate(study.points, 1):
        log.info("point %d/%d %s: %d processes, log %s", i, len(study.points), point.name,
                 point.world_size, Path(point.run_dir) / LOCAL_LOG)
        rc = run_point(study, point, timeout_s)
        if rc:
            failed += 1
            log.warning("%s exited with %d; the study goes on (see `megasora scale status %s`)",
                        point.name, rc, study.out)
    return failed
