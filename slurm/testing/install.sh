#!/bin/bash
# Install what the Slurm/MPI integration tests need, if missing (Debian/Ubuntu, as root or
# with sudo): munge + slurm-wlm (slurmctld, slurmd, clients) for the local test cluster
# (slurm/testing/cluster.py). OpenMPI comes with launch/bootstrap.sh. Idempotent.
set -euo pipefail
missing=0
for cmd in munged slurmctld slurmd sbatch srun scontrol sinfo sacct; do
    command -v "$cmd" >/dev/null 2>&1 || missing=1
done
[ "$missing" = 0 ] && exit 0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
echo "[slurm] apt-get install munge slurm-wlm"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    munge slurm-wlm slurmctld slurmd slurm-client >/dev/null
