#!/usr/bin/env python3
"""Writes a broken copy of a rendered kustomization, for the Kubernetes suite's negative controls
(tests/suites/40-kubernetes.sh): each breakage is one the cross-checks must catch.

Usage: break_render.py RENDERED.yaml OUT.yaml BREAKAGE
  superuser-database-url  the service's DATABASE_URL (Secret endpoint-stats-db) connects as the
                          administrator of Secret endpoint-stats-db-admin
  redis-without-password  Redis runs without --requirepass, with --protected-mode no (as before)
  unused-grant            Prometheus' ClusterRole also grants get nodes/metrics (no job scrapes
                          the kubelets directly)
  cluster-wide-pods       Prometheus' ClusterRole also lists and watches pods in every namespace
  public-egress           Prometheus' egress to the API server is 0.0.0.0/0 again
  no-health-check-affinity  the health-check CronJob's pod loses the affinity that keeps it on the
                          node of the ReadWriteOnce backup volume
"""

from __future__ import annotations

import base64
import sys

import yaml

sys.dont_write_bytecode = True


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def secret_get(secret: dict, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def main() -> int:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    source, out, breakage = sys.argv[1:]
    docs = [d for d in yaml.safe_load_all(open(source, encoding="utf-8")) if d]
    if breakage == "superuser-database-url":
        admin = find(docs, "Secret", "endpoint-stats-db-admin")
        db = find(docs, "Secret", "endpoint-stats-db")
        user, password = secret_get(admin, "POSTGRES_USER"), secret_get(admin, "POSTGRES_PASSWORD")
        app_url = secret_get(db, "DATABASE_URL")
        url = f"postgres://{user}:{password}@{app_url.split('@', 1)[1]}"
        db["data"]["DATABASE_URL"] = base64.b64encode(url.encode()).decode()
    elif breakage == "redis-without-password":
        c = find(docs, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
        i = c["args"].index("--requirepass")
        c["args"][i:i + 2] = ["--protected-mode", "no"]
    elif breakage == "unused-grant":
        find(docs, "ClusterRole", "endpoint-stats-prometheus")["rules"].append(
            {"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]})
    elif breakage == "cluster-wide-pods":
        find(docs, "ClusterRole", "endpoint-stats-prometheus")["rules"].append(
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]})
    elif breakage == "public-egress":
        policy = find(docs, "NetworkPolicy", "prometheus")
        rule = next(r for r in policy["spec"]["egress"] if any("ipBlock" in p for p in r.get("to") or []))
        rule["to"] = [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    elif breakage == "no-health-check-affinity":
        job = find(docs, "CronJob", "endpoint-stats-health-check")
        del job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["affinity"]
    else:
        sys.exit(f"unknown breakage {breakage!r}\n{__doc__}")
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(docs, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
