#!/usr/bin/env bash
# Formatting, clippy with warnings as errors, shellcheck on every shell script, and the module
# graph: acyclic, with a negative control (an added cycle must fail the check).
# test.sh: needs=cargo
set -euo pipefail
cd "$REPO_ROOT"
cargo fmt --check
# The ci profile, as the build: clippy then reuses the build's proc-macros and build scripts
# (and lints the same code: nothing in src/ depends on debug_assertions).
cargo clippy --profile ci --locked --all-targets -- -D warnings
mapfile -t scripts < <(git ls-files -co --exclude-standard '*.sh' '*.bats' .ci/run | grep -v '\.bats$')
shellcheck -x "${scripts[@]}"
echo "lint: shellcheck ok on ${#scripts[@]} scripts"

python3 tests/lint/module_graph.py src
# Negative control: configuration reaching up to startup (which reads the configuration) is a cycle.
broken="$(mktemp -d "${TMPDIR:-/tmp}/module-graph.XXXXXX")"
trap 'rm -rf "$broken"' EXIT
cp -r src "$broken/src"
echo 'pub use crate::startup::Application;' >>"$broken/src/config.rs"
if out="$(python3 tests/lint/module_graph.py "$broken/src")"; then
  echo "FAIL: the module graph check passed a tree with a cycle config -> startup -> config"
  exit 1
fi
grep -F "config -> startup: Application" <<<"$out" >/dev/null || { echo "FAIL: the cycle was not named:"; echo "$out"; exit 1; }
echo "lint: an added cycle fails as it must: $(head -1 <<<"$out")"
