#!/usr/bin/env bash
# Pass/fail counting of every shell suite (tests/suites/*.sh, tests/e2e/lib.sh). Sourced, never
# run. One format: a line "PASS what" or "FAIL what" per check, and at the end
# "SUITE: N passed, M failed" followed by the failed checks.
#
#   check_pass WHAT / check_fail WHAT     count a verdict reached by the caller
#   check WHAT CMD...                     CMD's output shown; its exit status decides
#   check_quiet WHAT CMD...               CMD's last line on the verdict's; its output (last 40
#                                         lines) shown only when it fails
#   check_fails WHAT EXPECTED CMD...      CMD must fail, and say EXPECTED (empty: any failure);
#                                         the line that says it is shown as proof
#   check_summary SUITE                   the summary; fails when a check failed

CHECKS_PASSED=0
CHECKS_FAILED=0
CHECKS_FAILURES=()

check_pass() { CHECKS_PASSED=$((CHECKS_PASSED + 1)); printf 'PASS %s\n' "$*"; }
check_fail() { CHECKS_FAILED=$((CHECKS_FAILED + 1)); CHECKS_FAILURES+=("$*"); printf 'FAIL %s\n' "$*"; }

check() {
  local what="$1"
  shift
  if "$@"; then check_pass "$what"; else check_fail "$what"; fi
}

check_quiet() {
  local what="$1" out
  shift
  if out="$("$@" 2>&1)"; then
    check_pass "$what${out:+: $(tail -1 <<<"$out" | cut -c1-150)}"
  else
    check_fail "$what${out:+: $(tail -3 <<<"$out" | tr '\n' ' ' | cut -c1-150)}"
    printf '%s\n' "$out" | tail -40 | sed 's/^/    | /'
  fi
}

check_fails() {
  local what="$1" expected="$2" out proof
  shift 2
  if out="$("$@" 2>&1)"; then
    check_fail "$what: passed, but must fail"
    printf '%s\n' "$out" | tail -20 | sed 's/^/    | /'
  elif [[ -z "$expected" ]]; then
    check_pass "$what fails as it must:"
    # the helpers' verdict starts at "FAIL"; the tools' messages come first
    if grep -q '^FAIL ' <<<"$out"; then out="$(sed -n '/^FAIL /,$p' <<<"$out")"; fi
    printf '%s\n' "$out" | grep -v '^\s*$' | sed 's/^/    | /' | head -n 12
  elif grep -qF -- "$expected" <<<"$out"; then
    proof="$(grep -F -m1 -- "$expected" <<<"$out" | sed 's/^ *//' | cut -c1-140)"
    check_pass "$what fails as it must: $proof"
  else
    check_fail "$what: failed, but without \"$expected\""
    printf '%s\n' "$out" | tail -5 | sed 's/^/    | /'
  fi
}

check_summary() {
  local suite="$1"
  if ((CHECKS_FAILED)); then printf '%s: failed: %s\n' "$suite" "${CHECKS_FAILURES[@]}"; fi
  echo "$suite: $CHECKS_PASSED passed, $CHECKS_FAILED failed"
  ((CHECKS_FAILED == 0))
}
