#!/usr/bin/env bash
# Create ./.venv and install bge_ray into it. `scripts/setup.sh dev` adds the test/benchmark extra.
# Torch is installed first and pinned to 2.13.0: on these machines that is a local CPU wheel,
# while any looser request would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Run a command, printing its output without pip's warnings about index folders this machine lacks.
quiet() {
  local log rc=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  return "$rc"
}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet .venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip show -q torch >/dev/null 2>&1 || quiet .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ "${1:-}" = "dev" ]; then
  quiet .venv/bin/python -m pip install -q -e ".[dev]"
else
  quiet .venv/bin/python -m pip install -q -e .
fi
