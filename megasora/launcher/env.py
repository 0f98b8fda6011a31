"""Rank discovery: one answer to "who am I and where is rank 0" under every launcher.

Supported launchers, checked in this order (first match wins):

1. torchrun / deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
2. mpirun (OpenMPI: OMPI_COMM_WORLD_*, MPICH/Intel MPI: PMI_RANK/PMI_SIZE). Checked before
   Slurm because OpenMPI's mpirun inside an allocation starts its daemons with srun, so its
   ranks also carry (misleading) SLURM_PROCID values. The master address and port come
   from rank 0 over MPI (mpi4py) unless MASTER_ADDR/MASTER_PORT are set.
3. srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; master = first host of the
   step's node list (`scontrol show hostnames`, a local expansion, no controller RPC);
   port derived from the job id so every rank computes the same one without talking.
4. a plain single process.

No ssh or pdsh anywhere: every rank finds everything it needs in its own environment.
MEGASORA_LAUNCHER=torchrun|deepspeed|mpi|slurm|single forces one branch.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from megasora.errors import UserError

LAUNCHERS = ("torchrun", "deepspeed", "mpi", "slurm", "single")
# Job-id derived ports stay in 10000-29999: above well-known services, below the Linux
# ephemeral range (32768+) where the kernel hands out client ports that could collide.
PORT_BASE = 10000
PORT_SPAN = 20000


class LaunchError(UserError, RuntimeError):
    """The environment does not describe a usable distributed launch."""

    kind = "launcher"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # one of LAUNCHERS

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise LaunchError(f"unknown launcher {self.launcher!r}; expected one of {LAUNCHERS}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise LaunchError(f"{self.launcher}: rank {self.rank} is outside world size "
                              f"{self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise LaunchError(f"{self.launcher}: local rank {self.local_rank} is outside local "
                              f"world size {self.local_world_size}")
        if self.local_world_size > self.world_size:
            raise LaunchError(f"{self.launcher}: local world size {self.local_world_size} "
                              f"exceeds world size {self.world_size}")
        if not 0 < self.master_port < 65536:
            raise LaunchError(f"{self.launcher}: master port {self.master_port} out of range")


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Find this process's rank, world and rendezvous address from the launcher's env."""
    env = os.environ if environ is None else environ
    launcher = env.get("MEGASORA_LAUNCHER") or detect_launcher(env)
    if launcher in ("torchrun", "deepspeed"):
        return _from_torch_env(env, launcher)
    if launcher == "mpi":
        return _from_mpi(env)
    if launcher == "slurm":
        return _from_slurm(env)
    if launcher == "single":
        return _single(env)
    raise LaunchError(f"MEGASORA_LAUNCHER={launcher!r}; expected one of {LAUNCHERS}")


def launcher_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank from the launcher's variables alone, before or without
    `discover`: no rendezvous, never raises, 0 when unknown. Logging and error reports use it; it
    reads the variable `discover` takes the rank from, so the two cannot disagree."""
    env = os.environ if environ is None else environ
    try:
        keys = _rank_keys(env)
    except LaunchError:  # a batch shell of a many-task job is one process; `discover` says what is wrong
        return 0
    value = env.get(keys[0], "") if keys else ""
    return int(value) if value.isdigit() else 0


def rank_and_world(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) for ranks that share work but never rendezvous (`megasora preprocess`);
    (0, 1) for a single process. Raises LaunchError where `discover` would."""
    env = os.environ if environ is None else environ
    keys = _rank_keys(env)
    if keys is None:
        return 0, 1
    rank, world = _int(env, keys[0], "launcher"), _int(env, keys[1], "launcher")
    if not 0 <= rank < world:
        raise LaunchError(f"{keys[0]}={rank} is outside {keys[1]}={world}")
    return rank, world


