#!/usr/bin/env bash
# The local stack refuses to start on a port that is already in use, names that port, and starts
# nothing (no process, no state left running): from this checkout, and from a fresh clone that has
# no .venv yet, as a newcomer's has before scripts/test.sh ever ran.
# test.sh: needs=binary lane=local-stack
set -euo pipefail

REPO_ROOT="${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
work="$(mktemp -d "${TMPDIR:-/tmp}/stack-ports.XXXXXX")"
holder=""
cleanup() {
  [[ -n "$holder" ]] && kill "$holder" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# Hold a port that the stack will want (its base port: the load balancer), from 20000–32000.
port_file="$work/port"
python3 "$REPO_ROOT/scripts/lib/supervise.py" hold-port "$port_file" --from 20000 --to 32000 --step 20 --seconds 120 &
holder=$!
for _ in $(seq 1 50); do [[ -s "$port_file" ]] && break; sleep 0.1; done
port="$(cat "$port_file")"

# shellcheck source=tests/lib/checks.sh
source "$REPO_ROOT/tests/lib/checks.sh"

# The committed files only: no .venv, no target/.
clone="$work/clone"
git clone -q "$REPO_ROOT" "$clone"
[[ ! -e "$clone/.venv" ]] || { echo "the clone has a .venv"; exit 1; }

for root in "$REPO_ROOT" "$clone"; do
  where="${root/#$clone/a fresh clone}"
  set +e
  output="$(ENDPOINT_STATS_BIN="${ENDPOINT_STATS_BIN:-$REPO_ROOT/target/release/endpoint-stats}" \
    bash "$root/scripts/local-stack.sh" up --dir "$work/stack" --base-port "$port" 2>&1)"
  status=$?
  set -e
  if ((status != 0)); then check_pass "$where: up exits non-zero when port $port is taken (exit $status)"; else check_fail "$where: up started although port $port is taken"; fi
  if [[ "$output" == *"$port"* ]]; then check_pass "$where: the message names port $port"; else check_fail "$where: the message does not name port $port"; fi
  if pgrep -f "$work/stack" >/dev/null; then check_fail "$where: pieces of the stack still run"; else check_pass "$where: nothing of the stack runs afterwards"; fi
  if ((CHECKS_FAILED)); then printf '%s\n' "--- local-stack.sh said:" "$output"; fi
done
check_summary local-stack-ports
