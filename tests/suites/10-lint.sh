#!/usr/bin/env bash
# Formatting, clippy with warnings as errors, shellcheck on every shell script.
set -euo pipefail
cd "$REPO_ROOT"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
mapfile -t scripts < <(git ls-files -co --exclude-standard '*.sh' '*.bats' .ci/run | grep -v '\.bats$')
shellcheck -x "${scripts[@]}"
echo "lint: shellcheck ok on ${#scripts[@]} scripts"
