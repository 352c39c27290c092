#!/usr/bin/env bash
# End to end on the local stack (scripts/local-stack.sh, docs/local-stack.md): PostgreSQL, Redis,
# exporters, three replicas behind nginx, Prometheus with the repository's rules, Alertmanager
# with the repository's alertmanager.yml, a Slack sink. Brings its own stack up in a temporary
# state directory on free ports, always tears it down, and checks, in this order:
#   a. the dashboard: every panel query of grafana/dashboards/endpoint-statistics.json runs on
#      Prometheus after load through the load balancer; each returns data, except the
#      Kubernetes-only ones listed below, which must still be valid queries;
#   b. the alert pipeline into Slack: Watchdog, EndpointStatsDown (every replica killed),
#      DatabaseConnectionIssues and HighErrorRate (PostgreSQL stopped under traffic),
#      RedisConnectionIssues (Redis stopped), each posted to the channel that alertmanager.yml
#      routes it to;
#   a2. the dashboard again, after those faults and restarts;
#   c. a rolling restart of the replicas under load: every request 200, no lost count;
#   d. least privilege: the replicas connect as endpoint_stats_app, which may not DROP or CREATE
#      a table (nor DELETE, write _sqlx_migrations, create temporary tables or migrate); the
#      tables belong to endpoint_stats_owner, which ran the migrations; wrong passwords are
#      refused (scram-sha-256); backup runs as endpoint_stats_backup, verify-backup as
#      endpoint_stats_verify (CREATEDB; the backup role cannot), restore as the owner (the
#      service's role cannot), maintain as the owner with Redis' password; Redis refuses a client
#      without the password (NOAUTH).
# Takes about two minutes.
# Run by scripts/test.sh (REPO_ROOT, ENDPOINT_STATS_BIN exported); alone:
#   REPO_ROOT=$PWD ENDPOINT_STATS_BIN=$PWD/target/release/endpoint-stats bash tests/suites/60-e2e-stack.sh
# test.sh: needs=binary lane=local-stack
set -euo pipefail

REPO_ROOT="${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
export REPO_ROOT
export ENDPOINT_STATS_BIN="${ENDPOINT_STATS_BIN:-$REPO_ROOT/target/release/endpoint-stats}"
cd "$REPO_ROOT"
# shellcheck source=tests/e2e/lib.sh
source "$REPO_ROOT/tests/e2e/lib.sh"

MONITORING="$REPO_ROOT/deploy/kubernetes/base/monitoring"
RULES="$MONITORING/prometheus/rules/endpoint-stats.rules.yml"
ALERTMANAGER_YML="$MONITORING/alertmanager/alertmanager.yml"
DASHBOARD="$MONITORING/grafana/dashboards/endpoint-statistics.json"
PY=python3
if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"; fi
E2E=("$PY" "$REPO_ROOT/tests/e2e/e2e.py")
STACK=(bash "$REPO_ROOT/scripts/local-stack.sh")

for tool in curl jq wrk psql amtool promtool; do
  command -v "$tool" >/dev/null || { echo "FAIL: $tool is missing (scripts/lib/ensure-deps.sh installs it)"; exit 1; }
done
"$PY" "$REPO_ROOT/scripts/lib/pymodules.py" yaml 2>/dev/null || { echo "FAIL: $PY lacks PyYAML (the repository's .venv has it: scripts/lib/ensure-deps.sh)"; exit 1; }

