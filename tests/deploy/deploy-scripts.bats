#!/usr/bin/env bats
# scripts/deploy.sh and scripts/rollback.sh against a stub kubectl (tests/deploy/stub/kubectl)
# that records every call: which kubectl commands run, in which order, and what happens when the
# rollout or the post-deploy gate fails.

setup() {
  REPO_ROOT="$(cd "$BATS_TEST_DIRNAME/../.." && pwd)"
  export KUBECTL="$REPO_ROOT/tests/deploy/stub/kubectl"
  export STUB_KUBECTL_LOG="$BATS_TEST_TMPDIR/kubectl.log"
  export STUB_STATE_DIR="$BATS_TEST_TMPDIR"
  export GATE_POLL_INTERVAL=0 GATE_TIMEOUT=5 ROLLOUT_TIMEOUT=7s
  unset NAMESPACE IMAGE OPS_IMAGE CHANGE_CAUSE STUB_FAIL_ROLLOUT STUB_FAIL_GATE STUB_GATE_PENDING \
    STUB_NO_CLUSTER STUB_FAIL_UNDO STUB_APP_IMAGE STUB_OPS_IMAGE STUB_PREVIOUS_APP_IMAGE SKIP_GATE
  : >"$STUB_KUBECTL_LOG"
  DEPLOY="$REPO_ROOT/scripts/deploy.sh"
  ROLLBACK="$REPO_ROOT/scripts/rollback.sh"
}

calls() { cat "$STUB_KUBECTL_LOG"; }
called() { grep -qF -- "$1" "$STUB_KUBECTL_LOG"; }
not_called() { ! grep -qF -- "$1" "$STUB_KUBECTL_LOG"; }
# line number of the first call containing $1 (0 when absent)
line_of() { grep -nF -- "$1" "$STUB_KUBECTL_LOG" | head -1 | cut -d: -f1 || true; }

# ---------------------------------------------------------------- deploy.sh: arguments

@test "deploy.sh without TAG prints usage, exits 2 and calls no kubectl" {
  run "$DEPLOY"
  [ "$status" -eq 2 ]
  [[ "$output" == *"Usage:"* ]]
  [ ! -s "$STUB_KUBECTL_LOG" ]
}

@test "deploy.sh refuses tags that are neither versions nor commit ids" {
  for tag in latest 1.2 "1.2.3 " "v1..3" main "1.2.3;rm" ABCDEF1 "$(printf 'a%.0s' {1..41})"; do
    run "$DEPLOY" "$tag"
    [ "$status" -eq 2 ] || { echo "accepted: '$tag'"; return 1; }
    [[ "$output" == *"Usage:"* ]]
  done
  [ ! -s "$STUB_KUBECTL_LOG" ]
}

@test "deploy.sh refuses more than one argument" {
  run "$DEPLOY" 1.2.3 1.2.4
  [ "$status" -eq 2 ]
  [[ "$output" == *"Usage:"* ]]
  [ ! -s "$STUB_KUBECTL_LOG" ]
}

@test "deploy.sh --help prints usage and exits 0" {
  run "$DEPLOY" --help
  [ "$status" -eq 0 ]
  [[ "$output" == *"Usage:"* ]]
}

# ---------------------------------------------------------------- deploy.sh: happy path

@test "deploy.sh: set image, change-cause, rollout status, gate, in this order; no rollback" {
  run "$DEPLOY" 1.2.3
  echo "$output"; calls
  [ "$status" -eq 0 ]
  called "--namespace endpoint-stats set image deployment/endpoint-stats endpoint-stats=registry.example/endpoint-stats:1.2.3 migrate=registry.example/endpoint-stats:1.2.3"
  called "annotate deployment/endpoint-stats kubernetes.io/change-cause=deploy 1.2.3 by"
  called "rollout status deployment/endpoint-stats --timeout=7s"
  called "create job endpoint-stats-gate-"
  called "--from=cronjob/endpoint-stats-deploy-gate"
  for cj in backup verify-backup maintenance health-check deploy-gate; do
    called "set image cronjob/endpoint-stats-$cj $cj=registry.example/endpoint-stats-ops:1.2.3"
  done
  not_called "rollout undo"
  set_image=$(line_of "set image deployment/endpoint-stats")
  annotate=$(line_of "annotate deployment/endpoint-stats")
  status_line=$(line_of "rollout status")
  gate=$(line_of "create job")
  [ "$set_image" -lt "$annotate" ]
  [ "$annotate" -lt "$status_line" ]
  [ "$status_line" -lt "$gate" ]
  [[ "$output" == *"deployed registry.example/endpoint-stats:1.2.3"* ]]
}

