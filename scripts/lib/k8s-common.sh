#!/usr/bin/env bash
# Shared by scripts/deploy.sh and scripts/rollback.sh (sourced, not run).
# Everything goes through "$KUBECTL" (default: kubectl), so tests substitute a stub
# (tests/deploy/stub/kubectl), always in "$NAMESPACE".

KUBECTL="${KUBECTL:-kubectl}"
NAMESPACE="${NAMESPACE:-endpoint-stats}"
DEPLOYMENT="${DEPLOYMENT:-endpoint-stats}"
# CronJobs that run the ops image, and the container name in each
declare -A OPS_CRONJOBS=(
  [endpoint-stats-backup]=backup
  [endpoint-stats-verify-backup]=verify-backup
  [endpoint-stats-maintenance]=maintenance
  [endpoint-stats-health-check]=health-check
  [endpoint-stats-deploy-gate]=deploy-gate
)
# the suspended CronJob that serves as the template of the post-deploy gate Job
GATE_CRONJOB="${GATE_CRONJOB:-endpoint-stats-deploy-gate}"
ROLLOUT_TIMEOUT="${ROLLOUT_TIMEOUT:-300s}"
GATE_TIMEOUT="${GATE_TIMEOUT:-300}"
GATE_POLL_INTERVAL="${GATE_POLL_INTERVAL:-5}"

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
err() { printf 'ERROR: %s\n' "$*" >&2; }

k() { "$KUBECTL" --namespace "$NAMESPACE" "$@"; }

# image reference without its tag or digest: registry:5000/x/y:1.2 -> registry:5000/x/y
image_repository() {
  local ref="${1%%@*}"
  local last="${ref##*/}"
  if [[ "$last" == *:* ]]; then ref="${ref%:*}"; fi
  printf '%s\n' "$ref"
}

# tag of an image reference (empty if none)
image_tag() {
  local ref="${1%%@*}"
  local last="${ref##*/}"
  if [[ "$last" == *:* ]]; then printf '%s\n' "${last##*:}"; fi
}

current_app_image() {
  k get deployment "$DEPLOYMENT" \
    -o "jsonpath={.spec.template.spec.containers[?(@.name==\"endpoint-stats\")].image}"
}

current_cronjob_image() {
  local cronjob="$1" container="${OPS_CRONJOBS[$1]}"
  k get cronjob "$cronjob" \
    -o "jsonpath={.spec.jobTemplate.spec.template.spec.containers[?(@.name==\"$container\")].image}"
}

set_ops_images() { # set_ops_images REPOSITORY:TAG  (every ops CronJob)
  local image="$1" cronjob
  for cronjob in "${!OPS_CRONJOBS[@]}"; do
    k set image "cronjob/$cronjob" "${OPS_CRONJOBS[$cronjob]}=$image" >/dev/null
  done
}

rollout_wait() {
  k rollout status "deployment/$DEPLOYMENT" --timeout="$ROLLOUT_TIMEOUT"
}

# Runs `endpoint-stats check` in the cluster as a Job made from the health-check CronJob and
# waits for its outcome. Returns 0 when the check passed.
run_gate() {
  local reason="$1" job
  job="endpoint-stats-gate-$(date -u +%Y%m%d%H%M%S)-$$"
  job="${job:0:63}"
  log "gate: running 'endpoint-stats check' in the cluster (job/$job, from cronjob/$GATE_CRONJOB, $reason)"
  if ! k create job "$job" --from="cronjob/$GATE_CRONJOB" >/dev/null; then
    err "gate: could not create job/$job"
    return 1
  fi
  local waited=0 status succeeded failed
  while :; do
    status="$(k get job "$job" -o 'jsonpath={.status.succeeded},{.status.failed}' || true)"
    succeeded="${status%%,*}" failed="${status#*,}"
    if [[ "${succeeded:-0}" =~ ^[1-9] ]]; then
      k logs "job/$job" --tail=200 >&2 || true
      log "gate: passed"
      k delete job "$job" --ignore-not-found >/dev/null || true
      return 0
    fi
    if [[ "${failed:-0}" =~ ^[1-9] ]]; then
      k logs "job/$job" --tail=200 >&2 || true
      err "gate: 'endpoint-stats check' failed (job/$job kept for inspection: kubectl -n $NAMESPACE describe job/$job)"
      return 1
    fi
    if ((waited >= GATE_TIMEOUT)); then
      k logs "job/$job" --tail=200 >&2 || true
      err "gate: no result after ${GATE_TIMEOUT}s (job/$job kept for inspection)"
      return 1
    fi
    sleep "$GATE_POLL_INTERVAL"
    waited=$((waited + (GATE_POLL_INTERVAL > 0 ? GATE_POLL_INTERVAL : 1)))
  done
}

record_change_cause() {
  k annotate "deployment/$DEPLOYMENT" "kubernetes.io/change-cause=$1" --overwrite >/dev/null
}

who() { printf '%s\n' "${USER:-$(id -un 2>/dev/null || echo unknown)}"; }
