#!/usr/bin/env bash
# Create ./.venv and install bge_ray into it. `scripts/setup.sh dev` adds the test/benchmark extra.
# Torch is installed first and pinned to 2.13.0: on these machines that is a local CPU wheel,
# while any looser request would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip show -q torch >/dev/null 2>&1 || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ "${1:-}" = "dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
