# Sourced by setup.sh and update-lock.sh. quiet CMD...: run CMD, printing its output without pip's
# warnings about index folders this machine lacks (and without build-backend warnings).
quiet() {
  local log rc=0
  log=$(mktemp)
  PYTHONWARNINGS=ignore "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  return "$rc"
}
