#!/usr/bin/env bats
# tests/lib/checks.sh, the pass/fail counting of every shell suite: each helper counts a failure
# when it must, and check_summary fails the suite on any.

setup() {
  REPO_ROOT="$(cd "$BATS_TEST_DIRNAME/../.." && pwd)"
  # shellcheck source=tests/lib/checks.sh
  source "$REPO_ROOT/tests/lib/checks.sh"
}

@test "check: the command's status decides; the summary counts both" {
  check "a true thing" true
  check "a false thing" false
  [ "$CHECKS_PASSED" -eq 1 ] && [ "$CHECKS_FAILED" -eq 1 ]
  run check_summary demo
  [ "$status" -eq 1 ]
  [[ "$output" == *"demo: failed: a false thing"* ]]
  [[ "$output" == *"demo: 1 passed, 1 failed"* ]]
}

@test "check_quiet: output only on failure" {
  run check_quiet "quiet pass" sh -c 'echo detail; exit 0'
  [ "$output" = "PASS quiet pass: detail" ]
  check_quiet "loud failure" sh -c 'echo why it failed; exit 1' >"$BATS_TEST_TMPDIR/out"
  [ "$CHECKS_FAILED" -eq 1 ]
  grep -q '^    | why it failed$' "$BATS_TEST_TMPDIR/out"
}

@test "check_fails: a command that passes is a failure" {
  check_fails "must be refused" "denied" true >/dev/null
  [ "$CHECKS_FAILED" -eq 1 ] && [ "$CHECKS_PASSED" -eq 0 ]
}

@test "check_fails: a failure for another reason is a failure" {
  check_fails "must be refused" "permission denied" sh -c 'echo "connection refused"; exit 1' >/dev/null
  [ "$CHECKS_FAILED" -eq 1 ]
}

@test "check_fails: the expected failure passes, with its proof" {
  run check_fails "must be refused" "permission denied" sh -c 'echo "ERROR: permission denied for table t"; exit 1'
  [ "$output" = "PASS must be refused fails as it must: ERROR: permission denied for table t" ]
  run check_fails "any failure" "" sh -c 'echo tool noise; echo "FAIL the verdict"; exit 1'
  [[ "$output" == *"PASS any failure fails as it must:"* ]]
  [[ "$output" == *"    | FAIL the verdict"* ]]
}

@test "check_summary: passes when nothing failed" {
  check_pass "fine"
  run check_summary demo
  [ "$status" -eq 0 ]
  [ "${lines[-1]}" = "demo: 1 passed, 0 failed" ]
}
