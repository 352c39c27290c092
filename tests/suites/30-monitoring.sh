#!/usr/bin/env bash
# Monitoring as code: the Prometheus rules and their unit tests, the scrape configuration, the
# Alertmanager routing, the runbook links and the Grafana dashboard, checked with the real tools
# (promtool, amtool, Prometheus and Alertmanager from Debian) and the helpers in tests/monitoring/.
# Every check is also shown to fail on a broken copy of its input. docs/monitoring.md explains
# what each check proves. Run alone: REPO_ROOT=$PWD bash tests/suites/30-monitoring.sh
set -euo pipefail

: "${REPO_ROOT:?set REPO_ROOT to the repository root}"
cd "$REPO_ROOT"

MON=deploy/kubernetes/base/monitoring
RULES=$MON/prometheus/rules/endpoint-stats.rules.yml
TESTS_DIR=$MON/prometheus/tests
AM=$MON/alertmanager/alertmanager.yml
DASHBOARD=$MON/grafana/dashboards/endpoint-statistics.json
GENERATOR=$MON/grafana/dashboard.py
HELPER=tests/monitoring/monitoring_checks.py

# shellcheck source=tests/lib/checks.sh
source tests/lib/checks.sh
section() { printf '\n=== %s\n' "$*"; }

# mutate SRC DST SED-SCRIPT: a broken copy; refuses to produce an unchanged one.
mutate() {
  local src=$1 dst=$2 script=$3
  sed -E "$script" "$src" >"$dst"
  if cmp -s "$src" "$dst"; then
    echo "mutate: '$script' changed nothing in $src" >&2
    return 1
  fi
}

# amtool warns on every use of --config.file that it overrides --alertmanager.url: noise here.
amtool_routes_test() {
  amtool config routes test "$@" 2> >(grep -v 'overrides the --alertmanager.url' >&2)
}

# --------------------------------------------------------------------------- tools
section "tools"
for tool in promtool amtool prometheus; do
  command -v "$tool" >/dev/null || { echo "missing $tool (Debian packages prometheus, prometheus-alertmanager: scripts/lib/ensure-deps.sh)"; exit 1; }
done
if ! command -v prometheus-alertmanager >/dev/null && ! command -v alertmanager >/dev/null; then
  echo "missing alertmanager (Debian package prometheus-alertmanager)"
  exit 1
fi
PY=
for candidate in python3 "$REPO_ROOT/.venv/bin/python"; do
  if command -v "$candidate" >/dev/null && "$candidate" scripts/lib/pymodules.py yaml 2>/dev/null; then
    PY=$candidate
    break
  fi
done
[[ -n $PY ]] || { echo "no python3 with PyYAML (system python3 or $REPO_ROOT/.venv/bin/python)"; exit 1; }
# The dashboard generator needs its pinned SDK (grafana/requirements.txt), which ensure-deps.sh
# installs into .venv.
GEN_PY=$REPO_ROOT/.venv/bin/python
"$GEN_PY" scripts/lib/pymodules.py grafana_foundation_sdk 2>/dev/null ||
  { echo "no $GEN_PY with grafana-foundation-sdk: run scripts/lib/ensure-deps.sh (or scripts/test.sh)"; exit 1; }
promtool --version 2>&1 | head -n 1
amtool --version 2>&1 | head -n 1
echo "python: $PY ($("$PY" scripts/lib/pymodules.py --versions yaml))"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --------------------------------------------------------------------------- rules
section "Prometheus rules: syntax, conventions, unit tests"
check "promtool check rules $RULES" promtool check rules "$RULES"
check "every alert: severity, summary, templated description, runbook_url, plain for:, fire and quiet test cases" \
  "$PY" "$HELPER" rules
