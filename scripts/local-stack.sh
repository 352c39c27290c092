#!/usr/bin/env bash
# The whole endpoint-stats system on this machine, on 127.0.0.1 only, in one command:
#
#   scripts/local-stack.sh up      [--dir DIR] [--base-port N] [--replicas N] [--fast-alerts]
#   scripts/local-stack.sh status  [--dir DIR]
#   scripts/local-stack.sh down    [--dir DIR]
#   scripts/local-stack.sh stop|start|restart|kill PIECE [--dir DIR]
#
# Pieces: postgres, redis, sink, alertmanager, postgres-exporter, redis-exporter, replica-N,
# nginx, prometheus. Everything lives in the state directory DIR (default $REPO_ROOT/.stack):
# configuration, data, logs, pids, and stack.env with the ports and URLs (tests source it).
# `down` stops every piece and removes DIR. Ports are BASE+offset (docs/local-stack.md); `up`
# refuses to start when one of them is in use. The monitoring sources are loaded from
# deploy/kubernetes/base/monitoring/, not copied; the two documented transformations are done by
# deploy/local/transform-monitoring.py into DIR.
#
# Environment: ENDPOINT_STATS_BIN (default target/release/endpoint-stats), STACK_DIR,
# STACK_BASE_PORT.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/stack-lib.sh
source "$REPO_ROOT/scripts/lib/stack-lib.sh"

MONITORING="$REPO_ROOT/deploy/kubernetes/base/monitoring"
# The database roles: the files the Kubernetes Job endpoint-stats-db-roles runs (ConfigMap
# postgres-roles), run here as they are.
APPLY_ROLES="$REPO_ROOT/deploy/kubernetes/base/postgres/apply-roles.sh"
LOCAL="$REPO_ROOT/deploy/local"
NAMESPACE=endpoint-stats

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# ---------------------------------------------------------------------------------------------
# arguments

COMMAND="${1:-}"
[[ -n "$COMMAND" ]] || { usage; exit 2; }
shift
PIECE=""
case "$COMMAND" in
  stop|start|restart|kill)
    PIECE="${1:-}"; [[ -n "$PIECE" && "$PIECE" != --* ]] || stack_die "$COMMAND needs a piece name"
    shift ;;
  up|down|status) ;;
  -h|--help|help) usage; exit 0 ;;
  *) usage; exit 2 ;;
esac

STACK_DIR="${STACK_DIR:-$REPO_ROOT/.stack}"
BASE_PORT="${STACK_BASE_PORT:-19400}"
REPLICAS=3
FAST_ALERTS=0
while (($#)); do
  case "$1" in
    --dir) STACK_DIR="$2"; shift 2 ;;
    --base-port) BASE_PORT="$2"; shift 2 ;;
    --replicas) REPLICAS="$2"; shift 2 ;;
    --fast-alerts) FAST_ALERTS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) stack_die "unknown argument: $1" ;;
  esac
done
mkdir -p "$(dirname "$STACK_DIR")"
STACK_DIR="$(cd "$(dirname "$STACK_DIR")" && pwd)/$(basename "$STACK_DIR")"
export STACK_DIR
if ! [[ "$BASE_PORT" =~ ^[0-9]+$ ]] || ((BASE_PORT < 1024 || BASE_PORT > 65000)); then
  stack_die "--base-port must be 1024..65000"
fi
if ! [[ "$REPLICAS" =~ ^[0-9]+$ ]] || ((REPLICAS < 1 || REPLICAS > 9)); then
  stack_die "--replicas must be 1..9"
fi
# Listening ports inside the kernel's ephemeral range can be taken at any moment by the local end
# of an outgoing connection (the replicas' own database connections, for one).
read -r EPHEMERAL_LOW EPHEMERAL_HIGH </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || EPHEMERAL_LOW=32768 EPHEMERAL_HIGH=60999
if [[ "$COMMAND" == up ]] && ((BASE_PORT + 19 >= EPHEMERAL_LOW && BASE_PORT <= EPHEMERAL_HIGH)); then
  stack_die "--base-port $BASE_PORT: the ports $BASE_PORT..$((BASE_PORT + 19)) overlap the ephemeral range $EPHEMERAL_LOW..$EPHEMERAL_HIGH (net.ipv4.ip_local_port_range); choose a base below $((EPHEMERAL_LOW - 20))"
