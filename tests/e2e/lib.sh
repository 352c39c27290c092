#!/usr/bin/env bash
# Helpers of tests/suites/60-e2e-stack.sh. Sourced, never run. Needs REPO_ROOT.

# shellcheck source=scripts/lib/stack-lib.sh
source "$REPO_ROOT/scripts/lib/stack-lib.sh"

# shellcheck source=tests/lib/checks.sh
source "$REPO_ROOT/tests/lib/checks.sh"
section() { printf '\n=== %s (t=%ss)\n' "$*" "$SECONDS"; }

# pick_base_port: a random block of 20 free loopback ports (the stack uses BASE..BASE+19), below
# the kernel's ephemeral range (outgoing connections take their local ports from there).
pick_base_port() {
  local try base busy low=32768
  read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  for try in $(seq 1 30); do
    base=$((20000 + (RANDOM % ((low - 20000 - 20) / 10)) * 10))
    # shellcheck disable=SC2046 # one argument per port
    busy="$(busy_ports $(seq "$base" $((base + 19))))"
    [[ -n "$busy" ]] || { echo "$base"; return 0; }
    : "$try"
  done
  return 1
}

# Background traffic: traffic_start NAME CMD... runs CMD again and again (each run bounded by
# itself) until traffic_stop NAME or E2E_TRAFFIC_MAX seconds; no request loop is unbounded.
declare -A E2E_TRAFFIC_PIDS=()
traffic_start() {
  local name="$1"; shift
  local stop="$E2E_WORK/traffic-$name.stop" max="${E2E_TRAFFIC_MAX:-120}"
  rm -f "$stop"
  (
    end=$((SECONDS + max))
    while [[ ! -e "$stop" ]] && ((SECONDS < end)); do "$@" >/dev/null 2>&1 || sleep 0.2; done
  ) &
  E2E_TRAFFIC_PIDS[$name]=$!
}
traffic_stop() {
  local name="$1" pid="${E2E_TRAFFIC_PIDS[$1]:-}"
  [[ -n "$pid" ]] || return 0
  touch "$E2E_WORK/traffic-$name.stop"
  pkill -TERM -P "$pid" 2>/dev/null || true # the current run of CMD: the loop's own child
  wait "$pid" 2>/dev/null || true
  unset "E2E_TRAFFIC_PIDS[$name]"
}
traffic_stop_all() {
  local name
  for name in "${!E2E_TRAFFIC_PIDS[@]}"; do traffic_stop "$name"; done
}

# poll DESCRIPTION TIMEOUT CMD...: true as soon as CMD succeeds, false after TIMEOUT seconds.
poll() {
  local what="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then printf '  (%s: not within %ss)\n' "$what" "$timeout"; return 1; fi
    sleep 0.5
  done
}

# http_status URL [MAX_SECONDS]: the status code (000 when no answer in time).
http_status() { curl -s -o /dev/null -w '%{http_code}' --max-time "${2:-5}" "$1" || true; }
