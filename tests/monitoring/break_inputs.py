#!/usr/bin/env python3
"""Broken copies of the monitoring sources, for the negative controls of
tests/suites/30-monitoring.sh (each breakage is one a check must catch). PyYAML.

  break_inputs.py no-quiet-case TESTS.yml ALERT
      removes, in place, every promtool test case where ALERT must stay quiet (the test groups
      named "ALERT stays quiet..." and the alert_rule_test entries of ALERT without exp_alerts)
  break_inputs.py dashboards DASHBOARD.json OUTDIR
      writes OUTDIR/no-target.json (a panel without targets), bad-query.json (a PromQL syntax
      error), old-metric.json (the Flask metric again) and pause-container.json (the memory panel
      counts the pause container into the pod's working set)
"""

import json
import sys

import yaml

sys.dont_write_bytecode = True


def no_quiet_case(path: str, alert: str) -> None:
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    doc["tests"] = [t for t in doc["tests"] if not t["name"].startswith(f"{alert} stays quiet")]
    for t in doc["tests"]:
        t["alert_rule_test"] = [a for a in t.get("alert_rule_test", [])
                                if not (a["alertname"] == alert and not a.get("exp_alerts"))]
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def dump(d: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f)


def dashboards(src: str, out: str) -> None:
    with open(src, encoding="utf-8") as f:
        d = json.load(f)
    panel = next(p for p in d["panels"] if p["type"] != "row")
    saved = panel["targets"]
    panel["targets"] = []
    dump(d, f"{out}/no-target.json")
    panel["targets"] = saved
    panel["targets"][0]["expr"] = "sum(rate(http_requests_total{namespace=~\"$namespace\"}[$__rate_interval])"
    dump(d, f"{out}/bad-query.json")
    panel["targets"][0]["expr"] = "sum by (endpoint) (rate(flask_http_request_total[$__rate_interval]))"
    dump(d, f"{out}/old-metric.json")
    panel["targets"] = saved
    memory = next(p for p in d["panels"] if p.get("title") == "Memory per pod vs requests and limits")
    working_set = next(t for t in memory["targets"] if "container_memory_working_set_bytes" in t["expr"])
    assert ', container!="POD"' in working_set["expr"], working_set["expr"]
    working_set["expr"] = working_set["expr"].replace(', container!="POD"', "")
    dump(d, f"{out}/pause-container.json")


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] not in ("no-quiet-case", "dashboards"):
        sys.exit(__doc__)
    if sys.argv[1] == "no-quiet-case":
        no_quiet_case(sys.argv[2], sys.argv[3])
    else:
        dashboards(sys.argv[2], sys.argv[3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
