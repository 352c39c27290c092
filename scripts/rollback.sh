#!/usr/bin/env bash
# Rolls the service back to the previous revision, or to REVISION (see
# `kubectl rollout history deployment/endpoint-stats`), waits for the rollout, points the ops
# CronJobs at the matching ops image, records the change-cause and runs the health check.
set -euo pipefail

# shellcheck source=scripts/lib/k8s-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/k8s-common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [REVISION]

Rolls deployment/$DEPLOYMENT in namespace \$NAMESPACE back to REVISION (a positive integer from
'kubectl rollout history'), or to the previous revision without it; then waits for the rollout
and runs 'endpoint-stats check' in the cluster.

Environment:
  KUBECTL           kubectl binary                (default: kubectl)
  NAMESPACE         namespace                     (default: endpoint-stats)
  ROLLOUT_TIMEOUT   kubectl rollout status limit  (default: 300s)
  GATE_TIMEOUT      seconds to wait for the check (default: 300)
  SKIP_GATE=1       do not run the health check
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if (($# > 1)); then
  usage >&2
  err "expected at most one argument, REVISION (got $#)"
  exit 2
fi
REVISION="${1:-}"
if [[ -n "$REVISION" && ! "$REVISION" =~ ^[1-9][0-9]*$ ]]; then
  usage >&2
  err "REVISION must be a positive integer, got '$REVISION'"
  exit 2
fi

if ! before="$(current_app_image)" || [[ -z "$before" ]]; then
  err "cannot read deployment/$DEPLOYMENT in namespace $NAMESPACE (is the cluster reachable?)"
  exit 1
fi
log "running now: $before"
k rollout history "deployment/$DEPLOYMENT" >&2 || true

undo_args=()
target="the previous revision"
if [[ -n "$REVISION" ]]; then
  undo_args+=("--to-revision=$REVISION")
  target="revision $REVISION"
fi
log "kubectl rollout undo deployment/$DEPLOYMENT ${undo_args[*]}"
if ! k rollout undo "deployment/$DEPLOYMENT" "${undo_args[@]}"; then
  err "kubectl rollout undo to $target failed (does the revision exist? see the history above)"
  exit 1
fi
if ! rollout_wait; then
  err "the rollback to $target did not complete within $ROLLOUT_TIMEOUT: 'kubectl -n $NAMESPACE get pods' and 'kubectl -n $NAMESPACE describe deployment/$DEPLOYMENT'"
  exit 1
fi

after="$(current_app_image)"
record_change_cause "rollback to $target ($after) by $(who) at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
tag="$(image_tag "$after")"
ops_now="$(current_cronjob_image "$GATE_CRONJOB")"
if [[ -n "$tag" && -n "$ops_now" ]]; then
  set_ops_images "$(image_repository "$ops_now"):$tag"
  log "ops CronJobs now run $(image_repository "$ops_now"):$tag"
fi
log "rolled back: $DEPLOYMENT runs $after"

if [[ "${SKIP_GATE:-0}" == 1 ]]; then
  log "health check skipped (SKIP_GATE=1)"
  exit 0
fi
if ! run_gate "after the rollback"; then
  err "rolled back to $target, but the health check fails: the fault is probably not in the release (database, Redis, volume?): see docs/runbooks/"
  exit 1
fi
log "rollback complete, health check passed"