mapfile -t test_files < <(find "$TESTS_DIR" -name '*.test.yml' | sort)
((${#test_files[@]})) || check_fail "no promtool test files in $TESTS_DIR"
check "promtool test rules (${#test_files[@]} files)" promtool test rules "${test_files[@]}"

# --------------------------------------------------------------------------- prometheus.yml
section "Prometheus scrape configuration"
check "Kubernetes parts of prometheus.yml well-formed; local copy for the Debian Prometheus" \
  "$PY" "$HELPER" prometheus-local-config --out "$TMP/prom"
check "promtool check config (local copy: file_sd fixtures instead of Kubernetes discovery)" \
  promtool check config "$TMP/prom/prometheus.yml"
check "real Prometheus: relabelled targets, rules and Alertmanager from the committed config" \
  "$PY" "$HELPER" prometheus-targets --config "$TMP/prom/prometheus.yml"

# --------------------------------------------------------------------------- alertmanager
section "Alertmanager routing"
check "amtool check-config $AM" amtool check-config "$AM"
amtool config routes --config.file="$AM" 2>/dev/null
route_ok=0
route_bad=0
while read -r alertname severity; do
  case "$alertname/$severity" in
    Watchdog/*) want=watchdog ;;
    */critical) want=slack-incidents ;;
    */warning) want=slack-monitoring ;;
    *) want=slack-monitoring ;;
  esac
  if got=$(amtool_routes_test --config.file="$AM" --verify.receivers="$want" \
    alertname="$alertname" severity="$severity" namespace=endpoint-stats); then
    route_ok=$((route_ok + 1))
    printf '    %-34s %-9s -> %s\n' "$alertname" "$severity" "$got"
  else
    route_bad=$((route_bad + 1))
    printf '    %-34s %-9s -> %s, expected %s\n' "$alertname" "$severity" "$got" "$want"
  fi
done < <("$PY" "$HELPER" alerts)
if ((route_bad == 0 && route_ok > 0)); then
  check_pass "amtool config routes test: $route_ok alerts route by severity (critical -> slack-incidents, warning -> slack-monitoring, Watchdog -> watchdog)"
else
  check_fail "amtool config routes test: $route_bad of $((route_ok + route_bad)) alerts misrouted"
fi
check "amtool config routes test: an alert without severity goes to the root receiver slack-monitoring" \
  amtool_routes_test --config.file="$AM" --verify.receivers=slack-monitoring alertname=SomethingNew
check "real Alertmanager with a Slack sink: channels, templates, runbook links, inhibition" \
  "$PY" "$HELPER" alertmanager-live

# --------------------------------------------------------------------------- runbooks
section "Runbooks"
check "every runbook_url anchor is a heading in docs/runbooks" "$PY" "$HELPER" runbooks

# --------------------------------------------------------------------------- dashboard
section "Grafana dashboard"
check "dashboard JSON is the output of its generator $GENERATOR (thresholds from the alerts)" \
  "$GEN_PY" "$GENERATOR" --check
check "the API routes are selected in one recording rule; no other rule or panel selects routes" \
  "$PY" "$HELPER" selectors
check "dashboard JSON: title, uid, variables namespace and pod, a target in every panel" \
  "$PY" "$HELPER" dashboard --rules-out "$TMP/dashboard-queries.yml"
check "every dashboard query (variables substituted) is valid PromQL (promtool check rules)" \
  promtool check rules "$TMP/dashboard-queries.yml"
kubernetes_panels_test() { # DASHBOARD OUT: the Kubernetes-only queries over exporter-shaped series
  "$PY" "$HELPER" kubernetes-panels --dashboard "$1" --test-out "$2" && promtool test rules "$2"
}
check "panels fed only by kube-state-metrics and cAdvisor show data (promtool, series as the exporters expose them)" \
  kubernetes_panels_test "$DASHBOARD" "$TMP/kubernetes-panels.test.yml"
check "Grafana provisioning files are valid YAML with the Prometheus datasource uid" \
  "$PY" "$HELPER" grafana-provisioning

# --------------------------------------------------------------------------- metrics
section "Metric names"
check "every metric read by a rule or a panel has a source" "$PY" "$HELPER" metrics