fi

# Timings of --fast-alerts (the end-to-end test): alert `for:` and Alertmanager grouping.
FAST_FOR=10s FAST_GROUP_WAIT=1s FAST_GROUP_INTERVAL=5s FAST_REPEAT_INTERVAL=1m
SCRAPE_INTERVAL=2s

# ---------------------------------------------------------------------------------------------
# ports and tools

set_ports() {
  LB_PORT=$BASE_PORT
  PROMETHEUS_PORT=$((BASE_PORT + 1))
  ALERTMANAGER_PORT=$((BASE_PORT + 2))
  SINK_PORT=$((BASE_PORT + 3))
  POSTGRES_PORT=$((BASE_PORT + 4))
  REDIS_PORT=$((BASE_PORT + 5))
  POSTGRES_EXPORTER_PORT=$((BASE_PORT + 6))
  REDIS_EXPORTER_PORT=$((BASE_PORT + 7))
  REPLICA_BASE_PORT=$((BASE_PORT + 10))
}
replica_port() { echo $((REPLICA_BASE_PORT + $1)); }

# piece -> port (for messages and status)
piece_port() {
  case "$1" in
    nginx) echo "$LB_PORT" ;;
    prometheus) echo "$PROMETHEUS_PORT" ;;
    alertmanager) echo "$ALERTMANAGER_PORT" ;;
    sink) echo "$SINK_PORT" ;;
    postgres) echo "$POSTGRES_PORT" ;;
    redis) echo "$REDIS_PORT" ;;
    postgres-exporter) echo "$POSTGRES_EXPORTER_PORT" ;;
    redis-exporter) echo "$REDIS_EXPORTER_PORT" ;;
    replica-*) replica_port "${1#replica-}" ;;
  esac
}

all_pieces() {
  local i
  printf '%s\n' postgres redis sink alertmanager postgres-exporter redis-exporter
  for ((i = 1; i <= REPLICAS; i++)); do echo "replica-$i"; done
  printf '%s\n' nginx prometheus
}