# Dashboard queries that need Kubernetes (kube-state-metrics, cAdvisor): nothing here produces
# their series, so here they must be valid and empty. The monitoring suite proves that each of
# them shows data, over series shaped as those exporters expose them; the fixture lists them.
mapfile -t K8S_ONLY_QUERIES < <("$PY" "$REPO_ROOT/tests/monitoring/monitoring_checks.py" kubernetes-panels --list)
((${#K8S_ONLY_QUERIES[@]} > 0)) || { echo "FAIL: no Kubernetes-only dashboard queries listed (tests/monitoring/fixtures/kubernetes-panels.yml)"; exit 1; }

[[ -x "$ENDPOINT_STATS_BIN" ]] || { echo "FAIL: $ENDPOINT_STATS_BIN missing (cargo build --release)"; exit 1; }
for file in "$RULES" "$ALERTMANAGER_YML" "$DASHBOARD"; do
  [[ -f "$file" ]] || { echo "FAIL: monitoring source $file missing"; exit 1; }
done

E2E_WORK="$(mktemp -d "${TMPDIR:-/tmp}/e2e-stack.XXXXXX")"
STATE="$E2E_WORK/stack"
chmod 755 "$E2E_WORK" # the stack's PostgreSQL runs as the postgres user when this runs as root

LOAD_PID=""
teardown() {
  local rc=$?
  set +e
  traffic_stop_all
  if [[ -n "$LOAD_PID" ]]; then touch "$E2E_WORK/rolling.stop"; wait "$LOAD_PID"; fi
  if [[ -d "$STATE" ]]; then
    if ((rc != 0 || CHECKS_FAILED > 0)); then
      section "logs of the failed run (tails)"
      local log
      for log in prometheus alertmanager replica-1 nginx-error sink; do
        [[ -s "$STATE/logs/$log.log" ]] && { echo "--- $log"; tail -n 15 "$STATE/logs/$log.log"; }
      done
      if [[ -n "${E2E_KEEP_LOGS:-}" ]]; then
        mkdir -p "$E2E_KEEP_LOGS" && cp -r "$STATE/logs" "$STATE/sink" "$E2E_KEEP_LOGS/" && echo "logs kept in $E2E_KEEP_LOGS"
      fi
    fi
    "${STACK[@]}" down --dir "$STATE" || echo "WARNING: local-stack down failed for $STATE"
  fi
  rm -rf "$E2E_WORK"
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

BASE_PORT="$(pick_base_port)" || { echo "FAIL: no block of 20 free ports found"; exit 1; }

# ----------------------------------------------------------------------------------------------
section "stack up in $STATE (ports $BASE_PORT..$((BASE_PORT + 19)), fast alerts)"
up_started=$SECONDS
if ! "${STACK[@]}" up --dir "$STATE" --base-port "$BASE_PORT" --fast-alerts; then
  check_fail "local stack up"
  exit 1
fi
check_pass "local stack up in $((SECONDS - up_started))s"
# shellcheck disable=SC1091
source "$STATE/stack.env"
read -r -a REPLICA_URL_LIST <<<"$REPLICA_URLS"

posts_count() { [[ -f "$SINK_POSTS" ]] && wc -l <"$SINK_POSTS" || echo 0; }
channel_of() { "${E2E[@]}" channel --rules "$RULES" --alertmanager "$ALERTMANAGER_YML" --alert "$1"; }
expect_alert() { # expect_alert ALERT SINCE [TIMEOUT]
  local target channel webhook
  if ! target="$(channel_of "$1")"; then check_fail "$1: no Slack channel routed in alertmanager.yml"; return 0; fi
  read -r channel webhook <<<"$target"
  check "$1 arrives in $channel through $webhook" "${E2E[@]}" wait-slack --posts "$SINK_POSTS" --since "$2" \
    --alert "$1" --channel "$channel" --webhook "$webhook" --timeout "${3:-90}"
}
all_replicas_ready() {
  local url
  for url in "${REPLICA_URL_LIST[@]}"; do http_ok "$url/ready" || return 1; done
}
stored_count() { # read as the service's role (TCP, scram-sha-256, like every client of the stack)
  psql -X "$DATABASE_URL" -tAc "select coalesce(max(access_count), 0) from endpoint_access where endpoint = '/'"
}
load_through_lb() { # a few seconds of load on every counted route, and some 404s
  wrk -t2 -c16 -d4s "$LB_URL/" | grep -E 'Requests/sec|requests in|Non-2xx' | sed 's/^/  wrk \/: /'
  wrk -t2 -c8 -d2s "$LB_URL/stats" | grep -E 'requests in|Non-2xx' | sed 's/^/  wrk \/stats: /'
  wrk -t2 -c8 -d2s "$LB_URL/api/v1/endpoints" | grep -E 'requests in|Non-2xx' | sed 's/^/  wrk \/api\/v1\/endpoints: /'
  local i
  for i in $(seq 1 20); do curl -s -o /dev/null "$LB_URL/no-such-page-$i"; done
}
dashboard_pass() {
  local args=() ref
  for ref in "${K8S_ONLY_QUERIES[@]}"; do args+=(--expect-empty "$ref"); done
  "${E2E[@]}" dashboard --prometheus "$PROMETHEUS_URL" --dashboard "$DASHBOARD" --assert-data "${args[@]}"
}

# ----------------------------------------------------------------------------------------------
section "a. dashboard, steady state: load through the load balancer, then every panel query"
load_through_lb
"${E2E[@]}" wait-query --prometheus "$PROMETHEUS_URL" --timeout 30 \
  --query 'sum(rate(http_requests_total{job="endpoint-stats",route="/api/v1/endpoints"}[1m])) > 0' || true
check "dashboard (steady state): every query valid; data for all but the listed Kubernetes-only ones" \
  dashboard_pass

# ----------------------------------------------------------------------------------------------
section "b. alert pipeline into the Slack sink"
expect_alert Watchdog 0 60

since="$(posts_count)"
for ((i = 1; i <= STACK_REPLICAS; i++)); do "${STACK[@]}" kill "replica-$i" --dir "$STATE"; done
expect_alert EndpointStatsDown "$since"
for ((i = 1; i <= STACK_REPLICAS; i++)); do "${STACK[@]}" start "replica-$i" --dir "$STATE" || check_fail "replica-$i restart after kill"; done

since="$(posts_count)"
"${STACK[@]}" stop postgres --dir "$STATE"
# Traffic on a counted route straight to each replica (nginx skips replicas that answer 503 for
# a while and answers itself): the service's own 5xx share must pass 5% of the last 5 minutes.
# With the database down a replica answers 503 only after its pool gives up (3 to 5 s, within
# REQUEST_TIMEOUT_SECS), so concurrency makes the volume; each wrk run is longer than that answer
# time, else wrk would cancel every request before its 503 is counted.
for ((i = 0; i < STACK_REPLICAS; i++)); do
  traffic_start "db-down-$i" wrk -t1 -c100 -d15s --timeout 20s "${REPLICA_URL_LIST[$i]}/"
done
lb_status="$(http_status "$LB_URL/" 20)"
health_status="$(http_status "${REPLICA_URL_LIST[0]}/health")"
if [[ "$lb_status" == 503 && "$health_status" == 200 ]]; then
  check_pass "database down: / answers 503 through the load balancer, /health stays 200"
else
  check_fail "database down: / answered $lb_status (503 expected), /health $health_status (200 expected)"
fi
expect_alert DatabaseConnectionIssues "$since"
expect_alert HighErrorRate "$since" 120
for ((i = 0; i < STACK_REPLICAS; i++)); do traffic_stop "db-down-$i"; done
"${STACK[@]}" start postgres --dir "$STATE" || check_fail "postgres restart"
check "every replica ready again within 30s of PostgreSQL's return" poll "replicas ready" 30 all_replicas_ready

since="$(posts_count)"
"${STACK[@]}" stop redis --dir "$STATE"
traffic_start redis-down-endpoints curl -s -o /dev/null --max-time 2 "$LB_URL/api/v1/endpoints"
traffic_start redis-down-root curl -s -o /dev/null --max-time 2 "$LB_URL/"
expect_alert RedisConnectionIssues "$since"
lb_status="$(http_status "$LB_URL/")"
if [[ "$lb_status" == 200 ]]; then check_pass "Redis down: counting goes on (/ answers 200)"; else check_fail "Redis down: / answered $lb_status"; fi
traffic_stop redis-down-endpoints
traffic_stop redis-down-root
"${STACK[@]}" start redis --dir "$STATE" || check_fail "redis restart"

# ----------------------------------------------------------------------------------------------
section "a2. dashboard again after the faults and restarts of b (error panels now carry values)"
load_through_lb
"${E2E[@]}" wait-query --prometheus "$PROMETHEUS_URL" --timeout 30 \
  --query 'sum(rate(http_requests_total{job="endpoint-stats",route="/api/v1/endpoints"}[1m])) > 0' >/dev/null || true
if dashboard_pass >"$E2E_WORK/dashboard2.txt"; then
  check_pass "dashboard (after faults): every query valid; data for all but the listed Kubernetes-only ones"
  grep -E '^PASS Service (database errors|Redis operations and errors/B)' "$E2E_WORK/dashboard2.txt" | sed 's/^PASS/  seen/'
else
  grep -E '^(FAIL|INFO dashboard)' "$E2E_WORK/dashboard2.txt"
  check_fail "dashboard (after faults): every query valid; data for all but the listed Kubernetes-only ones"
fi

# ----------------------------------------------------------------------------------------------
section "c. rolling restart of the replicas under load"
before="$(stored_count)"
results="$E2E_WORK/rolling.json"
stop_file="$E2E_WORK/rolling.stop"
"${E2E[@]}" rolling-load --url "$LB_URL" --out "$results" --stop-file "$stop_file" --clients 8 --max-seconds 150 &
LOAD_PID=$!
sleep 2
for ((i = 1; i <= STACK_REPLICAS; i++)); do
  restart_started=$SECONDS
  if "${STACK[@]}" restart "replica-$i" --dir "$STATE"; then
    check_pass "replica-$i: SIGTERM, exit status 0, started again, /ready 200 ($((SECONDS - restart_started))s)"
  else
    check_fail "replica-$i: rolling restart (exit status $(cat "$STATE/pids/replica-$i.rc" 2>/dev/null || echo '?'))"
  fi
  sleep 2
done
touch "$stop_file"
wait "$LOAD_PID" || check_fail "rolling load client"
LOAD_PID=""
after="$(stored_count)"
check "rolling restart: every request 200, no lost or duplicated count" \
  "${E2E[@]}" check-counts --results "$results" --before "$before" --after "$after"

# ----------------------------------------------------------------------------------------------
section "d. least privilege: database roles and Redis authentication"
# sql_as URL_VARIABLE SQL: runs SQL as the role of that URL; prints psql's output, errors included
sql_as() { psql -X -v ON_ERROR_STOP=1 "${!1}" -tAc "$2" 2>&1; }
ops() { # ops URL_VARIABLE SUBCOMMAND ARGS...: the binary as that role
  local url="${!1}"
  shift
  DATABASE_URL="$url" LOG_FORMAT=text RUST_LOG=warn "$ENDPOINT_STATS_BIN" "$@"
}

users="$(psql -X "$OWNER_DATABASE_URL" -tAc "select string_agg(distinct usename, ',') from pg_stat_activity where application_name = 'endpoint-stats'")"
if [[ "$users" == endpoint_stats_app ]]; then check_pass "the replicas' connections are all endpoint_stats_app's"; else check_fail "the replicas connect as ${users:-nobody}, expected endpoint_stats_app only"; fi
if [[ "$(curl -s --max-time 5 "$LB_URL/")" == *access_count* ]]; then check_pass "the service counts as endpoint_stats_app (GET / 200 with a count)"; else check_fail "GET / as endpoint_stats_app"; fi
check_fails "DROP TABLE as the service's role" "must be owner of table endpoint_access" sql_as DATABASE_URL "DROP TABLE endpoint_access"
check_fails "CREATE TABLE as the service's role" "permission denied for schema public" sql_as DATABASE_URL "CREATE TABLE intruder (a int)"
check_fails "DELETE as the service's role" "permission denied for table endpoint_access" sql_as DATABASE_URL "DELETE FROM endpoint_access"
check_fails "writing _sqlx_migrations as the service's role" "permission denied for table _sqlx_migrations" \
  sql_as DATABASE_URL "UPDATE _sqlx_migrations SET success = false"
check_fails "a temporary table as the service's role" "permission denied to create temporary tables" sql_as DATABASE_URL "CREATE TEMP TABLE t (a int)"
check_fails "endpoint-stats migrate as the service's role" "permission denied for schema public" ops DATABASE_URL migrate
owners="$(sql_as OWNER_DATABASE_URL "select string_agg(tablename || '=' || tableowner, ',' order by tablename) from pg_tables where schemaname = 'public'")"
applied="$(sql_as OWNER_DATABASE_URL "select count(*) from _sqlx_migrations where success")"
if [[ "$owners" == "_sqlx_migrations=endpoint_stats_owner,endpoint_access=endpoint_stats_owner" && "$applied" -ge 1 ]]; then
  check_pass "migrations ran as endpoint_stats_owner: $owners, $applied applied"
else
  check_fail "tables and migrations: owners $owners, applied $applied"
fi
wrong_password="$(sed -E 's#^(postgres://[^:]+:)[^@]+@#\1wrong-password@#' <<<"$DATABASE_URL")"
check_fails "endpoint_stats_app with a wrong password" "password authentication failed" psql -X "$wrong_password" -tAc "select 1"
superuser="postgres://postgres@127.0.0.1:$POSTGRES_PORT/endpoint_stats?sslmode=disable"
check_fails "the superuser over TCP with a wrong password" "password authentication failed for user \"postgres\"" \
  env PGPASSWORD=wrong-password psql -X -w "$superuser" -tAc "select 1"

backups="$E2E_WORK/backups"
mkdir -p "$backups"
check_quiet "backup as endpoint_stats_backup" ops BACKUP_DATABASE_URL backup --dir "$backups" --retention-days 10
check_quiet "verify-backup as endpoint_stats_verify (CREATEDB: scratch created and dropped)" ops VERIFY_DATABASE_URL verify-backup --dir "$backups"
check_fails "verify-backup as endpoint_stats_backup (no CREATEDB)" "permission denied to create database" ops BACKUP_DATABASE_URL verify-backup --dir "$backups"
before_restore="$(stored_count)"
check_fails "restore as the service's role" "must be owner" ops DATABASE_URL restore --latest --dir "$backups" --yes
check_quiet "restore as endpoint_stats_owner" ops OWNER_DATABASE_URL restore --latest --dir "$backups" --yes
# pg_restore recreates the tables as the owner: default privileges grant them again; the roles
# step re-applied (as after every restore, docs/operations/disaster-recovery.md) takes back what
# the defaults give the service on _sqlx_migrations.
check_quiet "roles re-applied after the restore (apply-roles.sh)" env PGUSER=postgres PGPASSWORD="$POSTGRES_ADMIN_PASSWORD" \
  OWNER_DATABASE_URL="$OWNER_DATABASE_URL" APP_DATABASE_URL="$DATABASE_URL" BACKUP_DATABASE_URL="$BACKUP_DATABASE_URL" \
  VERIFY_DATABASE_URL="$VERIFY_DATABASE_URL" MONITOR_DATABASE_URL="$MONITOR_DATABASE_URL" \
  bash "$REPO_ROOT/deploy/kubernetes/base/postgres/apply-roles.sh"
check_fails "writing _sqlx_migrations as the service's role, after restore and roles" "permission denied for table _sqlx_migrations" \
  sql_as DATABASE_URL "UPDATE _sqlx_migrations SET success = false"
count_after="$(curl -s --max-time 5 "$LB_URL/" | jq -r .access_count)"
if [[ "$count_after" =~ ^[0-9]+$ ]] && ((count_after > before_restore)); then
  check_pass "the service counts on after the restore, as endpoint_stats_app (/ at $count_after, $before_restore before)"
else
  check_fail "counting after the restore: / answered ${count_after:-nothing} (stored before: $before_restore)"
fi
# redis-cli exits 0 on an error reply: its output decides
redis_as() { local out; out="$("$@" 2>&1)"; printf '%s\n' "$out"; ! grep -qE 'NOAUTH|WRONGPASS|^ERR|^\(error\)' <<<"$out"; }
check_fails "Redis without the password" "NOAUTH" redis_as redis-cli -h 127.0.0.1 -p "$REDIS_PORT" set intruder 1
check_fails "Redis with a wrong password" "WRONGPASS" redis_as redis-cli --no-auth-warning -a wrong-password -h 127.0.0.1 -p "$REDIS_PORT" ping
check_quiet "Redis with the password (REDISCLI_AUTH)" redis_as env REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping
check_quiet "maintain as endpoint_stats_owner, Redis through REDIS_URL with the password" \
  env REDIS_URL="$REDIS_URL" DATABASE_URL="$OWNER_DATABASE_URL" LOG_FORMAT=text RUST_LOG=warn "$ENDPOINT_STATS_BIN" maintain
check_fails "maintain with a REDIS_URL without the password" "NOAUTH" \
  env REDIS_URL="redis://127.0.0.1:$REDIS_PORT" DATABASE_URL="$OWNER_DATABASE_URL" LOG_FORMAT=text RUST_LOG=warn "$ENDPOINT_STATS_BIN" maintain
if curl -s --max-time 5 "$REDIS_EXPORTER_URL" | grep -qx 'redis_up 1'; then check_pass "redis_exporter authenticates (redis_up 1)"; else check_fail "redis_exporter: redis_up is not 1"; fi
if curl -s --max-time 5 "$POSTGRES_EXPORTER_URL" | grep -qx 'pg_up 1'; then check_pass "postgres_exporter connects as endpoint_stats_monitor (pg_up 1)"; else check_fail "postgres_exporter: pg_up is not 1"; fi

# ----------------------------------------------------------------------------------------------
section "summary"
echo "e2e-stack finished in ${SECONDS}s"
check_summary e2e-stack
