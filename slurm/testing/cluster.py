#!/usr/bin/env python3
"""A real multi-node Slurm cluster on one machine, for tests and for trying the templates.

Debian's slurmd is built with multiple-slurmd support: one host runs several slurmd
daemons, each started as `slurmd -N nodeK` with its own port, so slurmctld sees N
distinct compute nodes. Everything (config, munge key and socket, spool, logs, state)
lives in a private directory, so the system's /etc/slurm and /run/munge stay untouched.

    python slurm/testing/cluster.py up --nodes 2 --cpus 2     # prints `export SLURM_CONF=...`
    eval "$(python slurm/testing/cluster.py env)"
    srun -N2 -n4 hostname
    python slurm/testing/cluster.py down                       # kill daemons, remove state

Must run as root (SlurmUser=root, munged and slurmd need to switch users). Job accounting
without slurmdbd: jobcomp/filetxt records finished jobs, `sacct -c` reads them, and
MinJobAge keeps finished jobs visible to `scontrol show job` for an hour.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

APT_PACKAGES = ("munge", "slurm-wlm", "slurmctld", "slurmd", "slurm-client")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "sacct")
# Private ports, away from the system default 6817/6818 and from Linux ephemeral ports.
DEFAULT_BASE_PORT = 16817


def default_state_dir() -> Path:
    return Path(os.environ.get("MEGASORA_SLURM_DIR", f"/tmp/megasora-slurm-{os.getuid()}"))


def _log(msg: str) -> None:
    print(f"[slurm-cluster] {msg}", file=sys.stderr, flush=True)


def install() -> None:
    """apt-get install munge + slurm (controller, compute daemon, clients) if missing."""
    if all(shutil.which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SystemExit("installing slurm needs root (apt-get); run as root or install: "
                         + " ".join(APT_PACKAGES))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _log("installing " + " ".join(APT_PACKAGES))
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def slurm_conf(state: Path, nodes: int, cpus: int, base_port: int) -> str:
    """slurm.conf for `nodes` compute nodes node1..nodeN, all daemons on this host."""
    host = socket.gethostname()
    node_lines = [
        # NodeAddr on distinct loopback addresses (all of 127/8 is loopback on Linux): each
        # "node" has its own address, like a real cluster, while NodeHostname names the host
        # that actually runs the daemon. Port makes the daemons distinct.
        f"NodeName=node{i} NodeAddr=127.0.0.{i + 1} NodeHostname={host} Port={base_port + i} "
        f"CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1024 State=UNKNOWN"
        for i in range(1, nodes + 1)
    ]
    return "\n".join([
        "ClusterName=megasora-local",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={base_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        # cred_expire also sets how long a requeued job waits before it may start again
        # (default 120 s, so that no node still holds the old run's revoked credential).
        # Steps here launch in well under a second, so 30 s is plenty and keeps tests short.
        f"AuthInfo=socket={state}/munge/munge.socket,cred_expire=30",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={state}/ctld",
        f"SlurmdSpoolDir={state}/spool/%n",
        f"SlurmctldPidFile={state}/run/slurmctld.pid",
        f"SlurmdPidFile={state}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={state}/log/slurmctld.log",
        f"SlurmdLogFile={state}/log/slurmd-%n.log",
        f"PlugStackConfig={state}/plugstack.conf",
        # No cgroups in containers: track processes via /proc, no task binding.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        # Trust the CPUs= we configure, not the (smaller) real core count of this host.
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        # No slurmdbd: finished jobs go to a text file that `sacct -c` reads ...
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={state}/log/jobcomp.txt",
        # ... and stay in slurmctld memory (`scontrol show job`) for an hour.
        "MinJobAge=3600",
        "JobRequeue=1",
        "KillWait=10",
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=60",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=defer_batch=0",
        *node_lines,
        f"PartitionName=debug Nodes=node[1-{nodes}] Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


CGROUP_CONF = "CgroupPlugin=autodetect\nIgnoreSystemd=yes\n"


def _write_configs(state: Path, nodes: int, cpus: int, base_port: int) -> Path:
    for sub in ("munge", "ctld", "run", "log", "spool"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    for i in range(1, nodes + 1):
        (state / "spool" / f"node{i}").mkdir(exist_ok=True)
    conf = state / "slurm.conf"
    conf.write_text(slurm_conf(state, nodes, cpus, base_port))
    (state / "cgroup.conf").write_text(CGROUP_CONF)
    (state / "plugstack.conf").write_text("")
    return conf


def _start_munge(state: Path) -> None:
    mdir = state / "munge"
    key = mdir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    mdir.chmod(0o700)
    subprocess.run([
        "munged", "--force",
        f"--socket={mdir}/munge.socket", f"--key-file={key}",
        f"--pid-file={mdir}/munged.pid", f"--log-file={state}/log/munged.log",
        f"--seed-file={mdir}/munged.seed",
    ], check=True)


def _slurm_env(state: Path) -> dict[str, str]:
    return dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))


def _wait_idle(state: Path, nodes: int, timeout: float) -> None:
    env = _slurm_env(state)
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env,
                              capture_output=True, text=True)
        out = proc.stdout.strip()
        states = dict(line.split() for line in out.splitlines() if line.strip())
        if len(states) == nodes and all(s == "idle" for s in states.values()):
            return
        time.sleep(0.5)
    logs = "\n".join(_tail(p) for p in sorted((state / "log").glob("*.log")))
    raise SystemExit(f"slurm nodes not idle after {timeout:.0f}s; sinfo:\n{out}\n{logs}")


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name}\n" + "\n".join(text)


def up(state: Path, nodes: int, cpus: int, base_port: int, timeout: float) -> None:
    """Write configs, start munged, slurmctld and one slurmd per node; wait until idle."""
    if os.geteuid() != 0:
        raise SystemExit("the local test cluster runs as root (SlurmUser=root)")
    install()
    down(state)
    conf = _write_configs(state, nodes, cpus, base_port)
    _start_munge(state)
    env = _slurm_env(state)
    # -c: clear saved state (a fresh cluster, no stale jobs from earlier runs).
    subprocess.run(["slurmctld", "-c", "-f", str(conf)], check=True, env=env)
    for i in range(1, nodes + 1):
        subprocess.run(["slurmd", "-N", f"node{i}", "-f", str(conf)], check=True, env=env)
    _wait_idle(state, nodes, timeout)
    _log(f"{nodes} nodes idle; state in {state}")
    print(f"export SLURM_CONF={conf}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


SLURM_PROCESS_NAMES = {"munged", "slurmctld", "slurmd", "slurmstepd"}


def _proc_table() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (parent pid, command name, cmdline + environ) for every readable process."""
    table = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        # stat is "pid (comm) state ppid ..."; comm may contain spaces, so split at ")".
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        table[int(proc.name)] = (ppid, comm, blob)
    return table


