#!/usr/bin/env bash
# scripts/deploy.sh, scripts/rollback.sh and scripts/render-prometheusrule.sh against a stub
# kubectl that records every call (tests/deploy/stub/kubectl): happy path, automatic rollback
# on a failed rollout and on a failed gate, argument checks. No cluster needed.
set -euo pipefail
cd "$REPO_ROOT"

command -v bats >/dev/null || { echo "45-deploy-scripts: bats is not installed (scripts/lib/ensure-deps.sh installs it)" >&2; exit 1; }
command -v shellcheck >/dev/null || { echo "45-deploy-scripts: shellcheck is not installed" >&2; exit 1; }

# the scripts under test and their test doubles are shellcheck-clean (bats files included)
shellcheck -x scripts/deploy.sh scripts/rollback.sh scripts/minikube-up.sh scripts/render-prometheusrule.sh \
  scripts/lib/k8s-common.sh tests/deploy/stub/kubectl tests/suites/40-kubernetes.sh tests/suites/45-deploy-scripts.sh
shellcheck tests/deploy/*.bats

bats tests/deploy/*.bats
