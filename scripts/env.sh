#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv with torch==2.13.0 pinned.
# Every pip call goes through a constraints file so pip can never resolve a CUDA build of torch.
# Usage: bash scripts/env.sh [extra ...]   (extras of the mtssm package, e.g. test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
constraints=.venv/constraints.txt
echo "torch==2.13.0" > "$constraints"
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install -c "$constraints" "torch==2.13.0"
pip install -c "$constraints" setuptools wheel
extras=$(IFS=,; echo "$*")
pip install -c "$constraints" -e ".${extras:+[$extras]}"
if [[ ",$extras," == *",test,"* ]]; then
  # mamba-ssm is the correctness anchor of the scan tests. Only its pure-PyTorch reference is used,
  # so it is installed without its CUDA build and without its dependencies.
  if ! .venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('mamba_ssm') is None)"; then
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
      pip install -c "$constraints" --no-deps --no-build-isolation "mamba-ssm==2.3.2.post1"
  fi
  # The deployment test builds the C++ program (deploy/cpp) with CMake: from PyPI where the system
  # has none (it lands in .venv/bin).
  if ! command -v cmake >/dev/null; then
    pip install -c "$constraints" "cmake>=3.18"
  fi
fi
