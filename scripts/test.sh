#!/usr/bin/env bash
# The whole test suite, unit to end-to-end, in one command:
#     scripts/test.sh
# It installs and starts whatever is missing (Debian packages, PostgreSQL, Redis, a Python venv),
# then runs every suite in tests/suites/ in order. Each suite is a script that exits non-zero on
# failure; a failing suite does not stop the others. Run one suite: scripts/test.sh 20-rust
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

# shellcheck source=scripts/lib/ensure-deps.sh
source scripts/lib/ensure-deps.sh
ensure_all

export PATH="$REPO_ROOT/.venv/bin:$PATH"
export REPO_ROOT

# Built once here so that every suite uses the same binary.
log "building endpoint-stats (profile ci)"
cargo build --profile ci --locked --bins
export ENDPOINT_STATS_BIN="$REPO_ROOT/target/ci/endpoint-stats"

filter="${1:-}"
passed=0 failed=0 failed_names=()
for suite in tests/suites/*.sh; do
  name="$(basename "$suite" .sh)"
  [[ -z "$filter" || "$name" == *"$filter"* ]] || continue
  log "suite $name"
  start=$SECONDS
  if bash "$suite"; then
    passed=$((passed + 1)); log "suite $name passed in $((SECONDS - start))s"
  else
    failed=$((failed + 1)); failed_names+=("$name"); log "suite $name FAILED in $((SECONDS - start))s"
  fi
done

if ((failed)); then log "failed suites: ${failed_names[*]}"; fi
echo "suites: $passed passed, $failed failed"
((failed == 0))
