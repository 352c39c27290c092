#!/usr/bin/env bash
# Deploys a released image of endpoint-stats to the cluster, gated by a health check:
#   1. kubectl set image  (the service and its `migrate` init container)
#   2. records the change-cause (kubectl rollout history shows it)
#   3. kubectl rollout status --timeout
#   4. points the ops CronJobs at the matching ops image
#   5. gate: `endpoint-stats check` as a Job made from the suspended CronJob
#      endpoint-stats-deploy-gate (the service through its Service, PostgreSQL, Redis)
# and rolls back by itself (kubectl rollout undo, ops images restored) when 3 or 5 fails.
set -euo pipefail

# shellcheck source=scripts/lib/k8s-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/k8s-common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") TAG

Deploys image tag TAG of endpoint-stats (and of endpoint-stats-ops for the CronJobs) to
namespace \$NAMESPACE, waits for the rollout, runs 'endpoint-stats check' in the cluster and
rolls back automatically when either fails.

TAG  a release version (1.4.2, v1.4.2, 1.5.0-rc.1) or a git commit id (7 to 40 hex digits)

Environment:
  KUBECTL           kubectl binary                (default: kubectl)
  NAMESPACE         namespace                     (default: endpoint-stats)
  IMAGE             service image repository      (default: the one running now)
  OPS_IMAGE         ops image repository          (default: the one the CronJobs run now)
  ROLLOUT_TIMEOUT   kubectl rollout status limit  (default: 300s)
  GATE_TIMEOUT      seconds to wait for the check (default: 300)
  CHANGE_CAUSE      text for the rollout history  (default: "deploy TAG by USER at TIME")
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if (($# != 1)); then
  usage >&2
  err "expected exactly one argument, TAG (got $#)"
  exit 2
fi
TAG="$1"
version_re='^v?(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$'
sha_re='^[0-9a-f]{7,40}$'
if ! [[ "$TAG" =~ $version_re || "$TAG" =~ $sha_re ]]; then
  usage >&2
  err "not a release version nor a commit id: '$TAG'"
  exit 2
fi

log "namespace $NAMESPACE, deployment $DEPLOYMENT, tag $TAG"
if ! old_image="$(current_app_image)" || [[ -z "$old_image" ]]; then
  err "cannot read deployment/$DEPLOYMENT in namespace $NAMESPACE (is the cluster reachable and the overlay applied?)"
  exit 1
fi
declare -A old_ops_images=()
for cronjob in "${!OPS_CRONJOBS[@]}"; do
  old_ops_images[$cronjob]="$(current_cronjob_image "$cronjob")"
done

repo="${IMAGE:-$(image_repository "$old_image")}"
ops_repo="${OPS_IMAGE:-$(image_repository "${old_ops_images[$GATE_CRONJOB]}")}"
new_image="$repo:$TAG"
new_ops_image="$ops_repo:$TAG"
log "running: $old_image"
log "target:  $new_image (ops jobs: $new_ops_image)"

restore_ops_images() {
  local cronjob
  for cronjob in "${!OPS_CRONJOBS[@]}"; do
    if [[ -n "${old_ops_images[$cronjob]}" ]]; then
      k set image "cronjob/$cronjob" "${OPS_CRONJOBS[$cronjob]}=${old_ops_images[$cronjob]}" >/dev/null || true
    fi
  done
}

rollback() {
  local why="$1"
  err "$why: rolling back to $old_image"
  local rc=0
  k rollout undo "deployment/$DEPLOYMENT" || rc=1
  restore_ops_images
  if ((rc == 0)) && rollout_wait; then
    record_change_cause "automatic rollback from $TAG ($why) by $(who) at $(date -u +%Y-%m-%dT%H:%M:%SZ)" || true
    err "rolled back: $DEPLOYMENT runs $old_image again. Deploy of $TAG FAILED."
  else
    err "the rollback did not complete either: look at 'kubectl -n $NAMESPACE rollout history deployment/$DEPLOYMENT' and 'kubectl -n $NAMESPACE get pods' NOW"
  fi
  exit 1
}

if [[ "$old_image" == "$new_image" ]]; then
  log "$DEPLOYMENT already runs $new_image: no rollout, running the gate only"
  set_ops_images "$new_ops_image"
  if run_gate "re-check of the running version"; then
    log "deploy of $TAG: nothing to change, gate passed"
    exit 0
  fi
  err "the gate fails on the version that was already running: not rolling back (nothing changed)"
  exit 1
fi

cause="${CHANGE_CAUSE:-deploy $TAG by $(who) at $(date -u +%Y-%m-%dT%H:%M:%SZ)}"
# the containers of the Deployment that run the service image
set_image_args=()
for container in endpoint-stats migrate; do set_image_args+=("$container=$new_image"); done
log "kubectl set image deployment/$DEPLOYMENT ${set_image_args[*]}"
k set image "deployment/$DEPLOYMENT" "${set_image_args[@]}"
record_change_cause "$cause"

log "waiting for the rollout (timeout $ROLLOUT_TIMEOUT)"
if ! rollout_wait; then
  rollback "rollout of $TAG did not complete within $ROLLOUT_TIMEOUT"
fi

set_ops_images "$new_ops_image"
if ! run_gate "after the rollout of $TAG"; then
  rollback "health check after deploying $TAG failed"
fi

log "deployed $new_image: rollout complete, health check passed"
