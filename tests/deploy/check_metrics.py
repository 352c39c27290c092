#!/usr/bin/env python3
"""Every metric that an alert/recording rule or a Grafana panel reads must have a producer in the
Kubernetes deployment: the service (its list in docs/CONTRACT.md), a recording rule, Prometheus
itself, or one of the exporters/scrape jobs deployed by deploy/kubernetes. The accepted sources
are listed below, explicitly; nothing else is accepted (no node-exporter is deployed, so node_*
is not accepted, for instance).

kube-state-metrics exposes only the resources of its --resources flag, and lists only what its
ClusterRole lets it: every kube_<resource>_* metric read must belong to a resource that is both.

Usage: check_metrics.py [--repo-root DIR] [--monitoring-dir DIR] [--ksm-deployment FILE] [--ksm-rbac FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

sys.dont_write_bytecode = True  # no __pycache__ inside the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))
import k8slib  # noqa: E402

# (source, exact names, prefixes): who produces what, in the deployed system
EXPORTER_SOURCES = [
    ("Prometheus (synthetic series)", {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds",
                                       "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
                                       "scrape_series_added"}, ()),
    ("Prometheus self-scrape (job prometheus)", set(), ("prometheus_",)),
    ("Alertmanager (job alertmanager)", set(), ("alertmanager_",)),
    ("postgres-exporter (job postgres-exporter)", set(), ("pg_",)),
    ("redis-exporter (job redis-exporter)", set(), ("redis_",)),
    ("kube-state-metrics (job kube-state-metrics)", set(), ("kube_",)),
    ("cAdvisor via the API server proxy (job kubernetes-cadvisor)", set(), ("container_", "machine_")),
    ("kubelet via the API server proxy (job kubernetes-kubelet)", set(), ("kubelet_",)),
]
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# kube-state-metrics v2: metric family prefix -> the resource (--resources name, API group)
KSM_FAMILIES = {
    "kube_pod_": ("pods", ""), "kube_node_": ("nodes", ""), "kube_namespace_": ("namespaces", ""),
    "kube_service_": ("services", ""), "kube_persistentvolumeclaim_": ("persistentvolumeclaims", ""),
    "kube_persistentvolume_": ("persistentvolumes", ""),
    "kube_deployment_": ("deployments", "apps"), "kube_replicaset_": ("replicasets", "apps"),
    "kube_statefulset_": ("statefulsets", "apps"), "kube_daemonset_": ("daemonsets", "apps"),
    "kube_job_": ("jobs", "batch"), "kube_cronjob_": ("cronjobs", "batch"),
    "kube_horizontalpodautoscaler_": ("horizontalpodautoscalers", "autoscaling"),
    "kube_poddisruptionbudget_": ("poddisruptionbudgets", "policy"),
}

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
            "bool", "inf", "nan", "Inf", "NaN", "atan2", "start", "end"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a tokenizer, not a parser: strings, label
    matchers, ranges and grouping clauses are removed, then every identifier that is not a
    function call or a keyword is a metric name)."""
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "1", expr)  # Grafana variables
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', s)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name in KEYWORDS:
            continue
        names.add(name)
    return names


