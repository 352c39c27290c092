#!/usr/bin/env bats
# scripts/lib/stack-lib.sh, the shell's process supervision (scripts/local-stack.sh and the
# end-to-end suite use it): start, readiness, identity, stop, crash, and the port checks of
# scripts/lib/supervise.py it calls. Ordinary commands (sleep, python3 -m http.server) stand in
# for the stack's pieces. Every launch closes bats' fd 3 (3>&-): a piece left running must not
# keep bats waiting.

setup() {
  REPO_ROOT="$(cd "$BATS_TEST_DIRNAME/../.." && pwd)"
  # shellcheck source=scripts/lib/stack-lib.sh
  source "$REPO_ROOT/scripts/lib/stack-lib.sh"
  export STACK_DIR="$BATS_TEST_TMPDIR/stack"
  mkdir -p "$STACK_DIR"
  PORT="$(python3 "$REPO_ROOT/scripts/lib/supervise.py" free-port)"
}

teardown() {
  local pid f
  for f in "$STACK_DIR"/pids/*.pid; do
    [[ -e "$f" ]] || continue
    pid="$(cat "$f")"
    pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null
  done
  wait_wrappers
}

@test "supervise_start: launches, waits for readiness, records the piece's identity" {
  run supervise_start web "$PORT" 20 http_ok "http://127.0.0.1:$PORT/" -- python3 -m http.server --bind 127.0.0.1 "$PORT" 3>&-
  [ "$status" -eq 0 ]
  pid="$(owned_pid web)"
  [ -n "$pid" ]
  [ -s "$STACK_DIR/pids/web.start" ]
  http_ok "http://127.0.0.1:$PORT/"
  port_in_use "$PORT"
  [ "$(busy_ports "$PORT" 1)" = "$PORT" ]
}

@test "supervise_start: a piece that already runs is left alone" {
  supervise_launch sleeper sleep 30 3>&-
  pid="$(owned_pid sleeper)"
  run supervise_start sleeper "$PORT" 5 true -- sleep 30 3>&-
  [ "$status" -eq 0 ]
  [[ "$output" == *"sleeper already runs"* ]]
  [ "$(owned_pid sleeper)" = "$pid" ]
}

@test "supervise_start: refuses a port in use and names it; starts nothing" {
  python3 "$REPO_ROOT/scripts/lib/supervise.py" hold-port "$BATS_TEST_TMPDIR/held" --from "$PORT" --to "$((PORT + 1))" --seconds 30 3>&- &
  holder=$!
  for _ in $(seq 1 50); do [[ -s "$BATS_TEST_TMPDIR/held" ]] && break; sleep 0.1; done
  run supervise_start web "$PORT" 5 true -- sleep 30 3>&-
  kill "$holder"
  [ "$status" -eq 1 ]
  [[ "$output" == *"port $PORT is in use"* ]]
  [ ! -e "$STACK_DIR/pids/web.pid" ]
}

@test "supervise_start: a piece that exits during startup fails at once, with its log's tail" {
  run supervise_start broken "$PORT" 20 false -- sh -c 'echo "cannot open the configuration"; exit 3' 3>&-
  [ "$status" -eq 1 ]
  [[ "$output" == *"exited during startup"* ]]
  [[ "$output" == *"cannot open the configuration"* ]]
}

@test "supervise_start: a piece that never gets ready fails after its timeout" {
  SECONDS=0
  run supervise_start slow "$PORT" 2 false -- sleep 30 3>&-
  [ "$status" -eq 1 ]
  [[ "$output" == *"not ready after 2s"* ]]
  ((SECONDS < 10))
}

@test "owned_pid: a recycled pid (another start time) is not the piece's" {
  supervise_launch sleeper sleep 30 3>&-
  owned_pid sleeper
  echo 1 >"$STACK_DIR/pids/sleeper.start"
  run owned_pid sleeper
  [ "$status" -eq 1 ]
}

@test "supervise_stop: SIGTERM, the piece is gone, its pid files removed" {
  supervise_launch sleeper sleep 30 3>&-
  pid="$(owned_pid sleeper)"
  run supervise_stop sleeper TERM 5
  [ "$status" -eq 0 ]
  run pid_alive "$pid"
  [ "$status" -ne 0 ]
  [ ! -e "$STACK_DIR/pids/sleeper.pid" ]
  run supervise_stop sleeper TERM 5
  [[ "$output" == *"sleeper is not running"* ]]
}

@test "supervise_stop: a piece that ignores its signal is killed after the timeout" {
  supervise_launch stubborn sh -c 'trap "" TERM INT; while :; do sleep 0.1; done' 3>&-
  pid="$(owned_pid stubborn)"
  run supervise_stop stubborn INT 1
  [ "$status" -eq 0 ]
  [[ "$output" == *"did not stop within 5s: SIGKILL"* ]]
  run pid_alive "$pid"
  [ "$status" -ne 0 ]
}

@test "supervise_stop --rc: reports the exit status, and fails unless it is 0" {
  supervise_launch good --rc sh -c 'trap "exit 0" TERM; while :; do sleep 0.1; done' 3>&-
  run supervise_stop --rc good TERM 5
  [ "$status" -eq 0 ]
  [[ "$output" == *"good stopped (exit status 0)"* ]]
  supervise_launch bad --rc sh -c 'trap "exit 7" TERM; while :; do sleep 0.1; done' 3>&-
  run supervise_stop --rc bad TERM 5
  [ "$status" -eq 1 ]
  [[ "$output" == *"bad stopped (exit status 7)"* ]]
}

@test "supervise_launch --env: the value reaches the piece, not its command line" {
  # shellcheck disable=SC2016 # expanded by the piece's shell
  supervise_launch envy --env SECRET_VALUE=hunter2 sh -c 'echo "seen $SECRET_VALUE"; sleep 30' 3>&-
  pid="$(owned_pid envy)"
  for _ in $(seq 1 50); do grep -q seen "$STACK_DIR/logs/envy.log" && break; sleep 0.1; done
  grep -qx "seen hunter2" "$STACK_DIR/logs/envy.log"
  run grep -q hunter2 "/proc/$pid/cmdline"
  [ "$status" -eq 1 ]
}

@test "supervise_kill: SIGKILL, no drain" {
  supervise_launch sleeper sleep 30 3>&-
  pid="$(owned_pid sleeper)"
  run supervise_kill sleeper
  [[ "$output" == *"sleeper killed (pid $pid)"* ]]
  run pid_alive "$pid"
  [ "$status" -ne 0 ]
}
