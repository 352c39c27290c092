#!/usr/bin/env python3
"""Every metric that an alert/recording rule or a Grafana panel reads must have a producer in the
Kubernetes deployment: the service (its list in docs/CONTRACT.md), a recording rule, Prometheus
itself, or one of the exporters/scrape jobs deployed by deploy/kubernetes. The accepted sources
are listed below, explicitly; nothing else is accepted (no node-exporter is deployed, so node_*
is not accepted, for instance).

Usage: check_metrics.py [--repo-root DIR] [--monitoring-dir DIR]
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo-root", default=str(Path(__file__).resolve().parents[2]))
    ap.add_argument("--monitoring-dir")
    args = ap.parse_args()
    repo = Path(args.repo_root)
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
    for source, names in sorted(by_source.items()):
        print(f"metrics: {source}: {', '.join(sorted(names))}")
    print(f"metrics: {len(exprs)} expressions read")
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
