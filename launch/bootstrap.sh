#!/usr/bin/env bash
# Set up everything MegaSora needs on a fresh Debian machine, idempotently:
# system packages (OpenMPI for mpi4py), .venv, torch, and `pip install -e .[dev]`.
# Sourced by launch/quickstart.sh and tests/run.sh; safe to run again (it skips what is done).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGASORA_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${MEGASORA_TORCH:-torch==2.13.0}"   # GPU users: export MEGASORA_TORCH to their CUDA build

need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include ] \
  || dpkg -s libopenmpi-dev >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[bootstrap] apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
fi
"$VENV/bin/python" -c "import torch" 2>/dev/null || {
  echo "[bootstrap] pip install $TORCH_SPEC"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" numpy
}

# Reinstall the package only when its metadata (pyproject.toml, setup.py) or native sources changed.
stamp="$VENV/.megasora-install-stamp"
digest="$(cat "$REPO/pyproject.toml" "$REPO/setup.py" $(find "$REPO/csrc" -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  echo "[bootstrap] pip install -e .[dev] (builds the csrc extension)"
  # No build isolation: the extension compiles against the torch already in the venv.
  "$VENV/bin/pip" install -q --no-build-isolation -e "$REPO[dev]"
  echo "$digest" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # models load from local dirs only
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}"  # DeepSpeed's JIT ops, per checkout
