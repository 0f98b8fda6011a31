#!/bin/bash
# Launch MegaSora training with torchrun, one process per GPU on this node.
#
#   launch/torchrun.sh --config configs/tiny.yaml [--set k=v ...]
#
# Multi-node without Slurm: run this on every node with the same NNODES and MASTER_ADDR
# (the host of node rank 0) and that node's NODE_RANK. torchrun sets RANK/WORLD_SIZE/
# LOCAL_RANK/MASTER_ADDR/MASTER_PORT; megasora.launcher.env picks them up. No ssh needed.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-a launch/torchrun.sh --config ...   # on node-a
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node-a launch/torchrun.sh --config ...   # on node-b
# On Slurm, prefer `megasora submit` (srun starts the ranks; see docs/slurm.md).
set -euo pipefail
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun \
    --nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" --nproc-per-node="$NPROC" \
    --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
    -m megasora train "$@"
