#!/bin/bash
# Launch MegaSora training with the DeepSpeed launcher.
#
#   launch/deepspeed.sh --config configs/tiny.yaml [--set k=v ...]
#
# Single node: all local GPUs. Multi-node without pdsh/ssh: run on every node with
# NNODES, NODE_RANK and MASTER_ADDR set; `--no_ssh` makes each launcher start only its
# own node's ranks. The launcher exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; rank
# discovery (megasora.launcher.env) reads them, so the trainer is launcher-agnostic.
set -euo pipefail
args=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
if [ "${NNODES:-1}" -gt 1 ]; then
    args+=(--no_ssh --num_nodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}")
fi
[ -n "${NPROC:-}" ] && args+=(--num_gpus "$NPROC")
# --no_local_rank: LOCAL_RANK is in the environment; megasora takes no --local_rank flag.
exec deepspeed "${args[@]}" --no_local_rank --module megasora train "$@"