find_tools() {
  PG_BIN_DIR="$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1)"
  [[ -x "$PG_BIN_DIR/initdb" ]] || PG_BIN_DIR="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"
  [[ -x "$PG_BIN_DIR/initdb" && -x "$PG_BIN_DIR/postgres" ]] || stack_die "PostgreSQL server binaries not found (apt-get install postgresql)"
  ALERTMANAGER_CMD="$(command -v prometheus-alertmanager || command -v alertmanager || true)"
  PG_EXPORTER_CMD="$(command -v prometheus-postgres-exporter || command -v postgres_exporter || true)"
  REDIS_EXPORTER_CMD="$(command -v prometheus-redis-exporter || command -v redis_exporter || true)"
  NGINX_CMD="$(command -v nginx || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true)"
  local missing=() tool
  [[ -n "$ALERTMANAGER_CMD" ]] || missing+=(prometheus-alertmanager)
  [[ -n "$PG_EXPORTER_CMD" ]] || missing+=(prometheus-postgres-exporter)
  [[ -n "$REDIS_EXPORTER_CMD" ]] || missing+=(prometheus-redis-exporter)
  [[ -n "$NGINX_CMD" ]] || missing+=(nginx)
  for tool in prometheus promtool amtool redis-server redis-cli psql pg_isready curl python3 setsid ss; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  ((${#missing[@]} == 0)) || stack_die "missing tools: ${missing[*]} (Debian packages; scripts/lib/ensure-deps.sh installs them)"
  ENDPOINT_STATS_BIN="${ENDPOINT_STATS_BIN:-$REPO_ROOT/target/release/endpoint-stats}"
  [[ -x "$ENDPOINT_STATS_BIN" ]] || stack_die "service binary $ENDPOINT_STATS_BIN missing (cargo build --release)"
  # PostgreSQL refuses to run as root: as root, the cluster runs as the postgres user.
  PG_AS=()
  if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || stack_die "running as root needs the postgres user (Debian package postgresql)"
    PG_AS=(setpriv --reuid=postgres --regid=postgres --init-groups --)
  fi
  PYTHON=python3
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; fi
}

# ---------------------------------------------------------------------------------------------
# state

ENV_FILE_NAME=stack.env

load_env() {
  [[ -f "$STACK_DIR/$ENV_FILE_NAME" ]] || stack_die "no stack in $STACK_DIR (run: $0 up --dir $STACK_DIR)"
  # shellcheck disable=SC1090
  source "$STACK_DIR/$ENV_FILE_NAME"
  BASE_PORT="$STACK_BASE_PORT" REPLICAS="$STACK_REPLICAS" FAST_ALERTS="$STACK_FAST_ALERTS"
  set_ports
}

# Passwords of this stack, new at every `up`: the PostgreSQL administrator, one per database role
# (deploy/kubernetes/base/postgres/roles.sql), Redis. They live in stack.env (mode 600) only.
new_password() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }
make_passwords() {
  POSTGRES_ADMIN_PASSWORD="$(new_password)"
  PW_APP="$(new_password)" PW_OWNER="$(new_password)" PW_BACKUP="$(new_password)"
  PW_VERIFY="$(new_password)" PW_MONITOR="$(new_password)"
  REDIS_PASSWORD="$(new_password)"
}
role_url() { # role_url ROLE PASSWORD
  echo "postgres://endpoint_stats_$1:$2@127.0.0.1:$POSTGRES_PORT/endpoint_stats?sslmode=disable"
}

write_env() {
  local i urls=()
  for ((i = 1; i <= REPLICAS; i++)); do urls+=("http://127.0.0.1:$(replica_port "$i")"); done
  (umask 077 && : >"$STACK_DIR/$ENV_FILE_NAME")
  cat >"$STACK_DIR/$ENV_FILE_NAME" <<EOF
# Written by scripts/local-stack.sh up; sourced by status/down/stop/start and by the tests.
STACK_DIR=$STACK_DIR
STACK_BASE_PORT=$BASE_PORT
STACK_REPLICAS=$REPLICAS
STACK_FAST_ALERTS=$FAST_ALERTS
ENDPOINT_STATS_BIN=$ENDPOINT_STATS_BIN
LB_URL=http://127.0.0.1:$LB_PORT
REPLICA_URLS="${urls[*]}"
PROMETHEUS_URL=http://127.0.0.1:$PROMETHEUS_PORT
ALERTMANAGER_URL=http://127.0.0.1:$ALERTMANAGER_PORT
SINK_URL=http://127.0.0.1:$SINK_PORT
SINK_POSTS=$STACK_DIR/sink/posts.jsonl
POSTGRES_EXPORTER_URL=http://127.0.0.1:$POSTGRES_EXPORTER_PORT/metrics
REDIS_EXPORTER_URL=http://127.0.0.1:$REDIS_EXPORTER_PORT/metrics
POSTGRES_PORT=$POSTGRES_PORT
REDIS_PORT=$REDIS_PORT
POSTGRES_ADMIN_USER=postgres
POSTGRES_ADMIN_PASSWORD=$POSTGRES_ADMIN_PASSWORD
DATABASE_URL=$(role_url app "$PW_APP")
OWNER_DATABASE_URL=$(role_url owner "$PW_OWNER")
BACKUP_DATABASE_URL=$(role_url backup "$PW_BACKUP")
VERIFY_DATABASE_URL=$(role_url verify "$PW_VERIFY")
MONITOR_DATABASE_URL=$(role_url monitor "$PW_MONITOR")
REDIS_PASSWORD=$REDIS_PASSWORD
REDIS_URL=redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT
ALERTMANAGER_CONFIG=$STACK_DIR/alertmanager/alertmanager.yml
EOF
}

# The configuration of every piece at `up` (configure) and the database after PostgreSQL starts
# (prepare_database): deploy/local/configure.sh, beside the templates it renders.
# shellcheck source=deploy/local/configure.sh
source "$LOCAL/configure.sh"

# ---------------------------------------------------------------------------------------------
# pieces

# start_one NAME: the piece's command and readiness check, run by supervise_start
# (scripts/lib/stack-lib.sh: refuses a taken port, waits, shows the log's tail on failure).
start_one() {
  local name="$1" port
  port="$(piece_port "$name")"
  case "$name" in
    postgres)
      supervise_start postgres "$port" 30 pg_isready -q -h 127.0.0.1 -p "$port" -- \
        "${PG_AS[@]}" "$PG_BIN_DIR/postgres" -D "$STACK_DIR/postgres/data" -p "$port" -k "$STACK_DIR/postgres" \
        -c unix_socket_permissions=0700 -c listen_addresses=127.0.0.1 -c max_connections=100 \
        && prepare_database ;;
    redis)
      supervise_start redis "$port" 20 redis_ping -- redis-server "$STACK_DIR/redis/redis.conf" ;;
    sink)
      supervise_start sink "$port" 20 http_ok "http://127.0.0.1:$port/" -- \
        python3 "$LOCAL/slack-sink.py" --port "$port" --out "$STACK_DIR/sink/posts.jsonl" ;;
    alertmanager)
      supervise_start alertmanager "$port" 30 http_ok "http://127.0.0.1:$port/-/ready" -- \
        "$ALERTMANAGER_CMD" --config.file="$STACK_DIR/alertmanager/alertmanager.yml" \
        --storage.path="$STACK_DIR/alertmanager/data" --web.listen-address="127.0.0.1:$port" \
        --web.external-url="http://127.0.0.1:$port/" --cluster.listen-address= ;;
    postgres-exporter) # as the monitor role (pg_monitor)
      supervise_start postgres-exporter "$port" 20 http_ok "http://127.0.0.1:$port/metrics" -- \
        --env "DATA_SOURCE_NAME=$MONITOR_DATABASE_URL" "$PG_EXPORTER_CMD" --web.listen-address="127.0.0.1:$port" ;;
    redis-exporter)
      supervise_start redis-exporter "$port" 20 http_ok "http://127.0.0.1:$port/metrics" -- \
        --env "REDIS_PASSWORD=$REDIS_PASSWORD" "$REDIS_EXPORTER_CMD" -redis.addr "redis://127.0.0.1:$REDIS_PORT" \
        -web.listen-address "127.0.0.1:$port" ;;
    replica-*)
      replica_args "$name"
      supervise_start "$name" "$port" 60 http_ok "http://127.0.0.1:$port/ready" -- "${REPLICA_ARGS[@]}" ;;
    nginx)
      supervise_start nginx "$port" 20 http_ok "http://127.0.0.1:$port/health" -- \
        "$NGINX_CMD" -c "$STACK_DIR/nginx/nginx.conf" -p "$STACK_DIR/nginx/" -e "$STACK_DIR/logs/nginx-error.log" ;;
    prometheus)
      local resend=15s
      ((FAST_ALERTS)) && resend=2s
      supervise_start prometheus "$port" 30 http_ok "http://127.0.0.1:$port/-/ready" -- \
        prometheus --config.file="$STACK_DIR/prometheus/prometheus.yml" \
        --storage.tsdb.path="$STACK_DIR/prometheus/data" --storage.tsdb.retention.time=1d \
        --web.listen-address="127.0.0.1:$port" --web.enable-lifecycle --rules.alert.resend-delay="$resend" ;;
    *) stack_log "unknown piece: $name"; return 1 ;;
  esac
}

