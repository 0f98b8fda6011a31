#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py says what it runs): one H100 / H200, under 8 minutes.
#
#   bash bench/gpu_check.sh --out "$OUT"    # on the GPU machine, from anywhere in the repository
#   bash bench/gpu_check.sh --dry           # on CPU at tiny sizes (tests/test_gpu_check.py runs it)
#
# Writes <out>/gpu_check.md (the table for docs/benchmarks.md) and <out>/gpu_check.json; exit
# status 0 when every check passed, 1 when one failed, 2 without a GPU (and no --dry).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# JIT builds of the csrc extension land here and are reused by the pytest the check starts
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export MEGASORA_CACHE="${MEGASORA_CACHE:-$PWD/.cache}"
# Every tensor a collective gets must live on the training device (parallel/device_check.py): on the
# GPU a host tensor reaching NCCL is a failure here, not a hang on the first cluster.
export MEGASORA_CHECK_COLLECTIVE_DEVICES="${MEGASORA_CHECK_COLLECTIVE_DEVICES:-1}"
if [[ " $* " == *" --dry "* ]]; then export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""; fi
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" bench/gpu_check.py "$@"
