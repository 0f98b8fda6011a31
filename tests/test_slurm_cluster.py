"""Integration: the tiny config on a real 2-node Slurm cluster running on this machine.

slurm/testing/cluster.py starts munged, slurmctld and two slurmd daemons (node1, node2,
2 CPUs each); jobs go through `megasora submit` -> sbatch -> srun exactly as on a real
cluster. Select with `pytest -m slurm`; needs root (SlurmUser=root) and the Debian slurm
packages (slurm/testing/install.sh).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "testing" / "cluster.py"
TINY = REPO / "configs" / "tiny.yaml"
TP2 = ("--set", "parallel.tp=2")  # world 4 = tp 2 x dp 2
SAMPLES_PER_STEP = 2 * 2  # dp 2 x train.micro_batch_size 2
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster runs as root (SlurmUser=root)"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for Slurm clients talking to a fresh private 2-node cluster."""
    state = Path(f"/tmp/megasora-slurm-test-{os.getpid()}")
    base_port = 30000 + (os.getpid() % 500) * 4  # private ports below the ephemeral range
    cmd = [sys.executable, str(CLUSTER), "--state-dir", str(state)]
    up = subprocess.run([*cmd, "up", "--nodes", "2", "--cpus", "2", "--base-port", str(base_port)],
                        capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_")) and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    yield env
    subprocess.run([*cmd, "down"], timeout=120)


def run(cmd: list[str], env: dict[str, str], timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def job_info(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = run(["scontrol", "-o", "show", "job", job_id], env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_done(job_id: str, env: dict[str, str], timeout: float = 600) -> dict[str, str]:
    def done() -> dict[str, str] | None:
        info = job_info(job_id, env)
        return info if info.get("JobState") in TERMINAL else None
    return wait_for(done, timeout, f"job {job_id} to finish")


def submit(env: dict[str, str], run_dir: Path, *args: str) -> str:
    proc = run([sys.executable, "-m", "megasora", "submit", "--config", str(TINY), "--time", "01:00:00",
                "--set", f"run.dir={run_dir}", *args], env)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout
    return job_id


def steps_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logs(run_dir: Path, job_id: str) -> tuple[str, str]:
    """(batch script log, rank 0 log) of a job."""
    slurm = run_dir / "slurm"
    return (slurm / f"tiny-{job_id}.out").read_text(), (slurm / f"tiny-{job_id}" / "rank-0.log").read_text()


def describe(run_dir: Path, job_id: str) -> str:
    batch, rank0 = logs(run_dir, job_id)
    return f"--- batch log\n{batch}\n--- rank 0 log (tail)\n{rank0[-3000:]}"


def test_srun_ranks_rendezvous_across_nodes(cluster: dict[str, str]) -> None:
    proc = run(["srun", "-N2", "-n4", sys.executable, "-m", "megasora.launcher.check", "--timeout", "60"], cluster)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("via slurm") == 4 and proc.stdout.count("all_reduce ok") == 4
    # node1 is not a DNS name: rank 0's address came from its NodeAddr in slurm.conf.
    assert proc.stdout.count("master 127.0.0.2:") == 4


@pytest.fixture(scope="module")
def two_node_run(cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    job_id = submit(cluster, run_dir, "--nodes", "2", "--tasks-per-node", "2", *TP2, "--set", "train.steps=6")
    wait_done(job_id, cluster)
    return run_dir, job_id


def test_submit_two_nodes_completes(cluster: dict[str, str], two_node_run: tuple[Path, str]) -> None:
    run_dir, job_id = two_node_run
    info = job_info(job_id, cluster)
    assert (info["JobState"], info["ExitCode"], info["NumNodes"], info["NumTasks"]) == \
        ("COMPLETED", "0:0", "2", "4"), describe(run_dir, job_id)
    # Accounting without slurmdbd: the jobcomp/filetxt record, read by `sacct -c`.
    sacct = wait_for(lambda: run(["sacct", "-c", "-n", "-j", job_id, "-o", "jobid,state,nnodes"], cluster).stdout,
                     30, "the job completion record")
    assert sacct.split()[-2:] == ["COMPLETED", "2"], sacct
    records = steps_of(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["samples"] == 6 * SAMPLES_PER_STEP  # one world of tp 2 x dp 2, not four singles
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    batch, rank0 = logs(run_dir, job_id)
    assert "srun exited with 0" in batch and "requeueing" not in batch
    assert "step 6/6" in rank0


def test_preempted_job_requeues_and_resumes(cluster: dict[str, str], tmp_path: Path) -> None:
    run_dir, total = tmp_path / "run", 40
    job_id = submit(cluster, run_dir, "--nodes", "2", "--tasks-per-node", "2", *TP2, "--set", f"train.steps={total}")
    wait_for(lambda: len(steps_of(run_dir)) >= 2, 600, "the first training steps", poll=0.1)
    # What --signal=USR1@... does before the time limit: USR1 to every task of the job.
    assert run(["scancel", "--signal=USR1", job_id], cluster).returncode == 0
    wait_for(lambda: job_info(job_id, cluster).get("Restarts") == "1", 90, "the requeue")
    # The requeued job waits cred_expire (30 s on the test cluster) before it starts again.
    info = wait_done(job_id, cluster)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), describe(run_dir, job_id)

    steps = [r["step"] for r in steps_of(run_dir)]
    assert steps == list(range(1, total + 1)), "every step trained exactly once"
    batch, rank0 = logs(run_dir, job_id)
    assert "requeueing job" in batch and f"job {job_id} restart 1" in batch, batch
    saved = re.search(r"preemption signal received: saving at step (\d+)", rank0)
    resumed = re.search(r"resumed from \S*step_(\d+)", rank0)
    assert saved and resumed, rank0[-3000:]
    assert int(saved.group(1)) == int(resumed.group(1)) < total


def test_two_node_checkpoint_resumes_on_one_node(cluster: dict[str, str], two_node_run: tuple[Path, str],
                                                 tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(two_node_run[0], run_dir, ignore=shutil.ignore_patterns("slurm"))
    # Same tp 2, now dp 1: the ZeRO state saved by 2 data-parallel ranks is resharded for 1.
    job_id = submit(cluster, run_dir, "--nodes", "1", "--tasks-per-node", "2", *TP2, "--set", "train.steps=9")
    info = wait_done(job_id, cluster)
    assert (info["JobState"], info["NumTasks"]) == ("COMPLETED", "2"), describe(run_dir, job_id)
    records = steps_of(run_dir)
    assert [r["step"] for r in records] == list(range(1, 10))
    # world 2 = tp 2 x dp 1 after the resume: one data-parallel rank x 2 samples per step
    assert records[-1]["samples"] - records[5]["samples"] == 3 * 1 * 2
    assert re.search(r"resumed from \S*step_00000006 at step 6", logs(run_dir, job_id)[1])


def test_scancel_cancels_instead_of_requeueing(cluster: dict[str, str], tmp_path: Path) -> None:
    # scancel sends TERM: the ranks exit with the "saved, requeue me" code, but a job the
    # user cancelled must stay cancelled.
    run_dir = tmp_path / "run"
    job_id = submit(cluster, run_dir, "--nodes", "2", "--tasks-per-node", "2", "--set", "train.steps=500")
    wait_for(lambda: len(steps_of(run_dir)) >= 2, 600, "the first training steps", poll=0.1)
    assert run(["scancel", job_id], cluster).returncode == 0
    info = wait_done(job_id, cluster)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), describe(run_dir, job_id)
    assert "requeueing" not in logs(run_dir, job_id)[0]