def _rank_keys(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The (rank, world size) variables of the launcher that started this process; None if single."""
    launcher = env.get("MEGASORA_LAUNCHER") or detect_launcher(env)
    if launcher in ("torchrun", "deepspeed"):
        return "RANK", "WORLD_SIZE"
    if launcher == "mpi":
        return MPI_KEYS[_mpi_flavour(env)][:2]
    if launcher == "slurm":
        return "SLURM_PROCID", "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    return None


def detect_launcher(env: Mapping[str, str]) -> str:
    if "RANK" in env or "WORLD_SIZE" in env:
        # DeepSpeed's launcher sets these on top of the torch variables; torchrun does not.
        return "deepspeed" if "CROSS_RANK" in env and "LOCAL_SIZE" in env else "torchrun"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return "mpi"
    if "SLURM_STEP_ID" in env:
        return "slurm"
    ntasks = env.get("SLURM_NTASKS")
    if "SLURM_JOB_ID" in env and ntasks and ntasks != "1":
        # A batch script or salloc shell: one process, but the allocation has many tasks.
        # Training here would silently use one task of the job, or hang waiting for peers.
        raise LaunchError(
            f"running inside Slurm job {env['SLURM_JOB_ID']} with {ntasks} tasks but not "
            "under srun; launch every rank with `srun python -m megasora ...` "
            "(or set MEGASORA_LAUNCHER=single to run one process on purpose)")
    return "single"


def export_torch_env(dist: DistEnv) -> None:
    """Write the env:// rendezvous variables torch.distributed and DeepSpeed read."""
    os.environ.update(torch_env(dist))


def torch_env(dist: DistEnv) -> dict[str, str]:
    return {
        "RANK": str(dist.rank),
        "WORLD_SIZE": str(dist.world_size),
        "LOCAL_RANK": str(dist.local_rank),
        "LOCAL_WORLD_SIZE": str(dist.local_world_size),
        "MASTER_ADDR": dist.master_addr,
        "MASTER_PORT": str(dist.master_port),
    }


# --- torchrun / deepspeed -------------------------------------------------------------

def _from_torch_env(env: Mapping[str, str], launcher: str) -> DistEnv:
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise LaunchError(f"{launcher}: RANK/WORLD_SIZE are set but {', '.join(missing)} "
                          "missing; a partial torch environment cannot rendezvous")
    world = _int(env, "WORLD_SIZE", launcher)
    local_world = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or str(world)
    return DistEnv(
        rank=_int(env, "RANK", launcher),
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK", launcher, default=0),
        local_world_size=_parse_int(local_world, "LOCAL_WORLD_SIZE", launcher),
        master_addr=env["MASTER_ADDR"],
        master_port=_int(env, "MASTER_PORT", launcher),
        launcher=launcher,
    )


# --- srun -----------------------------------------------------------------------------

def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    for key in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID"):
        if key not in env:
            raise LaunchError(f"slurm: {key} is not set; is this process started by srun?")
    world = _int(env, "SLURM_STEP_NUM_TASKS", "slurm", default=None) or _int(env, "SLURM_NTASKS", "slurm")
    tasks_per_node = expand_tasks_per_node(
        env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world))
    node_id = _int(env, "SLURM_NODEID", "slurm", default=0)
    if node_id >= len(tasks_per_node):
        raise LaunchError(f"slurm: SLURM_NODEID={node_id} but tasks per node lists only "
                          f"{len(tasks_per_node)} nodes")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    master_addr = env.get("MASTER_ADDR") or slurm_master_addr(nodelist)
    master_port = _int(env, "MASTER_PORT", "slurm", default=None) or slurm_port(
        _int(env, "SLURM_JOB_ID", "slurm"), _int(env, "SLURM_STEP_ID", "slurm", default=0))
    return DistEnv(
        rank=_int(env, "SLURM_PROCID", "slurm"),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID", "slurm"),
        local_world_size=tasks_per_node[node_id],
        master_addr=master_addr,
        master_port=master_port,
        launcher="slurm",
    )


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """Same port on every rank of a step; different for neighbouring jobs and steps."""
    return PORT_BASE + (job_id * 10 + step_id % 10) % PORT_SPAN


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise LaunchError(f"slurm: cannot parse tasks per node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def slurm_master_addr(nodelist: str | None) -> str:
    """Address of the first node of the step, where rank 0 runs."""
    if not nodelist:
        raise LaunchError("slurm: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
    first = _scontrol(["show", "hostnames", nodelist]).split()[0]
    if _resolves(first):
        return first
    # Node names need not be DNS names (NodeName vs NodeAddr in slurm.conf); ask the
    # controller for the node's address. One RPC per rank, only on such clusters.
    match = re.search(r"NodeAddr=(\S+)", _scontrol(["show", "node", first]))
    if not match:
        raise LaunchError(f"slurm: node {first!r} does not resolve and scontrol reports no "
                          "NodeAddr for it; set MASTER_ADDR in the batch script")
    return match.group(1)


def _scontrol(args: list[str]) -> str:
    if shutil.which("scontrol") is None:
        raise LaunchError("slurm: `scontrol` not found on PATH; it is needed to expand the "
                          "node list (or set MASTER_ADDR and MASTER_PORT yourself)")
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise LaunchError(f"slurm: `scontrol {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return True


# --- mpirun ---------------------------------------------------------------------------

MPI_KEYS = {  # rank, size, local rank, local size
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


def _from_mpi(env: Mapping[str, str]) -> DistEnv:
    rank_k, size_k, lrank_k, lsize_k = MPI_KEYS[_mpi_flavour(env)]
    rank, world = _int(env, rank_k, "mpi"), _int(env, size_k, "mpi")
    master_addr, master_port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if master_addr is None or master_port is None:
        master_addr, port = _mpi_rendezvous(master_addr)
        master_port = master_port or str(port)
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=_int(env, lrank_k, "mpi", default=0),
        local_world_size=_int(env, lsize_k, "mpi", default=None) or world,
        master_addr=master_addr,
        master_port=_parse_int(master_port, "MASTER_PORT", "mpi"),
        launcher="mpi",
    )


def _mpi_flavour(env: Mapping[str, str]) -> str:
    return "openmpi" if "OMPI_COMM_WORLD_RANK" in env else "mpich"


def _mpi_rendezvous(master_addr: str | None) -> tuple[str, int]:
    """Rank 0 picks its address and a free port and broadcasts both over MPI."""
    try:
        from mpi4py import MPI  # lazy: optional (dev extra), only mpirun without MASTER_ADDR needs it
    except ImportError as err:
        raise LaunchError("mpi: launched by mpirun but mpi4py is not installed; "
                          "`pip install mpi4py` or set MASTER_ADDR and MASTER_PORT") from err
    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    answer = None
    if comm.Get_rank() == 0:
        # All ranks on this host: loopback always works. Otherwise the address others
        # reach this host by.
        addr = master_addr or ("127.0.0.1" if len(set(hosts)) == 1 else _host_address())
        answer = (addr, free_port())
    return comm.bcast(answer, root=0)


def _host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except socket.gaierror as err:
        raise LaunchError("mpi: this host's name does not resolve; set MASTER_ADDR") from err


# --- single process -------------------------------------------------------------------

def _single(env: Mapping[str, str]) -> DistEnv:
    port = _int(env, "MASTER_PORT", "single", default=None) or free_port()
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1,
                   master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port,
                   launcher="single")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


# --- helpers --------------------------------------------------------------------------

_MISSING = object()


def _int(env: Mapping[str, str], key: str, launcher: str, default: object = _MISSING) -> int:
    if key not in env or env[key] == "":
        if default is _MISSING:
            raise LaunchError(f"{launcher}: environment variable {key} is not set")
        return default  # type: ignore[return-value]
    return _parse_int(env[key], key, launcher)


def _parse_int(value: str, key: str, launcher: str) -> int:
    try:
        return int(value)
    except ValueError as err:
        raise LaunchError(f"{launcher}: {key}={value!r} is not an integer") from err


def main() -> int:
    """`python -m megasora.launcher.env`: print what this rank discovered (debug aid)."""
    try:
        dist = discover()
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v}" for k, v in vars(dist).items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
