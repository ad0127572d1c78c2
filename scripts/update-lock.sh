#!/usr/bin/env bash
# Refresh requirements/lock.txt to the newest releases that pyproject.toml and requirements/caps.txt
# allow, in a fresh ./.venv-lock, and run the test suite there (CI=true: a skip for a failed import
# fails). The lock is replaced only when the suite passes; otherwise the candidate stays beside it
# as requirements/lock.txt.new.
#   scripts/update-lock.sh [--no-caps] [--no-test] [pytest args...]
#   --no-caps   ignore requirements/caps.txt (try the newest of everything; the oracles may break)
#   --no-test   write the lock without running the suite
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-lock
caps=(-c requirements/caps.txt)
run_tests=1
pytest_args=()
for arg in "$@"; do
  case "$arg" in
    --no-caps) caps=() ;;
    --no-test) run_tests=0 ;;
    *) pytest_args+=("$arg") ;;
  esac
done

source scripts/pip-quiet.sh

rm -rf "$VENV"
"$PY" -m venv "$VENV"
quiet "$VENV/bin/python" -m pip install -q --upgrade pip
quiet "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
quiet "$VENV/bin/python" -m pip install -q -e ".[dev]" "${caps[@]}"
"$VENV/bin/python" -m pip check

new=requirements/lock.txt.new
status="not run (--no-test)"
[ "$run_tests" = 1 ] && status="passed"
{
  echo "# Exact versions for scripts/setup.sh (plain and dev installs), written by scripts/update-lock.sh."
  echo "# $(date -u +%Y-%m-%d): test suite ${status} on these, $("$VENV/bin/python" -c 'import platform; print(platform.python_implementation(), platform.python_version(), platform.machine())'), caps: ${caps[*]:-none}."
  # torch's local label (+cpu) is dropped: setup.sh installs torch 2.13.0 from the local wheel first.
  "$VENV/bin/python" -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} >"$new"

if [ "$run_tests" = 1 ]; then
  if ! CI=true "$VENV/bin/python" -m pytest -rs "${pytest_args[@]}"; then
    echo "update-lock.sh: the suite failed on the new versions; requirements/lock.txt is unchanged." >&2
    { diff requirements/lock.txt "$new" || true; } | grep -E '^[<>] [^#]' >&2 || true
    exit 1
  fi
fi
if [ -f requirements/lock.txt ]; then
  # diff exits 1 when the files differ, which pipefail would report as the pipeline's failure.
  changes=$( { diff requirements/lock.txt "$new" || true; } | grep -E '^[<>] [^#]' || true)
  echo "${changes:-update-lock.sh: no version changed}"
fi
mv "$new" requirements/lock.txt
echo "update-lock.sh: requirements/lock.txt updated"