# replica_args NAME: a replica's launch (supervise_launch's arguments after NAME): the service's
# role (endpoint_stats_app) and Redis' password in the environment, so that the waiting wrapper's
# command line (visible in ps) holds no secret; its exit status kept (--rc).
replica_args() {
  REPLICA_ARGS=(--rc --env "DATABASE_URL=$DATABASE_URL" --env "REDIS_URL=$REDIS_URL" env "PORT=$(piece_port "$1")"
    BIND=127.0.0.1 LOG_FORMAT=json RUST_LOG=info DB_POOL_SIZE=8 SHUTDOWN_GRACE_SECS=10 "$ENDPOINT_STATS_BIN" serve)
}
launch_replica() { replica_args "$1" && supervise_launch "$1" "${REPLICA_ARGS[@]}"; }
redis_ping() { REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli --no-auth-warning -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
wait_replica() { wait_until "$1" 60 http_ok "http://127.0.0.1:$(piece_port "$1")/ready"; }

# stop_one NAME: graceful stop; a replica's exit status must be 0.
stop_one() {
  case "$1" in
    # SIGINT: PostgreSQL's fast shutdown (SIGTERM would wait for the replicas' pools to close)
    postgres) supervise_stop postgres INT 30 ;;
    replica-*) supervise_stop --rc "$1" TERM 30 ;;
    *) supervise_stop "$1" TERM 15 ;;
  esac
}

