#!/usr/bin/env bash
# Create ./.venv and install bge_ray into it at the versions in requirements/lock.txt (the versions
# the test suite last passed on). `scripts/setup.sh dev` adds the test/benchmark extra.
#   BGE_RAY_LOCK=none scripts/setup.sh dev   resolves the newest releases pyproject.toml allows instead.
# Torch is installed first and pinned to 2.13.0: on these machines that is a local CPU wheel,
# while any looser request would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=${BGE_RAY_LOCK:-requirements/lock.txt}

source scripts/pip-quiet.sh

locked=()
pip_version=pip
if [ "$LOCK" != none ]; then
  [ -f "$LOCK" ] || { echo "setup.sh: lock file $LOCK not found (BGE_RAY_LOCK=none to resolve unlocked)" >&2; exit 1; }
  locked=(-c "$LOCK")
  pip_version=$(grep -E '^pip==' "$LOCK" || echo pip)
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet .venv/bin/python -m pip install -q --upgrade "$pip_version"
quiet .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ "${1:-}" = "dev" ]; then
  quiet .venv/bin/python -m pip install -q -e ".[dev]" "${locked[@]}"
else
  quiet .venv/bin/python -m pip install -q -e . "${locked[@]}"
fi
