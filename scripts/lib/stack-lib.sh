#!/usr/bin/env bash
# Process, port and readiness helpers of the local stack (scripts/local-stack.sh) and of the
# end-to-end suite (tests/suites/60-e2e-stack.sh). Sourced, never run.
#
# Every piece of the stack is a process whose pid is kept in "$STACK_DIR/pids/NAME.pid" and whose
# output goes to "$STACK_DIR/logs/NAME.log". Nothing here touches a process it did not start.
#
# The whole-stack commands at the end (supervise_status, supervise_stop_all, ...) call the stack's
# own hooks: all_pieces (the piece names, in start order), piece_port NAME, stop_one NAME and
# piece_health NAME.

stack_log() { printf '==> %s\n' "$*" >&2; }
stack_die() { printf 'local-stack: %s\n' "$*" >&2; exit 1; }

SUPERVISE_PY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/supervise.py"

# port_in_use PORT: true when something listens on 127.0.0.1:PORT (or on every address); sockets
# in TIME_WAIT do not count (scripts/lib/supervise.py binds like the servers do).
port_in_use() { python3 "$SUPERVISE_PY" port-in-use "$1"; }

# busy_ports PORT...: prints those of the ports that are in use (one python start for all).
busy_ports() { python3 "$SUPERVISE_PY" busy-ports "$@"; }

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

# ---------------------------------------------------------------------------------------------
# Supervised pieces: start, identity, stop. A piece NAME is "ours" when pids/NAME.pid names a live
# process whose start time is the one recorded in pids/NAME.start, so that a recycled pid is never
# taken for a piece of the stack.

record_start() {
  local pid
  pid="$(cat "$STACK_DIR/pids/$1.pid")"
  awk '{print $22}' "/proc/$pid/stat" >"$STACK_DIR/pids/$1.start" 2>/dev/null || true
}

# owned_pid NAME: prints the piece's pid when it runs and is ours; false otherwise.
owned_pid() {
  local name="$1" pid start
  pid="$(piece_pid "$name")"
  [[ -n "$pid" ]] && pid_alive "$pid" || return 1
  start="$(cat "$STACK_DIR/pids/$name.start" 2>/dev/null || true)"
  [[ -z "$start" || "$start" == "$(awk '{print $22}' "/proc/$pid/stat" 2>/dev/null)" ]] || return 1
  echo "$pid"
}

