#!/usr/bin/env bash
# Process, port and readiness helpers of the local stack (scripts/local-stack.sh) and of the
# end-to-end suite (tests/suites/60-e2e-stack.sh). Sourced, never run.
#
# Every piece of the stack is a process whose pid is kept in "$STACK_DIR/pids/NAME.pid" and whose
# output goes to "$STACK_DIR/logs/NAME.log". Nothing here touches a process it did not start.

stack_log() { printf '==> %s\n' "$*" >&2; }
stack_die() { printf 'local-stack: %s\n' "$*" >&2; exit 1; }

# port_in_use PORT: true when something listens on 127.0.0.1:PORT (or on every address). The test
# binds like the servers do (SO_REUSEADDR), so sockets in TIME_WAIT do not count as "in use".
port_in_use() {
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
finally:
    s.close()
sys.exit(1)
EOF
}

# busy_ports PORT...: prints those of the ports that are in use (one python start for all).
busy_ports() {
  python3 - "$@" <<'EOF'
import socket, sys
for port in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(port)))
    except OSError:
        print(port)
    finally:
        s.close()
EOF
}

# port_owner PORT: who holds the port, for error messages: the listener ("name",pid=N) when ss
# can tell, else the connections using it as their local port.
port_owner() {
  local owner
  owner="$(ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\("[^"]*",pid=[0-9]*\).*/\1/p' | head -1 || true)"
  if [[ -z "$owner" ]]; then
    owner="$(ss -tanH "sport = :$1" 2>/dev/null | awk '{print $1 " " $4 "->" $5}' | head -2 | paste -sd';' - || true)"
    owner="${owner:+not listening; connections: $owner}"
  fi
  echo "${owner:-owner unknown}"
}

# pid_alive PID: the process exists and is not a zombie.
pid_alive() {
  local pid="$1" state
  [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

piece_pid() { cat "$STACK_DIR/pids/$1.pid" 2>/dev/null || true; }
piece_alive() { pid_alive "$(piece_pid "$1")"; }

# start_piece NAME CMD...: runs CMD in a session of its own (so that a terminal's Ctrl-C after
# `up` returned does not reach it), stdin from /dev/null, output appended to the piece's log.
# setsid execs in place (the shell's background children are not group leaders), so $! is the
# pid of CMD itself.
start_piece() {
  local name="$1"; shift
  mkdir -p "$STACK_DIR/pids" "$STACK_DIR/logs"
  setsid "$@" </dev/null >>"$STACK_DIR/logs/$name.log" 2>&1 &
  echo "$!" >"$STACK_DIR/pids/$name.pid"
}

# start_piece_with_rc NAME CMD...: like start_piece, but a small bash parent waits for CMD and
# writes its exit status to pids/NAME.rc (the rolling restart asserts exit status 0 after
# SIGTERM). pids/NAME.pid is the pid of CMD, not of the waiting shell.
start_piece_with_rc() {
  local name="$1"; shift
  mkdir -p "$STACK_DIR/pids" "$STACK_DIR/logs"
  rm -f "$STACK_DIR/pids/$name.rc" "$STACK_DIR/pids/$name.pid"
  # shellcheck disable=SC2016 # expanded by the inner shell
  setsid bash -c '
    pidfile="$1"; rcfile="$2"; shift 2
    "$@" &
    child=$!
    echo "$child" >"$pidfile.tmp" && mv "$pidfile.tmp" "$pidfile"
    trap "" TERM INT
    wait "$child"
    echo "$?" >"$rcfile.tmp" && mv "$rcfile.tmp" "$rcfile"
  ' piece-wrapper "$STACK_DIR/pids/$name.pid" "$STACK_DIR/pids/$name.rc" "$@" \
    </dev/null >>"$STACK_DIR/logs/$name.log" 2>&1 &
  local _
  for _ in $(seq 1 50); do [[ -s "$STACK_DIR/pids/$name.pid" ]] && return 0; sleep 0.1; done
  stack_log "$name: no pid written"; return 1
}

# wait_gone PID TIMEOUT_SECONDS
wait_gone() {
  local pid="$1" deadline=$((SECONDS + $2))
  while pid_alive "$pid"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

# stop_pid NAME PID [TIMEOUT]: SIGTERM, then SIGKILL after TIMEOUT seconds (default 15).
stop_pid() {
  local name="$1" pid="$2" timeout="${3:-15}"
  pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" "$timeout"; then
    stack_log "$name (pid $pid) did not stop within ${timeout}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 5 || stack_log "$name (pid $pid) survived SIGKILL"
  fi
}

# log_tail NAME [LINES]: the end of a piece's log, for failure reports.
log_tail() {
  local name="$1" lines="${2:-25}" file="$STACK_DIR/logs/$1.log"
  if [[ -s "$file" ]]; then
    printf -- '----- last %s lines of %s -----\n' "$lines" "$file" >&2
    tail -n "$lines" "$file" >&2
    printf -- '----- end of %s -----\n' "$name" >&2
  else
    printf -- '(%s: log %s is empty or missing)\n' "$name" "$file" >&2
  fi
}

# wait_until NAME TIMEOUT_SECONDS CMD...: polls CMD every 0.2 s. On timeout (or when the piece's
# process died) prints the piece's log tail and fails.
wait_until() {
  local name="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout)) pid
  while ! "$@" >/dev/null 2>&1; do
    pid="$(piece_pid "$name")"
    if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
      stack_log "$name: process $pid exited during startup"
      log_tail "$name"; return 1
    fi
    if ((SECONDS >= deadline)); then
      stack_log "$name: not ready after ${timeout}s ($*)"
      log_tail "$name"; return 1
    fi
    sleep 0.2
  done
}

# http_ok URL: 2xx within 2 s.
http_ok() { curl -fsS -o /dev/null --max-time 2 "$1"; }
