#!/usr/bin/env python3
"""scripts/render-prometheusrule.sh: its PrometheusRule carries exactly the rules file (spec ==
the file's content, parsed), in the namespace of the deployment, with the labels asked for.

Usage: check_prometheusrule.py [--repo-root DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

sys.dont_write_bytecode = True  # no __pycache__ inside the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))
from k8slib import Report  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo-root", default=str(Path(__file__).resolve().parents[2]))
    args = ap.parse_args()
    repo = Path(args.repo_root)
    script = repo / "scripts/render-prometheusrule.sh"
    rules_dir = repo / "deploy/kubernetes/base/monitoring/prometheus/rules"
    r = Report("prometheusrule")

    out = subprocess.run(["bash", str(script), "--label", "release=kube-prometheus-stack"], capture_output=True, text=True)
    if not r.check(out.returncode == 0, f"render-prometheusrule.sh failed: {out.stderr.strip()}"):
        return r.finish()
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    r.check(len(docs) == 1, f"expected one document, got {len(docs)}")
    rule = docs[0]
    source = yaml.safe_load((rules_dir / "endpoint-stats.rules.yml").read_text(encoding="utf-8"))
    r.check(rule.get("apiVersion") == "monitoring.coreos.com/v1" and rule.get("kind") == "PrometheusRule", "not a PrometheusRule")
    meta = rule.get("metadata") or {}
    r.check(meta.get("namespace") == "endpoint-stats", f"namespace {meta.get('namespace')!r}")
    r.check((meta.get("labels") or {}).get("release") == "kube-prometheus-stack", "the --label is missing")
    r.check(rule.get("spec") == source, "spec differs from the rules file")
    n_rules = sum(len(g.get("rules") or []) for g in (rule.get("spec") or {}).get("groups") or [])
    r.check(n_rules > 0, "no rule in the PrometheusRule")
    print(f"prometheusrule: {len((rule.get('spec') or {}).get('groups') or [])} groups, {n_rules} rules wrapped")

    # every rules file of the folder can be wrapped (a second file would need its own object)
    for f in sorted(rules_dir.glob("*.y*ml")):
        out = subprocess.run(["bash", str(script), "--name", f.stem.replace(".", "-"), str(f)], capture_output=True, text=True)
        ok = out.returncode == 0 and (yaml.safe_load(out.stdout) or {}).get("spec") == yaml.safe_load(f.read_text(encoding="utf-8"))
        r.check(ok, f"{f.name} does not wrap faithfully: {out.stderr.strip()}")
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