# stop_all: every piece that runs, in reverse order (Prometheus and nginx first, PostgreSQL last).
stop_all() { supervise_stop_all; }

# ---------------------------------------------------------------------------------------------
# commands

cmd_up() {
  set_ports
  find_tools
  if [[ -f "$STACK_DIR/$ENV_FILE_NAME" ]]; then
    # a previous stack in this directory: refuse while any of its pieces runs
    local running
    running="$(load_env; supervise_running | tr '\n' ' ')"
    [[ -z "$running" ]] || stack_die "a stack already runs in $STACK_DIR (${running}): use status or down"
  fi
  stack_dir_claimable
  supervise_refuse_busy_ports "choose another --base-port (now $BASE_PORT)"

  local started=$SECONDS name
  stack_dir_claim
  make_passwords
  write_env
  load_env # the URLs and passwords, as every later command sees them
  stack_log "configuring in $STACK_DIR (fast alerts: $([[ $FAST_ALERTS == 1 ]] && echo on || echo off))"
  configure || up_failed configuration

  for name in postgres redis sink alertmanager postgres-exporter redis-exporter; do
    stack_log "starting $name on 127.0.0.1:$(piece_port "$name")"
    start_one "$name" || up_failed "$name"
  done
  # The replicas start together (their migrations must be safe to run concurrently).
  local i
  for ((i = 1; i <= REPLICAS; i++)); do
    stack_log "starting replica-$i on 127.0.0.1:$(replica_port "$i")"
    launch_replica "replica-$i" || up_failed "replica-$i"
  done
  for ((i = 1; i <= REPLICAS; i++)); do wait_replica "replica-$i" || up_failed "replica-$i"; done
  for name in nginx prometheus; do
    stack_log "starting $name on 127.0.0.1:$(piece_port "$name")"
    start_one "$name" || up_failed "$name"
  done
  stack_log "waiting for Prometheus to scrape every target"
  wait_until prometheus 30 all_targets_up || { show_targets >&2; up_failed "prometheus targets"; }
  stack_log "up in $((SECONDS - started))s"
  print_urls
}

up_failed() {
  stack_log "startup failed at: $1 — stopping what was started (logs stay in $STACK_DIR/logs; '$0 down --dir $STACK_DIR' removes them)"
  stop_all
  exit 1
}

