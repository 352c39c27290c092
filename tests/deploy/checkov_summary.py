#!/usr/bin/env python3
"""Verdict on a checkov JSON report, for tests/suites/40-kubernetes.sh.

Usage: checkov_summary.py NAME REPORT.json
Prints every failed check, every skip with its reason, and a summary line per report; exits 1 on
any failed check or on a skip whose reason (checkov.io/skip annotation or checkov:skip comment)
is shorter than 20 characters.
"""

import json
import sys

sys.dont_write_bytecode = True


def main() -> int:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    name, path = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    reports = data if isinstance(data, list) else [data]
    bad = 0
    for rep in reports:
        res = rep.get("results", {})
        for f in res.get("failed_checks", []):
            bad += 1
            print(f"failed {f['check_id']} {f['check_name']} on {f['resource']}")
        for s in res.get("skipped_checks", []):
            reason = (s.get("check_result") or {}).get("suppress_comment") or ""
            if len(reason.strip()) < 20:
                bad += 1
                print(f"skip without a reason: {s['check_id']} on {s['resource']}")
            else:
                print(f"skipped {s['check_id']} on {s['resource']}: {reason}")
        summ = rep.get("summary", {})
        print(f"{name}: {summ.get('passed')} passed, {summ.get('failed')} failed, {summ.get('skipped')} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