# supervise_launch NAME [--rc] [--env NAME=VALUE]... CMD...: starts CMD as the piece NAME
# (start_piece, or start_piece_with_rc with --rc) and records its identity. The --env values are
# exported to CMD only: never on a command line (ps shows those).
supervise_launch() {
  local name="$1" rc=0 env=()
  shift
  while (($#)); do
    case "$1" in
      --rc) rc=1; shift ;;
      --env) env+=("$2"); shift 2 ;;
      *) break ;;
    esac
  done
  (
    ((${#env[@]} == 0)) || export "${env[@]}"
    if ((rc)); then start_piece_with_rc "$name" "$@"; else start_piece "$name" "$@"; fi
  ) || return 1
  record_start "$name"
}

# supervise_start NAME PORT TIMEOUT READY... -- [--rc] [--env NAME=VALUE]... CMD...: nothing to do
# when NAME already runs; refuses when PORT is taken (naming its holder); else launches CMD
# (supervise_launch) and waits up to TIMEOUT seconds for READY to succeed (wait_until: the log's
# tail on failure).
supervise_start() {
  local name="$1" port="$2" timeout="$3" ready=()
  shift 3
  while (($#)) && [[ "$1" != -- ]]; do ready+=("$1"); shift; done
  [[ "${1:-}" == -- ]] || { stack_log "supervise_start $name: no -- before the command"; return 1; }
  shift
  if owned_pid "$name" >/dev/null; then stack_log "$name already runs"; return 0; fi
  if port_in_use "$port"; then
    stack_log "$name: port $port is in use by $(port_owner "$port")"
    return 1
  fi
  supervise_launch "$name" "$@" || return 1
  wait_until "$name" "$timeout" "${ready[@]}"
}

# supervise_stop [--rc] NAME SIGNAL TIMEOUT: SIGNAL, and SIGKILL when the piece is not gone after
# TIMEOUT seconds (a SIGNAL other than TERM is followed by SIGTERM and 5 more seconds first).
# With --rc (a piece started with --rc) reports the exit status and fails unless it is 0.
supervise_stop() {
  local rc=0
  if [[ "$1" == --rc ]]; then rc=1; shift; fi
  local name="$1" signal="$2" timeout="$3" pid
  pid="$(owned_pid "$name")" || { stack_log "$name is not running"; return 0; }
  if [[ "$signal" == TERM ]]; then
    stop_pid "$name" "$pid" "$timeout"
  else
    kill "-$signal" "$pid" 2>/dev/null || true
    wait_gone "$pid" "$timeout" || stop_pid "$name" "$pid" 5
  fi
  if ((rc)); then
    local status="" _
    for _ in $(seq 1 50); do
      status="$(cat "$STACK_DIR/pids/$name.rc" 2>/dev/null || true)"; [[ -n "$status" ]] && break; sleep 0.1
    done
    stack_log "$name stopped (exit status ${status:-unknown})"
    [[ "$status" == 0 ]] || return 1
  fi
  rm -f "$STACK_DIR/pids/$name.pid" "$STACK_DIR/pids/$name.start"
}

# supervise_kill NAME: a crash: SIGKILL, no drain.
supervise_kill() {
  local name="$1" pid
  if pid="$(owned_pid "$name")"; then
    kill -KILL "$pid"; wait_gone "$pid" 10
    rm -f "$STACK_DIR/pids/$name.pid" "$STACK_DIR/pids/$name.start"
    stack_log "$name killed (pid $pid)"
  else
    stack_log "$name is not running"
  fi
}

# wait_wrappers: the waiting shells of start_piece_with_rc write their status and end (5 s).
wait_wrappers() {
  local _
  for _ in $(seq 1 50); do pgrep -f "piece-wrapper $STACK_DIR/" >/dev/null || break; sleep 0.1; done
  return 0
}

# ---------------------------------------------------------------------------------------------
# The whole stack, through its hooks (see the top of this file).

STACK_MARKER=.local-stack

# stack_dir_claimable: dies when STACK_DIR exists, is not empty and is not a stack's (marker).
stack_dir_claimable() {
  [[ ! -e "$STACK_DIR" || -f "$STACK_DIR/$STACK_MARKER" || -z "$(ls -A "$STACK_DIR")" ]] \
    || stack_die "$STACK_DIR exists and is not a stack directory: choose another --dir"
}

# stack_dir_claim: STACK_DIR, new (a previous stack's removed) and marked as a stack directory.
# The caller has made sure that no piece of a previous stack there still runs.
stack_dir_claim() {
  stack_dir_claimable
  rm -rf "$STACK_DIR"
  mkdir -p "$STACK_DIR"
  touch "$STACK_DIR/$STACK_MARKER"
}

# stack_dir_check: dies unless STACK_DIR is a stack directory (its marker), before removing it.
stack_dir_check() {
  [[ -f "$STACK_DIR/$STACK_MARKER" ]] || stack_die "$STACK_DIR is not a stack directory (no $STACK_MARKER marker): not touching it"
}

# supervise_running: the pieces that run (ours), one per line.
supervise_running() {
  local name
  for name in $(all_pieces); do owned_pid "$name" >/dev/null && echo "$name"; done
  return 0
}

# supervise_refuse_busy_ports HINT: dies naming the first piece whose port is in use, and its holder.
supervise_refuse_busy_ports() {
  local name ports=() busy
  for name in $(all_pieces); do ports+=("$(piece_port "$name")"); done
  busy="$(busy_ports "${ports[@]}" | head -1 || true)"
  [[ -n "$busy" ]] || return 0
  for name in $(all_pieces); do [[ "$(piece_port "$name")" == "$busy" ]] && break; done
  stack_die "port $busy (for $name) is in use ($(port_owner "$busy")): $1"
}

# supervise_stop_all: every piece that runs, in reverse start order (stop_one), then the waiting
# wrappers of start_piece_with_rc.
supervise_stop_all() {
  local pieces i
  mapfile -t pieces < <(all_pieces)
  for ((i = ${#pieces[@]} - 1; i >= 0; i--)); do
    owned_pid "${pieces[$i]}" >/dev/null && { stop_one "${pieces[$i]}" || true; }
  done
  wait_wrappers
}

# supervise_check_stopped: dies when a piece still runs; notes the ports still in use.
supervise_check_stopped() {
  local name left
  left="$(supervise_running | tr '\n' ' ')"
  [[ -z "$left" ]] || stack_die "still running: ${left% } — $STACK_DIR kept"
  for name in $(all_pieces); do
    if port_in_use "$(piece_port "$name")"; then
      stack_log "note: port $(piece_port "$name") ($name) is still in use ($(port_owner "$(piece_port "$name")"))"
    fi
  done
}

# supervise_status: a table of the pieces (pid, port, state, piece_health); true when all run.
supervise_status() {
  local name pid port state health running=0 total=0
  printf '%-18s %-8s %-7s %-9s %s\n' PIECE PID PORT STATE CHECK
  for name in $(all_pieces); do
    total=$((total + 1))
    port="$(piece_port "$name")"
    if pid="$(owned_pid "$name")"; then
      state=running; running=$((running + 1))
      health="$(piece_health "$name")"
    else
      pid=- state=stopped health=-
      [[ -f "$STACK_DIR/pids/$name.rc" ]] && health="last exit status $(cat "$STACK_DIR/pids/$name.rc")"
    fi
    printf '%-18s %-8s %-7s %-9s %s\n' "$name" "$pid" "$port" "$state" "$health"
  done
  echo "$running of $total pieces running in $STACK_DIR"
  ((running == total))
}