def _cluster_processes(state: Path) -> list[int]:
    """Our daemons and slurmstepds (they carry the state dir in argv or SLURM_CONF) and
    every process below them (the jobs). A user's shell with SLURM_CONF set is not one."""
    marker = str(state).encode()
    table = _proc_table()
    ours = {pid for pid, (_, comm, blob) in table.items()
            if comm in SLURM_PROCESS_NAMES and marker in blob}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in ours} - ours
        ours |= children
        grew = bool(children)
    ours.discard(os.getpid())
    return sorted(ours)


def down(state: Path) -> None:
    """Stop every daemon and job of this cluster, then remove its state directory."""
    pids = _cluster_processes(state)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if state.exists():
        shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="install if needed, start N nodes, wait until idle")
    p_up.add_argument("--nodes", type=int, default=2)
    p_up.add_argument("--cpus", type=int, default=2, help="CPUs per node (may exceed real cores)")
    p_up.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    p_up.add_argument("--timeout", type=float, default=60)
    sub.add_parser("down", help="kill all daemons and jobs, remove the state directory")
    sub.add_parser("install", help="apt-get install munge and slurm if missing")
    sub.add_parser("env", help="print the export line for clients")
    args = parser.parse_args(argv)
    if args.cmd == "up":
        up(args.state_dir, args.nodes, args.cpus, args.base_port, args.timeout)
    elif args.cmd == "down":
        down(args.state_dir)
    elif args.cmd == "install":
        install()
    else:
        print(f"export SLURM_CONF={args.state_dir / 'slurm.conf'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