# --------------------------------------------------------------------------- negative controls
section "Each check fails on broken input"
mkdir -p "$TMP/bad"

mutate "$RULES" "$TMP/bad/syntax.rules.yml" 's/rate5m > 0\.05$/rate5m > > 0.05/' || check_fail "could not make the broken copy"
check_fails "promtool check rules on a rules file with a PromQL syntax error" "" \
  promtool check rules "$TMP/bad/syntax.rules.yml"

# broken_tree NAME: a copy of the rules folder layout (tests reference ../rules/ relatively).
broken_tree() {
  mkdir -p "$TMP/bad/$1/prometheus/rules"
  cp -r "$TESTS_DIR" "$TMP/bad/$1/prometheus/tests"
  echo "$TMP/bad/$1/prometheus"
}

tree=$(broken_tree for)
mutate "$RULES" "$tree/rules/endpoint-stats.rules.yml" '0,/^( +)for: 5m$/s//\1for: five minutes/' || check_fail "could not make the broken copy"
check_fails "promtool check rules on a rules file with an invalid for: duration" "" \
  promtool check rules "$tree/rules/endpoint-stats.rules.yml"
check_fails "the rules convention check on the same file" "" \
  "$PY" "$HELPER" rules --rules "$tree/rules/endpoint-stats.rules.yml" --tests "$tree/tests/*.test.yml"

# A rule that still parses but is wrong: the unit tests must notice.
tree=$(broken_tree threshold)
mutate "$RULES" "$tree/rules/endpoint-stats.rules.yml" 's/rate5m > 0\.05$/rate5m > 0.5/' || check_fail "could not make the broken copy"
check_fails "promtool test rules against a rules file whose HighErrorRate threshold is 50% instead of 5%" "" \
  promtool test rules "$tree/tests/service.test.yml"

# The dashboard draws the alert thresholds from the rules: one changed there changes the JSON.
check_fails "the generator check when HighErrorRate's threshold changed in the rules but not in the JSON" "" \
  "$GEN_PY" "$GENERATOR" --check --rules "$tree/rules/endpoint-stats.rules.yml"

# An alert without a quiet test case: the coverage check must notice.
tree=$(broken_tree coverage)
cp "$RULES" "$tree/rules/endpoint-stats.rules.yml"
"$PY" tests/monitoring/break_inputs.py no-quiet-case "$tree/tests/kubernetes.test.yml" VolumeNearlyFull
check_fails "the test coverage check when VolumeNearlyFull has no case where it must stay quiet" "" \
  "$PY" "$HELPER" rules --rules "$tree/rules/endpoint-stats.rules.yml" --tests "$tree/tests/*.test.yml"

mutate "$AM" "$TMP/bad/alertmanager.yml" 's/^( +- receiver: )slack-incidents$/\1slack-pager/' || check_fail "could not make the broken copy"
check_fails "amtool check-config on a configuration routing to an undefined receiver" "" \
  amtool check-config "$TMP/bad/alertmanager.yml"

mutate "$AM" "$TMP/bad/route.alertmanager.yml" 's/^( +- )severity="critical"$/\1severity="page"/' || check_fail "could not make the broken copy"
check_fails "amtool config routes test when critical alerts no longer reach slack-incidents" "" \
  amtool_routes_test --config.file="$TMP/bad/route.alertmanager.yml" \
  --verify.receivers=slack-incidents alertname=HighErrorRate severity=critical namespace=endpoint-stats

mutate "$MON/prometheus/prometheus.yml" "$TMP/bad/prometheus.yml" 's/^(        regex: )postgres-exporter\|/\1(postgres-exporter|/' || check_fail "could not make the broken copy"
"$PY" "$HELPER" prometheus-local-config --config "$TMP/bad/prometheus.yml" --out "$TMP/bad/prom" >/dev/null
check_fails "promtool check config on a scrape configuration with an invalid relabel regex" "" \
  promtool check config "$TMP/bad/prom/prometheus.yml"

