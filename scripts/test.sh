#!/usr/bin/env bash
# The whole test suite, unit to end-to-end, in one command:
#     scripts/test.sh
# It installs and starts whatever is missing (Debian packages, PostgreSQL, Redis, a Python venv)
# and runs every suite in tests/suites/. Each suite is a script that exits non-zero on failure; a
# failing suite does not stop the others, and makes this command fail. Run one suite:
#     scripts/test.sh 20-rust
#
# The suites run side by side, in lanes (a lane runs its suites one after the other), as each
# suite's header line "# test.sh: ..." asks:
#   needs=cargo    runs cargo: in the cargo lane, after the service's build (one cargo at a time)
#   needs=binary   runs the service binary: starts when its build has finished
#   lane=NAME      shares lane NAME with the other suites that name it (e.g. they take ports)
# and the others start as soon as the machine is ready. The build (profile ci) starts first, while
# the packages, databases and venv are installed. Each suite's output goes to its own log,
# target/test-logs/SUITE.log, printed whole when the suite ends; a table of the suites' times
# ends the run.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

# shellcheck source=scripts/lib/ensure-deps.sh
source scripts/lib/ensure-deps.sh

export PATH="$REPO_ROOT/.venv/bin:$PATH"
export REPO_ROOT
export ENDPOINT_STATS_BIN="$REPO_ROOT/target/ci/endpoint-stats"
LOGS="$REPO_ROOT/target/test-logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"
T0=$SECONDS

