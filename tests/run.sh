#!/usr/bin/env bash
# The test command: sets up everything on a fresh machine, then runs the whole suite.
#   bash tests/run.sh                 # everything (what CI runs)
#   bash tests/run.sh -m "not slurm"  # extra pytest arguments pass through
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/launch/bootstrap.sh"
# Real Slurm (slurmctld/slurmd/munge) for the launcher integration tests.
if [ -x "$REPO/slurm/testing/install.sh" ]; then bash "$REPO/slurm/testing/install.sh"; fi
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
export MEGASORA_CACHE="${MEGASORA_CACHE:-$REPO/.cache}"
# DeepSpeed JIT-builds its CPU comm op; a cache private to this checkout stops other venvs'
# builds from invalidating it (each rebuild stalls every multi-process test for a minute).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}"
# Lint first (pyflakes, import order, bugbear; [tool.ruff] in pyproject.toml): a finding fails the run
# before any test.
ruff check megasora tests bench
# Types ([tool.mypy] in pyproject.toml: megasora/); an error fails the run before any test too.
mypy
exec python -m pytest "$@"   # pytest.ini: testpaths = tests
