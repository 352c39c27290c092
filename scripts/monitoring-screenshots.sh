#!/usr/bin/env bash
# Regenerates the pictures of docs/monitoring.md ("What an operator sees"): what Prometheus and
# Alertmanager show while HighErrorRate fires. Nothing is drawn: a local stack
# (scripts/local-stack.sh up --fast-alerts, on free loopback ports, in a temporary directory)
# serves traffic through its load balancer, PostgreSQL is stopped under load as in the
# end-to-end suite, and once Prometheus reports HighErrorRate firing, headless Chromium (Debian's
# chromium) photographs
#   docs/images/alert-prometheus-graph.png   the SLI rule and the responses by status, classic UI
#   docs/images/alert-prometheus-alerts.png  Prometheus' alerts page
#   docs/images/alert-alertmanager.png       Alertmanager's alert group of HighErrorRate (its API:
#                                            Debian's Alertmanager has no web UI)
# The stack is always torn down. Every request goes to 127.0.0.1. Takes about two minutes.
#
#   ENDPOINT_STATS_BIN=target/release/endpoint-stats scripts/monitoring-screenshots.sh [OUT_DIR]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT
cd "$REPO_ROOT"
export ENDPOINT_STATS_BIN="${ENDPOINT_STATS_BIN:-$REPO_ROOT/target/release/endpoint-stats}"
OUT="${1:-$REPO_ROOT/docs/images}"

# The e2e helpers: free port block, bounded background traffic, logging.
# shellcheck source=tests/e2e/lib.sh
source "$REPO_ROOT/tests/e2e/lib.sh"

for tool in chromium wrk curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y $tool)" >&2; exit 1; }
done
[[ -x "$ENDPOINT_STATS_BIN" ]] || { echo "missing $ENDPOINT_STATS_BIN (cargo build --release)" >&2; exit 1; }
PY=python3
if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"; fi
E2E=("$PY" "$REPO_ROOT/tests/e2e/e2e.py")
STACK=(bash "$REPO_ROOT/scripts/local-stack.sh")

E2E_WORK="$(mktemp -d "${TMPDIR:-/tmp}/monitoring-screenshots.XXXXXX")"
STATE="$E2E_WORK/stack"
chmod 755 "$E2E_WORK" # the stack's PostgreSQL runs as the postgres user when this runs as root
teardown() {
  set +e
  traffic_stop_all
  [[ -f "$STATE/stack.env" ]] && "${STACK[@]}" down --dir "$STATE" >/dev/null 2>&1
  rm -rf "$E2E_WORK"
}
trap teardown EXIT
trap 'exit 130' INT TERM

base="$(pick_base_port)" || { echo "no free block of 20 loopback ports" >&2; exit 1; }
"${STACK[@]}" up --dir "$STATE" --base-port "$base" --fast-alerts
# shellcheck source=/dev/null
source "$STATE/stack.env"
mapfile -t replicas < <(for ((i = 1; i <= STACK_REPLICAS; i++)); do echo "http://127.0.0.1:$((STACK_BASE_PORT + 10 + i))"; done)

# Ordinary traffic on the three counted routes, through the load balancer, for the whole run.
E2E_TRAFFIC_MAX=300
for route in / /stats /api/v1/endpoints; do
  name="lb${route//\//-}" # a file name: the helper stops the loop through NAME.stop
  traffic_start "$name" curl -s -o /dev/null --max-time 2 "$LB_URL$route"
done
sleep 30

# The fault: PostgreSQL stops while 100 connections per replica hit / directly (nginx would stop
# sending to replicas that answer 503): DatabaseConnectionIssues, then HighErrorRate.
"${STACK[@]}" stop postgres --dir "$STATE"
for i in "${!replicas[@]}"; do
  traffic_start "db-down-$i" wrk -t1 -c100 -d15s --timeout 20s "${replicas[$i]}/"
done
"${E2E[@]}" wait-query --prometheus "$PROMETHEUS_URL" --timeout 150 \
  --query 'ALERTS{alertname="HighErrorRate",alertstate="firing"}' >/dev/null
# Alertmanager has it within its shortened group_wait; a few more evaluations fill the graphs.
sleep 10

shot() { # URL OUT WIDTHxHEIGHT
  timeout 90 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$E2E_WORK/chromium" --hide-scrollbars --window-size="${3/x/,}" \
    --virtual-time-budget=10000 --screenshot="$2" "$1" 2>/dev/null
  [[ -s "$2" ]] || { echo "no screenshot of $1" >&2; return 1; }
  printf '==> %s (%s bytes): %s\n' "${2#"$REPO_ROOT"/}" "$(stat -c %s "$2")" "$1"
}
urlencode() { "${E2E[@]}" urlencode "$1"; }

mkdir -p "$OUT"
g0="$(urlencode 'namespace:http_requests_error_ratio:rate5m')"
g1="$(urlencode 'sum by (status) (rate(http_requests_total{job="endpoint-stats"}[1m]))')"
shot "$PROMETHEUS_URL/classic/graph?g0.expr=$g0&g0.tab=0&g0.range_input=2m&g1.expr=$g1&g1.tab=0&g1.range_input=2m" \
  "$OUT/alert-prometheus-graph.png" 1200x1560
shot "$PROMETHEUS_URL/classic/alerts" "$OUT/alert-prometheus-alerts.png" 1200x900
# Debian's Alertmanager ships without its web UI (its page says so), so the picture is its API's
# view of the alert group of HighErrorRate (grouping labels, receiver, state, annotations), the
# response as it came, only indented, in a page of its own (Chromium shows raw JSON on one line).
filter="$(urlencode 'alertname="HighErrorRate"')"
api="/api/v2/alerts/groups?filter=$filter"
curl -sf "$ALERTMANAGER_URL$api" | "${E2E[@]}" json-page --title "Alertmanager: GET $api" >"$E2E_WORK/alertmanager.html"
shot "file://$E2E_WORK/alertmanager.html" "$OUT/alert-alertmanager.png" 1200x1000
