#!/usr/bin/env bash
# The test helpers themselves: process supervision, shell (scripts/lib/stack-lib.sh) and Python
# (scripts/lib/supervise.py), and the suites' pass/fail counting (tests/lib/checks.sh).
set -euo pipefail
cd "$REPO_ROOT"
command -v bats >/dev/null || { echo "15-supervision: bats is not installed (scripts/lib/ensure-deps.sh installs it)" >&2; exit 1; }
export PYTHONDONTWRITEBYTECODE=1
shellcheck -x tests/lib/*.bats # the lint suite checks *.sh
python3 tests/lib/test_supervise.py
bats tests/lib/stack-lib.bats tests/lib/checks.bats
