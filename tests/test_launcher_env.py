"""Rank discovery under each launcher's environment (megasora/launcher/env.py).

The Slurm cases run the real `scontrol` against a minimal slurm.conf (node-list expansion
is local, no controller needed); the torchrun and mpirun cases start real launchers.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megasora.launcher.env import (
    PORT_BASE,
    PORT_SPAN,
    DistEnv,
    LaunchError,
    discover,
    expand_tasks_per_node,
    export_torch_env,
    free_port,
    slurm_port,
)

REPO = Path(__file__).resolve().parents[1]
needs_scontrol = pytest.mark.skipif(shutil.which("scontrol") is None,
                                    reason="scontrol not installed (slurm/testing/install.sh)")
MINIMAL_SLURM_CONF = """ClusterName=unit
SlurmctldHost=localhost
NodeName=node[1-2] CPUs=1
PartitionName=p Nodes=ALL
"""


def torchrun_env(**extra: str) -> dict[str, str]:
    return {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", **extra}


def srun_env(**extra: str) -> dict[str, str]:
    """What srun gives task 5 of `srun -N3 --ntasks-per-node=2` (batch job 4242)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_NTASKS": "6",
            "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
            "SLURM_STEP_NODELIST": "localhost,gpu-b[07-08]", "SLURM_JOB_NODELIST": "localhost,gpu-b[07-08]",
            **extra}


@pytest.fixture
def slurm_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    conf = tmp_path / "slurm.conf"
    conf.write_text(MINIMAL_SLURM_CONF)
    monkeypatch.setenv("SLURM_CONF", str(conf))  # scontrol runs as a child of this process
    return conf


def test_torchrun_env() -> None:
    env = discover(torchrun_env())
    assert env == DistEnv(rank=3, world_size=8, local_rank=1, local_world_size=4,
                          master_addr="10.0.0.1", master_port=29500, launcher="torchrun")


def test_deepspeed_launcher_env_uses_local_size() -> None:
    env = {**torchrun_env(), "CROSS_RANK": "0", "CROSS_SIZE": "2", "LOCAL_SIZE": "4"}
    del env["LOCAL_WORLD_SIZE"]
    dist = discover(env)
    assert (dist.launcher, dist.local_world_size) == ("deepspeed", 4)


def test_partial_torch_env_names_the_missing_variables() -> None:
    env = torchrun_env()
    del env["MASTER_ADDR"], env["MASTER_PORT"]
    with pytest.raises(LaunchError, match="MASTER_ADDR, MASTER_PORT missing"):
        discover(env)


@pytest.mark.parametrize("key,value,match", [
    ("RANK", "8", "rank 8 is outside world size 8"),
    ("LOCAL_RANK", "4", "local rank 4 is outside local world size 4"),
    ("WORLD_SIZE", "eight", "WORLD_SIZE='eight' is not an integer"),
    ("MASTER_PORT", "70000", "master port 70000 out of range"),
])
def test_inconsistent_torch_env(key: str, value: str, match: str) -> None:
    with pytest.raises(LaunchError, match=match):
        discover(torchrun_env(**{key: value}))


@needs_scontrol
def test_srun_env(slurm_conf: Path) -> None:
    env = discover(srun_env())
    # Master = first host of the step's node list (it resolves, so no controller query).
    assert env == DistEnv(rank=5, world_size=6, local_rank=1, local_world_size=2,
                          master_addr="localhost", master_port=slurm_port(4242, 0), launcher="slurm")


@needs_scontrol
def test_srun_uneven_tasks_per_node(slurm_conf: Path) -> None:
    env = discover(srun_env(SLURM_STEP_NUM_TASKS="7", SLURM_STEP_TASKS_PER_NODE="3,2(x2)",
                            SLURM_NODEID="0", SLURM_PROCID="2", SLURM_LOCALID="2"))
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (2, 7, 2, 3)


def test_srun_master_from_environment_needs_no_scontrol() -> None:
    env = discover(srun_env(MASTER_ADDR="10.1.2.3", MASTER_PORT="23456"))
    assert (env.master_addr, env.master_port) == ("10.1.2.3", 23456)


def test_srun_without_scontrol_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no Slurm commands
    with pytest.raises(LaunchError, match="`scontrol` not found"):
        discover(srun_env())


def test_batch_script_without_srun_is_refused() -> None:
    # The batch shell of a 4-task job: SLURM_* set, but no step, so not a rank of anything.
    batch = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    with pytest.raises(LaunchError, match="not under srun"):
        discover(batch)
    assert discover({**batch, "MEGASORA_LAUNCHER": "single"}).world_size == 1


def test_mpi_env_with_given_master() -> None:
    env = discover({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                    "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                    "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "12345",
                    # mpirun inside an allocation: its ranks inherit misleading Slurm values
                    "SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"})
    assert env == DistEnv(rank=2, world_size=4, local_rank=0, local_world_size=2,
                          master_addr="10.0.0.9", master_port=12345, launcher="mpi")


def test_single_process() -> None:
    env = discover({})
    assert (env.rank, env.world_size, env.launcher, env.master_addr) == (0, 1, "single", "127.0.0.1")
    assert 0 < env.master_port < 65536


def test_unknown_forced_launcher() -> None:
    with pytest.raises(LaunchError, match="MEGASORA_LAUNCHER='pdsh'"):
        discover({"MEGASORA_LAUNCHER": "pdsh"})


def test_expand_tasks_per_node() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(LaunchError, match="cannot parse"):
        expand_tasks_per_node("2(3)")


def test_slurm_port_is_deterministic_and_safe() -> None:
    ports = {slurm_port(job, step) for job in range(1000, 1100) for step in range(3)}
    assert len(ports) == 300  # neighbouring jobs and steps never share a port
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    assert slurm_port(123456789, 1) == slurm_port(123456789, 1)


def test_export_torch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first: monkeypatch only restores (here: removes again) keys it has recorded,
        # and delenv of an absent key records nothing, which leaked RANK=1 into later tests.
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    export_torch_env(DistEnv(1, 2, 1, 2, "127.0.0.1", 23456, "slurm"))
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")] == ["1", "2", "1", "23456"]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def test_env_module_in_subprocess() -> None:
    proc = _run([sys.executable, "-m", "megasora.launcher.env"], _clean_env(**torchrun_env()))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["rank=3", "world_size=8", "local_rank=1", "local_world_size=4",
                                   "master_addr=10.0.0.1", "master_port=29500", "launcher=torchrun"]
    bad = _run([sys.executable, "-m", "megasora.launcher.env"], _clean_env(RANK="0"))
    assert bad.returncode == 2 and "missing" in bad.stderr


def test_torchrun_ranks_rendezvous() -> None:
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                 "-m", "megasora.launcher.check", "--timeout", "60"], _clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("via torchrun") == 2 and proc.stdout.count("all_reduce ok") == 2


def test_deepspeed_launcher_ranks_rendezvous() -> None:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    proc = _run([str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
                 "--module", "megasora.launcher.check", "--timeout", "60"], _clean_env(DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("via deepspeed") == 2 and proc.stdout.count("all_reduce ok") == 2


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI not installed")
def test_mpirun_ranks_find_master_over_mpi() -> None:
    # No MASTER_ADDR/PORT: rank 0 picks them and broadcasts with mpi4py.
    proc = _run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3", sys.executable,
                 "-m", "megasora.launcher.check", "--timeout", "60"], _clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("via mpi") == 3 and proc.stdout.count("all_reduce ok") == 3
    masters = set(re.findall(r"master (\S+):(\d+):", proc.stdout))
    assert len(masters) == 1, proc.stdout  # every rank got the same broadcast address and port