@test "deploy.sh accepts a commit id, v-prefixed and pre-release versions" {
  for tag in 3f2c1ab v2.0.0 1.5.0-rc.1 0123456789abcdef0123456789abcdef01234567; do
    rm -f "$STUB_STATE_DIR/app-image"
    run "$DEPLOY" "$tag"
    [ "$status" -eq 0 ] || { echo "$output"; return 1; }
    called "endpoint-stats=registry.example/endpoint-stats:$tag"
  done
}

@test "deploy.sh honours NAMESPACE, IMAGE, OPS_IMAGE and CHANGE_CAUSE" {
  NAMESPACE=staging IMAGE=ghcr.io/acme/es OPS_IMAGE=ghcr.io/acme/es-ops CHANGE_CAUSE="ticket 42" run "$DEPLOY" 2.0.0
  echo "$output"; calls
  [ "$status" -eq 0 ]
  called "--namespace staging set image deployment/endpoint-stats endpoint-stats=ghcr.io/acme/es:2.0.0 migrate=ghcr.io/acme/es:2.0.0"
  called "set image cronjob/endpoint-stats-backup backup=ghcr.io/acme/es-ops:2.0.0"
  called "kubernetes.io/change-cause=ticket 42"
  not_called "--namespace endpoint-stats"
}

@test "deploy.sh keeps a registry port when deriving the repository" {
  STUB_APP_IMAGE=registry.local:5000/team/endpoint-stats:1.0.0 run "$DEPLOY" 1.0.1
  [ "$status" -eq 0 ]
  called "endpoint-stats=registry.local:5000/team/endpoint-stats:1.0.1"
}

@test "deploy.sh of the tag already running skips the rollout and only runs the gate" {
  run "$DEPLOY" 1.0.0
  echo "$output"; calls
  [ "$status" -eq 0 ]
  not_called "set image deployment/"
  not_called "rollout undo"
  called "create job endpoint-stats-gate-"
}

# ---------------------------------------------------------------- deploy.sh: failures

@test "deploy.sh rolls back automatically when the rollout does not complete" {
  STUB_FAIL_ROLLOUT=1 run "$DEPLOY" 1.2.3
  echo "$output"; calls
  [ "$status" -ne 0 ]
  called "rollout undo deployment/endpoint-stats"
  not_called "create job"
  [ "$(line_of "set image deployment/")" -lt "$(line_of "rollout undo")" ]
  [[ "$output" == *"rolling back to registry.example/endpoint-stats:1.0.0"* ]]
  [[ "$output" == *"FAILED"* ]]
  called "kubernetes.io/change-cause=automatic rollback from 1.2.3"
}

@test "deploy.sh rolls back automatically when the gate fails, and restores the ops images" {
  STUB_FAIL_GATE=1 run "$DEPLOY" 1.2.3
  echo "$output"; calls
  [ "$status" -ne 0 ]
  called "create job endpoint-stats-gate-"
  called "rollout undo deployment/endpoint-stats"
  [ "$(line_of "create job")" -lt "$(line_of "rollout undo")" ]
  # the CronJobs go back to the image they ran before (last set image wins)
  last=$(grep -F "set image cronjob/endpoint-stats-backup" "$STUB_KUBECTL_LOG" | tail -1)
  [[ "$last" == *"backup=registry.example/endpoint-stats-ops:1.0.0" ]]
  [[ "$output" == *"health check after deploying 1.2.3 failed"* ]]
  [[ "$output" == *"stub: endpoint-stats check output"* ]]
}

@test "deploy.sh rolls back when the gate gives no result in time" {
  STUB_GATE_PENDING=1 GATE_TIMEOUT=0 run "$DEPLOY" 1.2.3
  echo "$output"; calls
  [ "$status" -ne 0 ]
  called "rollout undo deployment/endpoint-stats"
  [[ "$output" == *"no result after 0s"* ]]
}

