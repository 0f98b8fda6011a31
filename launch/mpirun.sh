#!/bin/bash
# Launch MegaSora training with OpenMPI's mpirun.
#
#   NP=4 launch/mpirun.sh --config configs/tiny.yaml [--set k=v ...]
#
# Each rank reads OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK; rank 0 picks the rendezvous
# address and a free port and broadcasts them with mpi4py (megasora.launcher.env), so
# nothing needs to be exported. Multi-node: pass a hostfile (HOSTFILE=...); inside a Slurm
# or PBS allocation mpirun starts its remote daemons through srun/tm, elsewhere it uses ssh.
# --bind-to none: the trainer sets its own threads (OMP_NUM_THREADS); OpenMPI's default
# core binding would pin several ranks and all their threads to one core.
set -euo pipefail
args=(-np "${NP:-1}" --bind-to none -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} python -m megasora train "$@"
