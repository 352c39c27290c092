#!/usr/bin/env bash
# The whole system on a local minikube:
#   - starts minikube if it is not running (Calico, so that the NetworkPolicies are enforced)
#   - enables the metrics-server addon (the HPA needs it: without it its targets read <unknown>)
#   - builds the service and ops images inside minikube (no registry involved)
#   - writes the overlay's git-ignored secret files when missing (random passwords: one per
#     database role, the database administrator, Redis; the Slack
#     webhook of all three channels from $SLACK_WEBHOOK_URL, or placeholders: alerts then fail to
#     post, nothing else; edit secrets/alertmanager-slack.env for one webhook per channel)
#   - kubectl apply -k deploy/kubernetes/overlays/minikube, waits for every workload
#   - prints the port-forward commands
#
# Environment: MINIKUBE_PROFILE (minikube), MINIKUBE_CPUS (4), MINIKUBE_MEMORY (8192),
# MINIKUBE_CNI (calico), SLACK_WEBHOOK_URL, KUBECTL (kubectl), WAIT_TIMEOUT (600s),
# SKIP_BUILD=1 to reuse the images already in minikube.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OVERLAY="$REPO_ROOT/deploy/kubernetes/overlays/minikube"
SECRETS="$OVERLAY/secrets"
PROFILE="${MINIKUBE_PROFILE:-minikube}"
KUBECTL="${KUBECTL:-kubectl}"
NAMESPACE=endpoint-stats
WAIT_TIMEOUT="${WAIT_TIMEOUT:-600s}"
# the tags the overlay pins (deploy/kubernetes/overlays/minikube/kustomization.yaml)
APP_IMAGE=endpoint-stats:dev
OPS_IMAGE=endpoint-stats-ops:dev

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
(($# == 0)) || die "no arguments expected (see --help)"

command -v minikube >/dev/null || die "minikube is not installed (https://minikube.sigs.k8s.io/docs/start/)"
command -v "$KUBECTL" >/dev/null || die "kubectl is not installed"

mk() { minikube --profile "$PROFILE" "$@"; }

if ! mk status >/dev/null 2>&1; then
  log "starting minikube (profile $PROFILE)"
  mk start --cpus "${MINIKUBE_CPUS:-4}" --memory "${MINIKUBE_MEMORY:-8192}" --cni "${MINIKUBE_CNI:-calico}"
fi
"$KUBECTL" config use-context "$PROFILE" >/dev/null

log "enabling metrics-server (HPA) and the default storage class"
mk addons enable metrics-server >/dev/null
mk addons enable default-storageclass >/dev/null
mk addons enable storage-provisioner >/dev/null

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  log "building $APP_IMAGE and $OPS_IMAGE inside minikube (the first build compiles everything: minutes)"
  mk image build -t "$APP_IMAGE" --build-opt=target=runtime "$REPO_ROOT"
  mk image build -t "$OPS_IMAGE" --build-opt=target=ops "$REPO_ROOT"
fi

random_secret() { head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24; }

umask 077
# database.env of before the database roles (one superuser for everything): its superuser becomes
# the administrator of database-admin.env (the volume was initialised with it), and database.env
# is written anew with a URL per role.
if [[ -f "$SECRETS/database.env" ]] && ! grep -q '^OWNER_DATABASE_URL=' "$SECRETS/database.env"; then
  log "$SECRETS/database.env predates the database roles: its superuser moves to database-admin.env (old file kept as database-before-roles.env)"
  [[ -f "$SECRETS/database-admin.env" ]] || grep -E '^POSTGRES_(USER|PASSWORD|DB)=' "$SECRETS/database.env" >"$SECRETS/database-admin.env"
  mv "$SECRETS/database.env" "$SECRETS/database-before-roles.env"
fi
if [[ ! -f "$SECRETS/database-admin.env" ]]; then
  log "writing $SECRETS/database-admin.env (random administrator password; git-ignored)"
  printf 'POSTGRES_USER=postgres\nPOSTGRES_PASSWORD=%s\nPOSTGRES_DB=endpoint_stats\n' "$(random_secret)" >"$SECRETS/database-admin.env"
fi
if [[ ! -f "$SECRETS/database.env" ]]; then
  log "writing $SECRETS/database.env (a random password per database role; git-ignored)"
  for role in app owner backup verify monitor; do
    key=DATABASE_URL
    [[ "$role" == app ]] || key="${role^^}_DATABASE_URL"
    printf '%s=postgres://endpoint_stats_%s:%s@postgres:5432/endpoint_stats?sslmode=disable\n' "$key" "$role" "$(random_secret)"
  done >"$SECRETS/database.env"
fi
if [[ ! -f "$SECRETS/redis.env" ]]; then
  log "writing $SECRETS/redis.env (random Redis password; git-ignored)"
  printf 'REDIS_PASSWORD=%s\n' "$(random_secret)" >"$SECRETS/redis.env"
fi
if [[ ! -f "$SECRETS/grafana.env" ]]; then
  log "writing $SECRETS/grafana.env (random admin password; git-ignored)"
  printf 'GF_SECURITY_ADMIN_USER=admin\nGF_SECURITY_ADMIN_PASSWORD=%s\n' "$(random_secret)" >"$SECRETS/grafana.env"
fi
if [[ ! -f "$SECRETS/alertmanager-slack.env" ]]; then
  if [[ -n "${SLACK_WEBHOOK_URL:-}" ]]; then
    log "writing $SECRETS/alertmanager-slack.env from \$SLACK_WEBHOOK_URL (one channel for every receiver)"
    printf 'slack-webhook-%s=%s\n' incidents "$SLACK_WEBHOOK_URL" monitoring "$SLACK_WEBHOOK_URL" \
      watchdog "$SLACK_WEBHOOK_URL" >"$SECRETS/alertmanager-slack.env"
  else
    log "SLACK_WEBHOOK_URL not set: writing a placeholder webhook (alerts will not reach Slack)"
    grep -v '^#' "$SECRETS/alertmanager-slack.env.example" >"$SECRETS/alertmanager-slack.env"
  fi
fi
umask 022

log "applying deploy/kubernetes/overlays/minikube"
"$KUBECTL" apply -k "$OVERLAY"

log "waiting for the workloads (timeout $WAIT_TIMEOUT)"
"$KUBECTL" -n "$NAMESPACE" rollout status statefulset/postgres --timeout="$WAIT_TIMEOUT"
# the roles the service and the jobs connect as (the service's init container waits for them)
if "$KUBECTL" -n "$NAMESPACE" get job endpoint-stats-db-roles >/dev/null 2>&1; then
  "$KUBECTL" -n "$NAMESPACE" wait --for=condition=complete job/endpoint-stats-db-roles --timeout="$WAIT_TIMEOUT"
else
  log "job endpoint-stats-db-roles finished earlier and was removed (ttlSecondsAfterFinished)"
fi
for deployment in redis endpoint-stats postgres-exporter redis-exporter prometheus alertmanager grafana kube-state-metrics; do
  "$KUBECTL" -n "$NAMESPACE" rollout status "deployment/$deployment" --timeout="$WAIT_TIMEOUT"
done
"$KUBECTL" -n "$NAMESPACE" get pods,hpa,pvc,cronjobs

cat <<EOT

endpoint-stats runs in minikube (namespace $NAMESPACE). Reach it with:

  kubectl -n $NAMESPACE port-forward svc/endpoint-stats 9999:9999   # http://localhost:9999/stats
  kubectl -n $NAMESPACE port-forward svc/prometheus 9090:9090       # http://localhost:9090/targets
  kubectl -n $NAMESPACE port-forward svc/alertmanager 9093:9093     # http://localhost:9093
  kubectl -n $NAMESPACE port-forward svc/grafana 3000:3000          # http://localhost:3000 (user admin)

Grafana's admin password is in deploy/kubernetes/overlays/minikube/secrets/grafana.env.

Health of the whole system, as the deploy gate runs it:
  kubectl -n $NAMESPACE create job check-\$(date +%s) --from=cronjob/endpoint-stats-health-check
HPA (needs a minute of metrics):  kubectl -n $NAMESPACE get hpa endpoint-stats
EOT
