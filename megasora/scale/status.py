"""Where each point of a study stands: pending, running, done or failed (with the reason).

A point is done when its metrics.jsonl reached the study's last step, whatever the scheduler
says. Otherwise Slurm points ask squeue (queued, running), then sacct (finished: with slurmdbd,
then `sacct -c` for jobcomp-only clusters like slurm/testing), then `scontrol show job`; local
points read the launch.json / exit.json that `megasora scale run` writes. A failure's reason
is the scheduler's state (TIMEOUT, OUT_OF_MEMORY, PREEMPTED, ...) sharpened by the logs.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from megasora.errors import PREEMPTED_EXIT_CODE
from megasora.scale.study import EXIT_FILE, LAUNCH_FILE, LOCAL_LOG, TIMEOUT_RC, Point, Study

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
SLURM_ACTIVE = {"RUNNING": RUNNING, "COMPLETING": RUNNING, "CONFIGURING": RUNNING, "STAGE_OUT": RUNNING,
                "PENDING": PENDING, "REQUEUED": PENDING, "REQUEUE_HOLD": PENDING, "REQUEUE_FED": PENDING,
                "SUSPENDED": PENDING, "RESIZING": RUNNING, "SIGNALING": RUNNING}
SLURM_FAILURES = {"TIMEOUT": "timeout (time limit reached)", "OUT_OF_MEMORY": "out of memory",
                  "PREEMPTED": "preempted", "NODE_FAIL": "node failure", "CANCELLED": "cancelled",
                  "BOOT_FAIL": "node boot failure", "DEADLINE": "deadline reached", "FAILED": "failed",
                  "COMPLETED": "completed"}
OOM = re.compile(r"out of memory|OutOfMemoryError|oom[-_ ]kill|MemoryError", re.IGNORECASE)
ERROR_LINE = re.compile(r"(megasora: \w+ error: .*|\w*(Error|Exception): .*)")


@dataclass
class PointStatus:
    state: str            # pending | running | done | failed
    reason: str = ""      # why failed / pending; empty when done
    steps_done: int = 0
    scheduler: str = ""   # Slurm's job state, or the local exit code


def last_step(run_dir: str | Path) -> int:
    """Highest step in a run's metrics.jsonl (0 before the first step)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def point_status(study: Study, point: Point) -> PointStatus:
    steps = last_step(point.run_dir)
    if steps >= study.steps:
        return PointStatus(DONE, steps_done=steps)
    status = _slurm_status(point) if study.launcher == "slurm" else _local_status(point)
    status.steps_done = steps
    if status.state == FAILED:
        status.reason = _with_log_detail(status.reason, point, steps, study.steps)
    return status


# --- local ------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _local_status(point: Point) -> PointStatus:
    run_dir = Path(point.run_dir)
    if (run_dir / EXIT_FILE).is_file():
        rc = json.loads((run_dir / EXIT_FILE).read_text())["rc"]
        return PointStatus(FAILED, _exit_reason(rc, rc == TIMEOUT_RC), scheduler=f"exit {rc}")
    if (run_dir / LAUNCH_FILE).is_file():
        pid = json.loads((run_dir / LAUNCH_FILE).read_text())["pid"]
        if _pid_alive(pid):
            return PointStatus(RUNNING, scheduler=f"pid {pid}")
        return PointStatus(FAILED, "the launching `megasora scale run` was killed", scheduler="gone")
    return PointStatus(PENDING, "not started")


def _exit_reason(rc: int, timed_out: bool) -> str:
    if timed_out:
        return "timeout (--timeout reached)"
    if rc == PREEMPTED_EXIT_CODE:
        return "preempted (stop signal; checkpoint saved)"
    if rc in (-9, 137):
        return "killed (SIGKILL: out of memory?)"
    return f"exited with {rc}" if rc else "exited 0 before the last step"


# --- Slurm ------------------------------------------------------------------------------------

def _query(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def slurm_job_state(job_id: str) -> tuple[str, str]:
    """(state, reason or exit code) from whichever Slurm client knows the job; ("", "") if none."""
    out = _query(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
    if out:
        state, _, reason = out.splitlines()[0].partition("|")
        return state, "" if reason == "None" else reason
    for cmd in (["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"],
                ["sacct", "-c", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"]):
        lines = [line for line in _query(cmd).splitlines() if line.strip()]
        if lines:  # a requeued job has one record per run: the last is the current one
            state, _, code = lines[-1].partition("|")
            return state.split()[0], code
    info = dict(re.findall(r"(\w+)=(\S*)", _query(["scontrol", "-o", "show", "job", job_id])))
    return info.get("JobState", ""), info.get("ExitCode", "")


def _slurm_status(point: Point) -> PointStatus:
    if not point.job_id:
        return PointStatus(PENDING, "not submitted")
    state, detail = slurm_job_state(point.job_id)
    if not state:
        return PointStatus(FAILED, f"job {point.job_id} unknown to squeue, sacct and scontrol", scheduler="?")
    if state in SLURM_ACTIVE:
        return PointStatus(SLURM_ACTIVE[state], detail, scheduler=state)
    reason = SLURM_FAILURES.get(state, state.lower())
    if state in ("FAILED", "COMPLETED") and detail and detail != "0:0":
        reason += f" (exit {detail})"
    return PointStatus(FAILED, reason, scheduler=state)


# --- the logs' word on a failure --------------------------------------------------------------

def _point_logs(point: Point) -> list[Path]:
    run_dir = Path(point.run_dir)
    return [p for p in [run_dir / LOCAL_LOG, *sorted(run_dir.glob("slurm/**/*.out")),
                        *sorted(run_dir.glob("slurm/**/rank-*.log"))] if p.is_file()]


def _with_log_detail(reason: str, point: Point, steps: int, total: int) -> str:
    """Add the OOM or error line the logs show, and how far the run got."""
    oom = error = ""
    for path in _point_logs(point):
        for line in path.read_text(errors="replace").splitlines():
            if not oom and OOM.search(line):
                oom = line.strip()
            match = ERROR_LINE.search(line)
            if match:
                error = match.group(1).strip()
    detail = oom or error
    if oom and "memory" not in reason:
        reason = f"out of memory ({reason})"
    text = f"{reason} after {steps}/{total} steps"
    return f"{text}: {detail[:160]}" if detail else text