def grafana_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a dashboard."""
    out: list[tuple[str, str]] = []

    def panels(items):
        for p in items or []:
            yield p
            yield from panels(p.get("panels"))

    for p in panels(dashboard.get("panels")):
        for t in p.get("targets") or []:
            if t.get("expr"):
                out.append((f"panel {p.get('title')!r}", t["expr"]))
    for v in (dashboard.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*[\w.]+\s*\)\s*", q)
        if m:
            q = m.group(1)
        elif re.fullmatch(r"\s*label_values\(\s*[\w.]+\s*\)\s*", q):
            continue
        m = re.fullmatch(r"\s*query_result\((.*)\)\s*", q)
        if m:
            q = m.group(1)
        if q.strip():
            out.append((f"variable {v.get('name')!r}", q))
    return out


def check_kube_state_metrics(r: k8slib.Report, read: set[str], deployment: Path, rbac: Path) -> None:
    """Every kube_* metric read comes from a resource kube-state-metrics is told to expose and may
    list and watch; every resource it is told to expose, it may list and watch."""
    flags = [a for d in yaml.safe_load_all(deployment.read_text(encoding="utf-8")) if d and d.get("kind") == "Deployment"
             for c in d["spec"]["template"]["spec"]["containers"] for a in c.get("args") or []]
    exposed = {x for a in flags if a.startswith("--resources=") for x in a.split("=", 1)[1].split(",") if x}
    r.check(bool(exposed), f"{deployment}: no --resources flag found")
    granted: set[tuple[str, str]] = set()
    for d in yaml.safe_load_all(rbac.read_text(encoding="utf-8")):
        if d and d.get("kind") == "ClusterRole":
            for rule in d.get("rules") or []:
                if {"list", "watch"} <= set(rule.get("verbs") or []):
                    granted |= {(res, g) for res in rule.get("resources") or [] for g in rule.get("apiGroups") or []}
    families = {res: group for res, group in KSM_FAMILIES.values()}
    for res in sorted(exposed):
        r.check((res, families.get(res, "?")) in granted,
                f"kube-state-metrics exposes {res} (--resources) but its ClusterRole does not let it list and watch them")
    for name in sorted(n for n in read if n.startswith("kube_")):
        family = next((f for f in KSM_FAMILIES if name.startswith(f)), None)
        if not r.check(family is not None, f"{name}: not a kube-state-metrics family this check knows (KSM_FAMILIES)"):
            continue
        res, group = KSM_FAMILIES[family]
        r.check(res in exposed, f"{name} is read, but kube-state-metrics does not expose {res} (--resources in {deployment.name})")
        r.check((res, group) in granted, f"{name} is read, but kube-state-metrics may not list and watch {res} ({rbac.name})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo-root", default=str(Path(__file__).resolve().parents[2]))
    ap.add_argument("--monitoring-dir")
    ap.add_argument("--ksm-deployment", help="default: REPO/deploy/kubernetes/base/kube-state-metrics/deployment.yaml")
    ap.add_argument("--ksm-rbac", help="default: REPO/deploy/kubernetes/base/kube-state-metrics/rbac.yaml")
    args = ap.parse_args()
    repo = Path(args.repo_root)
    ksm = repo / "deploy/kubernetes/base/kube-state-metrics"
    monitoring = Path(args.monitoring_dir) if args.monitoring_dir else repo / "deploy/kubernetes/base/monitoring"
    r = k8slib.Report("metrics")

    service = k8slib.contract_metrics(repo)
    r.check(len(service) >= 10, f"docs/CONTRACT.md lists only {sorted(service)} as the service's metrics")
    service |= {n + s for n in service for s in HISTOGRAM_SUFFIXES}

    exprs: list[tuple[str, str]] = []
    recorded: set[str] = set()
    rule_files = sorted(monitoring.glob("prometheus/rules/*.yml")) + sorted(monitoring.glob("prometheus/rules/*.yaml"))
    r.check(bool(rule_files), f"no rules file in {monitoring}/prometheus/rules")
    for f in rule_files:
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for g in doc.get("groups") or []:
            for rule in g.get("rules") or []:
                if "record" in rule:
                    recorded.add(rule["record"])
                where = f"{f.name}: {'alert ' + rule['alert'] if 'alert' in rule else 'record ' + rule.get('record', '?')}"
                exprs.append((where, str(rule.get("expr", ""))))
    dashboards = sorted(monitoring.glob("grafana/dashboards/*.json"))
    r.check(bool(dashboards), f"no dashboard in {monitoring}/grafana/dashboards")
    for f in dashboards:
        try:
            dash = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            r.check(False, f"{f.name} is not JSON: {e}")
            continue
        queries = grafana_queries(dash)
        r.check(bool(queries), f"{f.name} has no Prometheus query")
        exprs += [(f"{f.name}: {where}", q) for where, q in queries]

    by_source: dict[str, set[str]] = {}
    for where, expr in exprs:
        for name in sorted(metric_names(expr)):
            if name in service:
                source = "endpoint-stats (docs/CONTRACT.md)"
            elif name in recorded:
                source = "recording rule"
            else:
                source = next((s for s, exact, prefixes in EXPORTER_SOURCES if name in exact or name.startswith(prefixes)), None)
            r.check(source is not None, f"{where} reads {name!r}, which no deployed component produces "
                                        f"(service metrics: docs/CONTRACT.md; exporters: {', '.join(s for s, _, _ in EXPORTER_SOURCES)})")
            if source:
                by_source.setdefault(source, set()).add(name)
    check_kube_state_metrics(r, set().union(*by_source.values()) if by_source else set(),
                             Path(args.ksm_deployment or ksm / "deployment.yaml"), Path(args.ksm_rbac or ksm / "rbac.yaml"))
    for source, names in sorted(by_source.items()):
        print(f"metrics: {source}: {', '.join(sorted(names))}")
    print(f"metrics: {len(exprs)} expressions read")
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