# Prometheus' active targets: all up (exit status), or a table of them
all_targets_up() { python3 "$LOCAL/stack-tool.py" targets --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" --all-up; }
show_targets() { python3 "$LOCAL/stack-tool.py" targets --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" || true; }

print_urls() {
  local i
  cat <<EOF

endpoint-stats local stack in $STACK_DIR
  load balancer (nginx)   http://127.0.0.1:$LB_PORT/        (/, /stats, /api/v1/endpoints)
EOF
  for ((i = 1; i <= REPLICAS; i++)); do
    printf '  replica-%-15s http://127.0.0.1:%s/   (log: %s)\n' "$i" "$(replica_port "$i")" "$STACK_DIR/logs/replica-$i.log"
  done
  cat <<EOF
  Prometheus              http://127.0.0.1:$PROMETHEUS_PORT/
  Alertmanager            http://127.0.0.1:$ALERTMANAGER_PORT/
  Slack sink              http://127.0.0.1:$SINK_PORT/      (posts: $STACK_DIR/sink/posts.jsonl)
  postgres_exporter       http://127.0.0.1:$POSTGRES_EXPORTER_PORT/metrics
  redis_exporter          http://127.0.0.1:$REDIS_EXPORTER_PORT/metrics
  PostgreSQL              127.0.0.1:$POSTGRES_PORT/endpoint_stats, scram-sha-256, a role per client:
                          DATABASE_URL (service), OWNER_/BACKUP_/VERIFY_/MONITOR_DATABASE_URL in stack.env
  Redis                   127.0.0.1:$REDIS_PORT, password required: REDIS_URL in stack.env
  environment for scripts $STACK_DIR/$ENV_FILE_NAME
stop and remove everything: $0 down --dir $STACK_DIR
EOF
}

cmd_status() {
  if [[ ! -f "$STACK_DIR/$ENV_FILE_NAME" ]]; then echo "no stack in $STACK_DIR"; return 3; fi
  load_env
  supervise_status
}

piece_health() {
  local ok=ok bad=failing
  case "$1" in
    postgres) pg_isready -q -h 127.0.0.1 -p "$POSTGRES_PORT" && echo "$ok" || echo "$bad" ;;
    redis) redis_ping && echo "$ok" || echo "$bad" ;;
    sink) curl -fsS --max-time 2 "http://127.0.0.1:$SINK_PORT/" 2>/dev/null | tr -d '\n' || echo "$bad" ;;
    alertmanager|prometheus) http_ok "http://127.0.0.1:$(piece_port "$1")/-/ready" && echo "$ok" || echo "$bad" ;;
    *-exporter) http_ok "http://127.0.0.1:$(piece_port "$1")/metrics" && echo "$ok" || echo "$bad" ;;
    replica-*) curl -sS --max-time 2 -o /dev/null -w '/ready %{http_code}' "http://127.0.0.1:$(piece_port "$1")/ready" 2>/dev/null || echo "$bad" ;;
    nginx) curl -sS --max-time 2 -o /dev/null -w '/health %{http_code}' "http://127.0.0.1:$LB_PORT/health" 2>/dev/null || echo "$bad" ;;
  esac
}

cmd_down() {
  if [[ ! -e "$STACK_DIR" ]]; then echo "no stack in $STACK_DIR: nothing to do"; return 0; fi
  stack_dir_check
  if [[ -f "$STACK_DIR/$ENV_FILE_NAME" ]]; then
    load_env
    find_tools_light
    stack_log "stopping the stack in $STACK_DIR"
    stop_all
    supervise_check_stopped
  fi
  rm -rf "$STACK_DIR"
  stack_log "stopped; removed $STACK_DIR"
}

# down, stop and status need no binaries but the ones they call
find_tools_light() { PG_AS=(); }

cmd_piece() {
  load_env
  find_tools
  local name="$PIECE"
  all_pieces | grep -x -- "$name" >/dev/null || stack_die "unknown piece $name (pieces: $(all_pieces | tr '\n' ' '))"
  case "$COMMAND" in
    stop) stop_one "$name" && stack_log "$name stopped" ;;
    start) start_one "$name" && stack_log "$name started, ready on port $(piece_port "$name")" ;;
    restart) stop_one "$name" && start_one "$name" && stack_log "$name started, ready on port $(piece_port "$name")" ;;
    kill) supervise_kill "$name" ;; # a crash: SIGKILL, no drain
  esac
}

case "$COMMAND" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  stop|start|restart|kill) cmd_piece ;;
esac