@test "deploy.sh says so when even the rollback fails" {
  STUB_FAIL_ROLLOUT=1 STUB_FAIL_UNDO=1 run "$DEPLOY" 1.2.3
  [ "$status" -ne 0 ]
  [[ "$output" == *"the rollback did not complete either"* ]]
}

@test "deploy.sh stops before changing anything when the cluster is unreachable" {
  STUB_NO_CLUSTER=1 run "$DEPLOY" 1.2.3
  [ "$status" -eq 1 ]
  [[ "$output" == *"cannot read deployment/endpoint-stats"* ]]
  not_called "set image"
}

# ---------------------------------------------------------------- rollback.sh

@test "rollback.sh without REVISION undoes to the previous revision and checks" {
  STUB_APP_IMAGE=registry.example/endpoint-stats:1.1.0 STUB_PREVIOUS_APP_IMAGE=registry.example/endpoint-stats:1.0.0 \
    run "$ROLLBACK"
  echo "$output"; calls
  [ "$status" -eq 0 ]
  called "--namespace endpoint-stats rollout undo deployment/endpoint-stats"
  not_called "--to-revision"
  called "rollout status deployment/endpoint-stats --timeout=7s"
  called "kubernetes.io/change-cause=rollback to the previous revision (registry.example/endpoint-stats:1.0.0)"
  called "set image cronjob/endpoint-stats-health-check health-check=registry.example/endpoint-stats-ops:1.0.0"
  called "create job endpoint-stats-gate-"
  [ "$(line_of "rollout undo")" -lt "$(line_of "rollout status")" ]
}

@test "rollback.sh REVISION undoes to that revision" {
  run "$ROLLBACK" 3
  echo "$output"; calls
  [ "$status" -eq 0 ]
  called "rollout undo deployment/endpoint-stats --to-revision=3"
  called "rollout history deployment/endpoint-stats"
}

@test "rollback.sh refuses a REVISION that is not a positive integer" {
  for rev in 0 -1 abc 1.5 " 2" 07; do
    run "$ROLLBACK" "$rev"
    [ "$status" -eq 2 ] || { echo "accepted: '$rev'"; return 1; }
    [[ "$output" == *"Usage:"* ]]
  done
  run "$ROLLBACK" 2 3
  [ "$status" -eq 2 ]
  [ ! -s "$STUB_KUBECTL_LOG" ]
}

@test "rollback.sh fails clearly when the revision does not exist" {
  STUB_FAIL_UNDO=1 run "$ROLLBACK" 99
  [ "$status" -eq 1 ]
  [[ "$output" == *"rollout undo to revision 99 failed"* ]]
  not_called "rollout status"
}

@test "rollback.sh exits non-zero when the rolled-back version fails the check" {
  STUB_FAIL_GATE=1 run "$ROLLBACK"
  [ "$status" -eq 1 ]
  [[ "$output" == *"the health check fails"* ]]
}

@test "rollback.sh SKIP_GATE=1 skips the check" {
  SKIP_GATE=1 run "$ROLLBACK"
  [ "$status" -eq 0 ]
  not_called "create job"
}

@test "render-prometheusrule.sh wraps the rules file and refuses bad labels" {
  run "$REPO_ROOT/scripts/render-prometheusrule.sh" --label release=kube-prometheus-stack
  [ "$status" -eq 0 ]
  [[ "$output" == *"kind: PrometheusRule"* ]]
  [[ "$output" == *'release: "kube-prometheus-stack"'* ]]
  run "$REPO_ROOT/scripts/render-prometheusrule.sh" --label 'bad key=x'
  [ "$status" -eq 2 ]
  printf 'groups: []\n---\ngroups: []\n' >"$BATS_TEST_TMPDIR/two.yml"
  run "$REPO_ROOT/scripts/render-prometheusrule.sh" "$BATS_TEST_TMPDIR/two.yml"
  [ "$status" -eq 2 ]
  printf 'groups: []\nextra: 1\n' >"$BATS_TEST_TMPDIR/extra.yml"
  run "$REPO_ROOT/scripts/render-prometheusrule.sh" "$BATS_TEST_TMPDIR/extra.yml"
  [ "$status" -eq 2 ]
}