filter="${1:-}"
suites=()
for suite in tests/suites/*.sh; do
  name="$(basename "$suite" .sh)"
  [[ -z "$filter" || "$name" == *"$filter"* ]] && suites+=("$name")
done
((${#suites[@]})) || { log "no suite matches '$filter'"; exit 2; }

# suite_option SUITE KEY: the value of KEY in the suite's "# test.sh:" header line
suite_option() {
  sed -n 's/^# test\.sh:\(.*\)$/\1/p' "tests/suites/$1.sh" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1
}

# run_step NAME CMD...: CMD's output to NAME.log; its start (seconds into the run), duration and
# exit status to NAME.start, NAME.time and NAME.rc (written last: the sign that NAME ended).
run_step() {
  local name="$1" start=$SECONDS rc=0
  shift
  echo "$((start - T0))" >"$LOGS/$name.start"
  "$@" >"$LOGS/$name.log" 2>&1 </dev/null || rc=$?
  echo "$((SECONDS - start))" >"$LOGS/$name.time"
  echo "$rc" >"$LOGS/$name.rc"
}
# wait_for_file FILE: until FILE exists; true when it holds 0.
wait_for_file() {
  while [[ ! -e "$1" ]]; do sleep 0.5; done
  [[ "$(cat "$1")" == 0 ]]
}
not_run() { # not_run SUITE REASON
  echo "$2" >"$LOGS/$1.log"
  echo "$((SECONDS - T0))" >"$LOGS/$1.start"
  echo 0 >"$LOGS/$1.time"
  echo 1 >"$LOGS/$1.rc"
}
# lane [--after-build] SUITE...: the suites one after the other, once the machine is ready (and
# the build has succeeded, with --after-build).
lane() {
  local after_build=0 suite
  if [[ "${1:-}" == --after-build ]]; then after_build=1; shift; fi
  if ! wait_for_file "$LOGS/ready.rc"; then return; fi
  if ((after_build)) && ! wait_for_file "$LOGS/build.rc"; then
    for suite; do not_run "$suite" "not run: the build failed (target/test-logs/build.log)"; done
    return
  fi
  for suite; do run_step "$suite" bash "tests/suites/$suite.sh"; done
}

# Lanes: the build and then the cargo suites; a lane per lane= name; a lane per other suite.
cargo_suites=() after_build_lanes=() free_lanes=()
declare -A lane_suites=()
for name in "${suites[@]}"; do
  needs="$(suite_option "$name" needs)" lane_name="$(suite_option "$name" lane)"
  if [[ "$needs" == cargo ]]; then cargo_suites+=("$name"); continue; fi
  key="${lane_name:-$name}"
  if [[ -z "${lane_suites[$key]:-}" ]]; then
    if [[ "$needs" == binary ]]; then after_build_lanes+=("$key"); else free_lanes+=("$key"); fi
  fi
  lane_suites[$key]+="$name "
done

# Every lane is a process group of its own (set -m), so that an interrupted run stops exactly
# the processes it started.
lane_pids=()
stop_lanes() {
  local pid
  for pid in "${lane_pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
}
lanes_alive() {
  local pid
  for pid in "${lane_pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
trap 'stop_lanes; exit 130' INT TERM
trap stop_lanes EXIT
set -m

# The service binary, built once (profile ci) for every suite that runs it: the longest step, so
# it starts first; the packages, databases and venv are installed meanwhile.
log "building endpoint-stats (profile ci): target/test-logs/build.log"
{
  run_step build cargo build --profile ci --locked --bin endpoint-stats
  lane "${cargo_suites[@]}"
} &
lane_pids+=($!)
for key in "${free_lanes[@]}"; do
  # shellcheck disable=SC2086 # the lane's suite names, split on purpose
  lane ${lane_suites[$key]} &
  lane_pids+=($!)
done
for key in "${after_build_lanes[@]}"; do
  # shellcheck disable=SC2086
  lane --after-build ${lane_suites[$key]} &
  lane_pids+=($!)
done
set +m

ensure_all # on failure the EXIT trap stops the lanes
echo 0 >"$LOGS/ready.rc"
log "running ${suites[*]}: each suite's log is printed when it ends"

# Each step's log, whole, as it ends.
steps=(build "${suites[@]}")
declare -A shown=()
while ((${#shown[@]} < ${#steps[@]})); do
  for name in "${steps[@]}"; do
    [[ -z "${shown[$name]:-}" && -e "$LOGS/$name.rc" ]] || continue
    shown[$name]=1
    rc="$(cat "$LOGS/$name.rc")"
    printf '\n==> %s %s in %ss (started at %ss) ------------------------------------------\n' \
      "$name" "$( ((rc == 0)) && echo passed || echo FAILED)" "$(cat "$LOGS/$name.time")" "$(cat "$LOGS/$name.start")"
    cat "$LOGS/$name.log"
    printf '==> end of %s (%s)\n' "$name" "$( ((rc == 0)) && echo passed || echo "FAILED, exit status $rc")"
  done
  if ((${#shown[@]} < ${#steps[@]})) && ! lanes_alive; then
    for name in "${steps[@]}"; do
      [[ -e "$LOGS/$name.rc" ]] || not_run "$name" "no result: its lane ended without one"
    done
  fi
  sleep 1
done
wait
trap - EXIT

# The table: every step, its result, when it started and how long it took.
failed_names=()
printf '\n%-24s %-8s %8s %8s\n' step result start time
for name in "${steps[@]}"; do
  rc="$(cat "$LOGS/$name.rc")"
  ((rc == 0)) || failed_names+=("$name")
  printf '%-24s %-8s %7ss %7ss\n' "$name" "$( ((rc == 0)) && echo ok || echo FAILED)" \
    "$(cat "$LOGS/$name.start")" "$(cat "$LOGS/$name.time")"
done
wall=$((SECONDS - T0))
printf '%-24s %-8s %8s %7ss (%dm%02ds)\n' "wall time" "" "" "$wall" $((wall / 60)) $((wall % 60))
if ((${#failed_names[@]})); then log "failed: ${failed_names[*]} (logs in target/test-logs/)"; fi
echo "build and suites: $((${#steps[@]} - ${#failed_names[@]})) passed, ${#failed_names[@]} failed"
((${#failed_names[@]} == 0))