cp -r docs/runbooks "$TMP/bad/runbooks"
mutate docs/runbooks/high-error-rate.md "$TMP/bad/runbooks/high-error-rate.md" 's/^# HighErrorRate$/# High error rate/' || check_fail "could not make the broken copy"
check_fails "the runbook link check when a runbook heading is renamed" "" \
  "$PY" "$HELPER" runbooks --runbooks-dir "$TMP/bad/runbooks"

"$PY" tests/monitoring/break_inputs.py dashboards "$DASHBOARD" "$TMP/bad"
# A hand edit of the JSON: a panel that selects the API routes itself again.
mutate "$DASHBOARD" "$TMP/bad/hand-edit.json" \
  '0,/api:http_requests_total\{namespace/s//http_requests_total{job=\\"endpoint-stats\\", route!~\\"\/health|\/ready|\/metrics\\", namespace/' \
  || check_fail "could not make the broken copy"
check_fails "the generator check on a hand-edited dashboard JSON" "" \
  "$GEN_PY" "$GENERATOR" --check --dashboard "$TMP/bad/hand-edit.json"
check_fails "the selector check on the same JSON (a panel names the API routes itself)" "" \
  "$PY" "$HELPER" selectors --dashboard "$TMP/bad/hand-edit.json"
check_fails "the Kubernetes panel test when a panel sums the pause container's memory into the pod's" "" \
  kubernetes_panels_test "$TMP/bad/pause-container.json" "$TMP/bad/kubernetes-panels.test.yml"
check_fails "the dashboard check on a dashboard with a panel without a target" "" \
  "$PY" "$HELPER" dashboard --dashboard "$TMP/bad/no-target.json"
"$PY" "$HELPER" dashboard --dashboard "$TMP/bad/bad-query.json" --rules-out "$TMP/bad/dashboard-queries.yml" >/dev/null
check_fails "promtool check rules on the queries of a dashboard with a broken query" "" \
  promtool check rules "$TMP/bad/dashboard-queries.yml"
check_fails "the metric source check on a dashboard that still reads the Flask metric" "" \
  "$PY" "$HELPER" metrics --dashboard "$TMP/bad/old-metric.json"

# The live checks: a relabelling that no longer gives job="endpoint-stats", and a critical alert
# that no longer inhibits its warning.
mutate "$MON/prometheus/prometheus.yml" "$TMP/bad/job.prometheus.yml" \
  's/^( +- source_labels: \[__meta_kubernetes_pod_label_app)_kubernetes_io_name\]$/\1_kubernetes_io_instance]/' \
  || check_fail "could not make the broken copy"
"$PY" "$HELPER" prometheus-local-config --config "$TMP/bad/job.prometheus.yml" --out "$TMP/bad/prom-job" >/dev/null
check_fails "the live Prometheus target check when the job label is taken from the wrong pod label" "" \
  "$PY" "$HELPER" prometheus-targets --config "$TMP/bad/prom-job/prometheus.yml"

mutate "$AM" "$TMP/bad/inhibit.alertmanager.yml" '/^inhibit_rules:/,/^receivers:/s/^( +- )severity="warning"$/\1severity="info"/' \
  || check_fail "could not make the broken copy"
check_fails "the live Alertmanager check when critical no longer inhibits warning" "" \
  "$PY" "$HELPER" alertmanager-live --config "$TMP/bad/inhibit.alertmanager.yml"

mutate "$AM" "$TMP/bad/webhook.alertmanager.yml" 's|(api_url_file: /etc/alertmanager/secrets/)slack-webhook-monitoring$|\1slack-webhook-incidents|' \
  || check_fail "could not make the broken copy"
check_fails "the live Alertmanager check when #monitoring posts through the #incidents webhook" "" \
  "$PY" "$HELPER" alertmanager-live --config "$TMP/bad/webhook.alertmanager.yml"

# --------------------------------------------------------------------------- summary
section "summary"
check_summary monitoring
