#!/usr/bin/env python3
"""Checks of the monitoring sources that promtool and amtool cannot do on their own.

Used by tests/suites/30-monitoring.sh; each subcommand prints what it checked and exits non-zero
with a list of problems on failure. Python 3 standard library plus PyYAML.

  rules        alert labels and annotations, runbook links, `for:` lines, test coverage
  alerts       `alertname severity` per alert, for the shell
  runbooks     every runbook_url anchor is a heading in docs/runbooks
  dashboard    dashboard JSON shape; writes its queries as a rule file for `promtool check rules`
  selectors    the API routes (toward the SLO) are selected in one recording rule only
  kubernetes-panels  the queries only a cluster feeds, as promtool tests over fixture series
  grafana-provisioning  the Grafana datasource and dashboard provider files
  metrics      every metric an alert, a recording rule or a panel reads is a known one
  prometheus-local-config   Kubernetes scrape config -> a copy the Debian Prometheus can load
  prometheus-targets        run Prometheus on that copy, compare discovered targets
  alertmanager-live         run Alertmanager with a Slack sink: routing, templates, inhibition
"""

import argparse
import fnmatch
import glob
import http.server
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request

import yaml

# The repository's one supervision module (free ports, waiting, daemons of our own).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "lib"))
from supervise import Daemon, free_port, wait_for  # noqa: E402

MONITORING = "deploy/kubernetes/base/monitoring"
RULES = f"{MONITORING}/prometheus/rules/endpoint-stats.rules.yml"
TESTS_GLOB = f"{MONITORING}/prometheus/tests/*.test.yml"
PROMETHEUS_YML = f"{MONITORING}/prometheus/prometheus.yml"
ALERTMANAGER_YML = f"{MONITORING}/alertmanager/alertmanager.yml"
DASHBOARD = f"{MONITORING}/grafana/dashboards/endpoint-statistics.json"
RUNBOOKS = "docs/runbooks"
RUNBOOK_PREFIX = "https://github.com/endpoint-stats/endpoint-stats/blob/main/docs/runbooks/"
HERE = os.path.dirname(os.path.abspath(__file__))

# SPEC section 7 and the operator extras: removing one of these is a failure, not a refactoring.
REQUIRED_ALERTS = {
    "HighErrorRate": "critical",
    "SlowResponseTime": "warning",
    "HighCPUUsage": "warning",
    "DatabaseConnectionIssues": "critical",
    "RedisConnectionIssues": "critical",
    "PodRestartingFrequently": "warning",
    "EndpointStatsDown": "critical",
    "BackupFailed": "critical",
    "BackupTooOld": "warning",
    "BackupVerificationFailed": "critical",
    "MaintenanceFailed": "warning",
    "Watchdog": "none",
    "HPAAtMaximum": "warning",
    "VolumeNearlyFull": "warning",
    "ErrorBudgetBurnFast": "critical",
    "ErrorBudgetBurnSlow": "warning",
}
# An alert that can never be quiet needs no "must not fire" case.
ALWAYS_FIRING = {"Watchdog"}
SEVERITIES = {"critical", "warning", "none"}

# Values the local test gives the dashboard variables (Grafana's own are just as regex-safe).
DASHBOARD_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
    "$pod": ".*",
}


class Problems:
    def __init__(self, what):
        self.what = what
        self.items = []

    def add(self, msg):
        self.items.append(msg)

    def finish(self, ok_message):
        if self.items:
            print(f"FAIL {self.what}: {len(self.items)} problem(s)")
            for item in self.items:
                print(f"  - {item}")
            sys.exit(1)
        print(f"PASS {self.what}: {ok_message}")


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def rules_of(path):
    doc = load_yaml(path)
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            yield group["name"], rule


# ---------------------------------------------------------------------------------- runbooks

def github_anchor(heading, seen):
    """GitHub's heading anchors: lowercase, drop punctuation, spaces to dashes, -N for repeats."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    return slug if n == 0 else f"{slug}-{n}"


def anchors_of(markdown_path):
    anchors, seen, fenced = set(), {}, False
    with open(markdown_path, encoding="utf-8") as f:
        for line in f:
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
                continue
            m = None if fenced else re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
            if m:
                anchors.add(github_anchor(m.group(1), seen))
    return anchors


def check_runbook_url(url, runbooks_dir, cache):
    """Returns a problem text, or None when url points at an existing heading."""
    if not url.startswith(RUNBOOK_PREFIX):
        return f"does not start with {RUNBOOK_PREFIX}: {url}"
    rest = url[len(RUNBOOK_PREFIX):]
    if "#" not in rest:
        return f"has no #anchor: {url}"
    file, anchor = rest.split("#", 1)
    path = os.path.join(runbooks_dir, file)
    if not os.path.isfile(path):
        return f"points at a missing file {path}: {url}"
    if path not in cache:
        cache[path] = anchors_of(path)
    if anchor not in cache[path]:
        return f"anchor #{anchor} is not a heading of {path} (headings: {', '.join(sorted(cache[path]))})"
    return None


def cmd_runbooks(args):
    p = Problems("runbook links")
    cache, count = {}, 0
    for _, rule in rules_of(args.rules):
        if "alert" not in rule:
            continue
        url = rule.get("annotations", {}).get("runbook_url", "")
        count += 1
        problem = check_runbook_url(url, args.runbooks_dir, cache)
        if problem:
            p.add(f"{rule['alert']}: runbook_url {problem}")
    # Relative links between the documents (runbooks and docs/monitoring.md) resolve as well.
    n_links = 0
    docs = sorted(glob.glob(os.path.join(args.runbooks_dir, "*.md"))) + [args.overview]
    for doc in docs:
        if not os.path.isfile(doc):
            p.add(f"{doc} is missing")
            continue
        with open(doc, encoding="utf-8") as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(doc), file)) if file else doc
            n_links += 1
            if not os.path.exists(path):
                p.add(f"{doc}: link {target} points at a missing file")
            elif anchor:
                if path not in cache:
                    cache[path] = anchors_of(path)
                if anchor not in cache[path]:
                    p.add(f"{doc}: link {target}: no heading #{anchor} in {path}")
    # Each runbook section names what an operator needs.
    for path in sorted(glob.glob(os.path.join(args.runbooks_dir, "*.md"))):
        if os.path.basename(path).lower() == "readme.md":
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read().lower()
        for word in ("meaning", "impact", "diagnosis", "mitigation", "escalation"):
            if f"## {word}" not in text and f"### {word}" not in text:
                p.add(f"{path}: no '{word}' section")
    p.finish(f"{count} runbook_url links resolve to headings in {args.runbooks_dir}; "
             f"{n_links} relative links between the documents resolve; every runbook has "
             f"meaning/impact/diagnosis/mitigation/escalation")


# ------------------------------------------------------------------------------------- rules

def test_cases(tests_glob):
    """(file, group name, kind, alertname, fires) for every case of every promtool test file."""
    for path in sorted(glob.glob(tests_glob)):
        doc = load_yaml(path)
        for t in doc.get("tests", []):
            for a in t.get("alert_rule_test", []) or []:
                yield path, t.get("name", "?"), "alert", a["alertname"], bool(a.get("exp_alerts"))
            for e in t.get("promql_expr_test", []) or []:
                yield path, t.get("name", "?"), "expr", None, None


def cmd_rules(args):
    p = Problems("alert rules")
    alerts = {}
    for group, rule in rules_of(args.rules):
        if "alert" not in rule:
            continue
        name = rule["alert"]
        if name in alerts:
            p.add(f"{name}: defined twice")
        alerts[name] = rule
        labels, ann = rule.get("labels", {}), rule.get("annotations", {})
        sev = labels.get("severity")
        if sev not in SEVERITIES:
            p.add(f"{name}: severity {sev!r} is not one of {sorted(SEVERITIES)}")
        if name in REQUIRED_ALERTS and sev != REQUIRED_ALERTS[name]:
            p.add(f"{name}: severity {sev!r}, expected {REQUIRED_ALERTS[name]!r}")
        for key in ("summary", "description", "runbook_url"):
            if not str(ann.get(key, "")).strip():
                p.add(f"{name}: annotation {key} missing")
        if "{{" in str(ann.get("summary", "")):
            p.add(f"{name}: summary must be fixed text, not a template")
        if "{{" not in str(ann.get("description", "")):
            p.add(f"{name}: description should be templated ($labels / $value)")
        if "for" in rule and not re.fullmatch(r"\d+[smhd]", str(rule["for"])):
            p.add(f"{name}: `for: {rule['for']}` is not a plain duration")
    for name in REQUIRED_ALERTS:
        if name not in alerts:
            p.add(f"required alert {name} is missing")

    # `for:` lines are plain so that the local stack can shorten them with one substitution.
    with open(args.rules, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if re.match(r"^\s*for:", line) and not re.fullmatch(r"\s+for: \d+[smhd]\n?", line):
                p.add(f"{args.rules}:{no}: not a plain `for: <n><unit>` line: {line.strip()}")

    # Every test file tests the committed rules file, by relative path.
    rules_abs = os.path.abspath(args.rules)
    for path in sorted(glob.glob(args.tests)):
        files = load_yaml(path).get("rule_files", [])
        resolved = [os.path.abspath(os.path.join(os.path.dirname(path), f)) for f in files]
        if resolved != [rules_abs] or any(os.path.isabs(f) for f in files):
            p.add(f"{path}: rule_files {files} should be the relative path of {args.rules}")

    fires, quiet, n_alert, n_expr = {}, {}, 0, 0
    for _, _, kind, alertname, fired in test_cases(args.tests):
        if kind == "expr":
            n_expr += 1
            continue
        n_alert += 1
        if alertname not in alerts:
            p.add(f"a test names alert {alertname}, which the rules do not define")
        bucket = fires if fired else quiet
        bucket[alertname] = bucket.get(alertname, 0) + 1
    for name in sorted(alerts):
        if name not in fires:
            p.add(f"{name}: no test case where it fires")
        if name not in quiet and name not in ALWAYS_FIRING:
            p.add(f"{name}: no test case where it must not fire")
    for name in sorted(alerts) if not p.items else []:
        print(f"     {name:34} severity={alerts[name]['labels'].get('severity'):8} "
              f"for={alerts[name].get('for', '-'):4} fires-cases={fires.get(name, 0)} quiet-cases={quiet.get(name, 0)}")
    p.finish(f"{len(alerts)} alerts; {n_alert} alert_rule_test cases and {n_expr} promql_expr_test cases "
             f"in {len(glob.glob(args.tests))} files; every alert has a firing and a quiet case")


# --------------------------------------------------------------------------------- dashboard

def substitute(expr, variables=None):
    """Grafana's variables ("$name" -> value) in both spellings, $name and ${name}; longest names
    first, so that $__interval never eats the start of $__interval_ms."""
    variables = DASHBOARD_VARIABLES if variables is None else variables
    for var in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + var[1:] + "}", variables[var]).replace(var, variables[var])
    return expr


def dashboard_queries(dash):
    """(where, expr) for every panel target and every template variable query."""
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q, re.S)
        yield f"variable {var.get('name')}", (m.group(1) if m else q)

    for panel, t in panel_targets(dash):
        yield f"panel {panel.get('id')} '{panel.get('title')}' target {t.get('refId')}", t.get("expr", "")


def panel_targets(dash):
    """(panel, target) for every target of every panel, rows' panels included."""
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    for panel in walk(dash.get("panels", [])):
        for t in panel.get("targets", []) or []:
            yield panel, t


def cmd_dashboard(args):
    p = Problems(f"dashboard {args.dashboard}")
    try:
        with open(args.dashboard, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        p.add(f"not valid JSON: {e}")
        p.finish("")
    for key, want in (("title", "Endpoint Statistics"), ("uid", "endpoint-statistics"), ("schemaVersion", 41)):
        if dash.get(key) != want:
            p.add(f"{key} is {dash.get(key)!r}, expected {want!r}")
    if dash.get("id") is not None:
        p.add("id must be null in a provisioned dashboard")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    for name in ("namespace", "pod"):
        v = variables.get(name)
        if not v:
            p.add(f"template variable {name} missing")
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        if v.get("type") != "query" or not q.startswith("label_values("):
            p.add(f"template variable {name} is not a label_values query: {q!r}")
        if v.get("datasource", {}).get("uid") != "prometheus":
            p.add(f"template variable {name} does not use datasource uid prometheus")

    ids, panels = set(), []

    def walk(items):
        for panel in items:
            panels.append(panel)
            walk(panel.get("panels", []))

    walk(dash.get("panels", []))
    for panel in panels:
        where = f"panel {panel.get('id')} '{panel.get('title')}'"
        if panel.get("id") in ids:
            p.add(f"{where}: duplicate id")
        ids.add(panel.get("id"))
        g = panel.get("gridPos", {})
        if not all(k in g for k in "hwxy") or g["x"] + g["w"] > 24:
            p.add(f"{where}: bad gridPos {g}")
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "prometheus":
            p.add(f"{where}: datasource is not uid prometheus")
        targets = panel.get("targets") or []
        if not targets:
            p.add(f"{where}: no target")
        for t in targets:
            if not str(t.get("expr", "")).strip():
                p.add(f"{where}: target {t.get('refId')} has no expr")
            if t.get("datasource", {}).get("uid") != "prometheus":
                p.add(f"{where}: target {t.get('refId')} datasource is not uid prometheus")

    # Queries as recording rules: `promtool check rules` parses every one of them as PromQL.
    rules, n = [], 0
    for where, expr in dashboard_queries(dash):
        if re.search(r'[^=!]="\$', expr):
            p.add(f"{where}: selector `=\"$var\"` breaks with multi-value variables; use =~: {expr}")
        left = re.findall(r"\$\{?\w+\}?", substitute(expr))
        if left:
            p.add(f"{where}: unknown variables {left}")
        n += 1
        rules.append({"record": f"dashboard_query_{n}", "expr": substitute(expr)})
    if args.rules_out:
        with open(args.rules_out, "w", encoding="utf-8") as f:
            yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f, sort_keys=False, width=1000)
    non_rows = [x for x in panels if x.get("type") != "row"]
    p.finish(f"valid JSON, title/uid/schemaVersion ok, variables namespace+pod, {len(non_rows)} panels "
             f"each with targets; {n} queries written to {args.rules_out or '(nowhere)'}")


# A label matcher on the route: which routes count as API requests (toward the SLO) is said once.
ROUTE_MATCHER = re.compile(r'\broute\s*(?:!~|=~|!=|=)\s*"')
API_REQUESTS_RULE = "api:http_requests_total"


def cmd_selectors(args):
    p = Problems("API request selector")
    where = [f"rule {rule.get('record') or rule.get('alert')}" for _, rule in rules_of(args.rules)
             if ROUTE_MATCHER.search(rule["expr"])]
    with open(args.dashboard, encoding="utf-8") as f:
        where += [w for w, expr in dashboard_queries(json.load(f)) if ROUTE_MATCHER.search(expr)]
    if where != [f"rule {API_REQUESTS_RULE}"]:
        p.add(f"a route matcher should appear only in the recording rule {API_REQUESTS_RULE}, which the "
              f"other rules and the panels read; found in: {', '.join(where) or 'nothing'}")
    p.finish(f"routes matched only by {API_REQUESTS_RULE}; no other rule or panel query selects routes")


def panel_queries(dash):
    """{"PANEL TITLE/REFID": expr}, the way tests/e2e/e2e.py names a dashboard query."""
    return {f"{panel.get('title')}/{t.get('refId')}": t.get("expr", "") for panel, t in panel_targets(dash)}


def cmd_kubernetes_panels(args):
    fixture = load_yaml(args.fixture)
    if args.list:
        print("\n".join(fixture["panels"]))
        return
    p = Problems(f"Kubernetes-only panels of {args.dashboard}")
    if not args.test_out:
        p.add("--test-out is required (or --list)")
        p.finish("")
    with open(args.dashboard, encoding="utf-8") as f:
        queries = panel_queries(json.load(f))
    cases = []
    for ref, expected in fixture["panels"].items():
        if ref not in queries:
            p.add(f"{ref}: no such panel query in the dashboard")
            continue
        expr = substitute(queries[ref], fixture["variables"])
        left = re.findall(r"\$\{?\w+\}?", expr)
        if left:
            p.add(f"{ref}: variables without a value in {args.fixture}: {left}")
        if not expected:
            p.add(f"{ref}: no expected samples: the point is to prove the panel shows data")
        cases.append({"expr": expr, "eval_time": fixture["eval_time"], "exp_samples": expected})
    # The rules are loaded: panels may read their recording rules (and those read these series).
    test = {
        "rule_files": [os.path.abspath(args.rules)],
        "evaluation_interval": fixture["interval"],
        "tests": [{"interval": fixture["interval"], "input_series": fixture["input_series"], "promql_expr_test": cases}],
    }
    with open(args.test_out, "w", encoding="utf-8") as f:
        yaml.safe_dump(test, f, sort_keys=False, width=1000)
    p.finish(f"{len(cases)} queries taken from the dashboard, written as promtool expression tests to {args.test_out}")


# ----------------------------------------------------------------------------------- metrics

def metric_names(expr):
    """Metric names an expression reads (recording rule names included), without a parser."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\b(group_left|group_right)\b", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)", s):
        name, after = m.group(1), s[m.end():].lstrip()
        if after.startswith("("):
            continue  # a function or an aggregation
        if name.lower() in {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on",
                            "ignoring", "atan2"}:
            continue
        names.add(name)
    return names


def contract_metrics(contract_path):
    """Service metrics from the table of docs/CONTRACT.md: (names, histogram names)."""
    names, histograms, in_metrics = set(), set(), False
    with open(contract_path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                in_metrics = line.strip() == "## Metrics"
            if in_metrics and line.startswith("|"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                found = re.findall(r"`([a-z_:][a-z0-9_:]*)`", cells[0])
                names.update(found)
                if len(cells) > 1 and "histogram" in cells[1]:
                    histograms.update(found)
    return names, histograms


def cmd_metrics(args):
    p = Problems("metric names")
    service, histograms = contract_metrics(args.contract)
    known, sources = {}, {}
    for n in service:
        known[n] = "endpoint-stats (docs/CONTRACT.md)"
    section = "?"
    with open(args.known, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("#"):
                section = line.lstrip("# ").strip() or section
                continue
            if line:
                name, *kind = line.split()
                known[name] = section
                if kind == ["histogram"]:
                    histograms.add(name)
    for h in histograms:
        for suffix in ("_bucket", "_sum", "_count"):
            known[h + suffix] = known.get(h, "histogram")
    recorded = {rule["record"] for _, rule in rules_of(args.rules) if "record" in rule}
    for r in recorded:
        known[r] = "recording rule"

    used = {}
    for group, rule in rules_of(args.rules):
        for n in metric_names(rule["expr"]):
            used.setdefault(n, set()).add(f"rule {rule.get('alert') or rule.get('record')}")
    with open(args.dashboard, encoding="utf-8") as f:
        dash = json.load(f)
    for where, expr in dashboard_queries(dash):
        for n in metric_names(expr):
            used.setdefault(n, set()).add(where.split(" target")[0])
    for n in sorted(used):
        if n not in known:
            p.add(f"{n} (used by {', '.join(sorted(used[n]))}) is produced by no known source")
        else:
            sources.setdefault(known[n], []).append(n)
    for src in sorted(sources):
        print(f"     {src}: {' '.join(sorted(sources[src]))}")
    p.finish(f"{len(used)} metric names read by the rules and the dashboard all have a known source")


# -------------------------------------------------------------------------------- prometheus

def cmd_prometheus_local_config(args):
    """The committed prometheus.yml, made loadable by the Debian Prometheus on this machine.

    Debian builds Prometheus without Kubernetes service discovery, and the in-cluster
    ServiceAccount files do not exist here. The copy differs in exactly these points:
      - kubernetes_sd_configs (role R) -> file_sd_configs reading fixtures/sd-R.json, which
        holds targets with the __meta_kubernetes_* labels Kubernetes discovery would give
      - tls_config.ca_file -> insecure_skip_verify; credentials_file -> a dummy token file
      - rule_files -> the committed rules file
    Everything else (jobs, relabelling, metric relabelling, alerting) is loaded as is.
    """
    p = Problems("Kubernetes-only parts of prometheus.yml")
    cfg = load_yaml(args.config)
    os.makedirs(args.out, exist_ok=True)
    token = os.path.join(args.out, "token")
    with open(token, "w", encoding="utf-8") as f:
        f.write("dummy-token\n")
    allowed_sd_keys = {"role", "namespaces", "selectors", "api_server", "kubeconfig_file", "attach_metadata",
                       "authorization", "tls_config", "follow_redirects", "enable_http2"}
    roles = {"pod", "node", "service", "endpoints", "endpointslice", "ingress"}
    for job in cfg.get("scrape_configs", []):
        sds = job.pop("kubernetes_sd_configs", None)
        if sds is not None:
            files = []
            for sd in sds:
                extra = set(sd) - allowed_sd_keys
                if extra:
                    p.add(f"job {job['job_name']}: unknown kubernetes_sd_configs keys {sorted(extra)}")
                if sd.get("role") not in roles:
                    p.add(f"job {job['job_name']}: role {sd.get('role')!r} not one of {sorted(roles)}")
                ns = sd.get("namespaces")
                if ns is not None and (set(ns) - {"names", "own_namespace"} or not isinstance(ns.get("names", []), list)):
                    p.add(f"job {job['job_name']}: bad namespaces block {ns}")
                fixture = os.path.join(args.fixtures, f"sd-{sd.get('role')}.json")
                if not os.path.isfile(fixture):
                    p.add(f"job {job['job_name']}: no fixture {fixture}")
                files.append(os.path.abspath(fixture))
            job["file_sd_configs"] = [{"files": files, "refresh_interval": "5s"}]
        tls = job.get("tls_config")
        if tls and "ca_file" in tls:
            if tls["ca_file"] != "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt":
                p.add(f"job {job['job_name']}: ca_file is not the in-cluster ServiceAccount CA")
            del tls["ca_file"]
            tls["insecure_skip_verify"] = True
        auth = job.get("authorization")
        if auth and "credentials_file" in auth:
            if auth["credentials_file"] != "/var/run/secrets/kubernetes.io/serviceaccount/token":
                p.add(f"job {job['job_name']}: credentials_file is not the in-cluster ServiceAccount token")
            auth["credentials_file"] = token
    if cfg.get("rule_files") != ["/etc/prometheus/rules/*.yml"]:
        p.add(f"rule_files is {cfg.get('rule_files')}, expected ['/etc/prometheus/rules/*.yml']")
    # The ConfigMap mounts the rules file under its own name: the glob must match that name.
    for pattern in cfg.get("rule_files") or []:
        if not fnmatch.fnmatch(os.path.join(os.path.dirname(pattern), os.path.basename(args.rules)), pattern):
            p.add(f"rule_files glob {pattern} does not match the mounted {os.path.basename(args.rules)}")
    cfg["rule_files"] = [os.path.abspath(args.rules)]
    out = os.path.join(args.out, "prometheus.yml")
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    p.finish(f"kubernetes_sd_configs and ServiceAccount paths well-formed; local copy written to {out}")


def http_json(url, data=None, timeout=5):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def cmd_prometheus_targets(args):
    p = Problems("Prometheus relabelling of the discovered targets")
    with open(args.expected, encoding="utf-8") as f:
        expected = json.load(f)
    work = tempfile.mkdtemp(prefix="prom-targets-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = os.path.join(work, "prometheus.log")
    try:
        with Daemon(["prometheus", f"--config.file={args.config}", f"--storage.tsdb.path={work}/data",
                     f"--web.listen-address=127.0.0.1:{port}"], log) as d:
            want_pools = {t["scrapePool"] for t in expected["active"]}

            def targets():
                d.check_alive("prometheus")
                data = http_json(f"{base}/api/v1/targets")["data"]
                pools = {t["scrapePool"] for t in data["activeTargets"]}
                return data if want_pools <= pools else None

            data = wait_for("Prometheus to discover the fixture targets", targets, 60, log)
            got = sorted((t["scrapePool"], json.dumps(t["labels"], sort_keys=True), t["scrapeUrl"])
                         for t in data["activeTargets"])
            want = sorted((t["scrapePool"], json.dumps(t["labels"], sort_keys=True), t["scrapeUrl"])
                          for t in expected["active"])
            for item in sorted(set(want) - set(got)):
                p.add(f"expected target missing: pool={item[0]} labels={item[1]} url={item[2]}")
            for item in sorted(set(got) - set(want)):
                p.add(f"unexpected target: pool={item[0]} labels={item[1]} url={item[2]}")
            if len(got) != len(set(got)):
                p.add("a target is scraped twice")
            dropped = sorted(t["discoveredLabels"].get("__meta_kubernetes_pod_name", "")
                             for t in data["droppedTargets"]
                             if "__meta_kubernetes_pod_name" in t["discoveredLabels"])
            if sorted(set(dropped)) != sorted(expected["dropped_pods"]):
                p.add(f"dropped pods {sorted(set(dropped))}, expected {sorted(expected['dropped_pods'])}")
            for t in sorted(got):
                print(f"     {t[0]:22} {t[2]:70} {t[1]}")
            print(f"     dropped pods: {', '.join(sorted(set(dropped)))}")

            rules = http_json(f"{base}/api/v1/rules")["data"]["groups"]
            n_alerts = sum(1 for g in rules for r in g["rules"] if r["type"] == "alerting")
            n_rec = sum(1 for g in rules for r in g["rules"] if r["type"] == "recording")
            src_alerts = sum(1 for _, r in rules_of(args.rules) if "alert" in r)
            src_rec = sum(1 for _, r in rules_of(args.rules) if "record" in r)
            if (n_alerts, n_rec) != (src_alerts, src_rec):
                p.add(f"Prometheus loaded {n_alerts} alerts / {n_rec} recording rules, the file has {src_alerts} / {src_rec}")
            ams = http_json(f"{base}/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
            am_urls = [a["url"] for a in ams]
            if am_urls != ["http://alertmanager.endpoint-stats.svc:9093/api/v2/alerts"]:
                p.add(f"alertmanagers {am_urls}")
            print(f"     rules loaded: {n_alerts} alerting, {n_rec} recording; alertmanagers: {am_urls}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p.finish(f"{len(expected['active'])} targets with the expected job/instance/namespace/pod labels and URLs; "
             f"{len(expected['dropped_pods'])} pods dropped as expected")


# ------------------------------------------------------------------------------ alertmanager

class SlackSink(http.server.BaseHTTPRequestHandler):
    posts = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        SlackSink.posts.append((self.path, json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def cmd_alertmanager_live(args):
    """Run the committed alertmanager.yml for real, with a local Slack sink.

    The copy differs in exactly these points: every api_url_file names a temporary file holding a
    sink URL whose path is the committed file's name (the committed files stay under
    /etc/alertmanager/secrets/), and the root route's group_wait is 1s instead of 30s so the test
    does not wait. A Slack app's webhook posts to its own channel whatever `channel:` says, so each
    channel must have a webhook file of its own, and each post must come through it.
    """
    p = Problems("Alertmanager delivery, templates and inhibition")
    work = tempfile.mkdtemp(prefix="am-live-")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlackSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sink_base = f"http://127.0.0.1:{server.server_address[1]}"
    cfg = load_yaml(args.config)
    n_slack = 0
    webhook_of_channel = {}
    for r in cfg["receivers"]:
        for s in r.get("slack_configs", []):
            committed = str(s.get("api_url_file") or "")
            if not committed.startswith("/etc/alertmanager/secrets/") or "api_url" in s:
                p.add(f"receiver {r['name']}: slack config must use an api_url_file under "
                      f"/etc/alertmanager/secrets/ and no api_url")
            if s.get("send_resolved") is not True:
                p.add(f"receiver {r['name']}: send_resolved is not true")
            name, channel = os.path.basename(committed), s.get("channel")
            other_channels_webhooks = {w for c, w in webhook_of_channel.items() if c != channel}
            if webhook_of_channel.get(channel, name) != name or name in other_channels_webhooks:
                p.add(f"receiver {r['name']}: channel {channel} and webhook file {name} are not one to one")
            webhook_of_channel[channel] = name
            url_file = os.path.join(work, name)
            with open(url_file, "w", encoding="utf-8") as f:
                f.write(f"{sink_base}/{name}\n")
            s["api_url_file"] = url_file
            n_slack += 1
    cfg["route"]["group_wait"] = "1s"
    conf = os.path.join(work, "alertmanager.yml")
    with open(conf, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)

    alerts_src = {r["alert"]: r for _, r in rules_of(args.rules) if "alert" in r}

    def alert(name, severity, namespace=None, description="test"):
        labels = {"alertname": name, "severity": severity}
        if namespace:
            labels["namespace"] = namespace
        ann = dict(alerts_src[name]["annotations"])
        ann["description"] = description
        return {"labels": labels, "annotations": ann, "generatorURL": "http://prometheus.test/graph"}

    sent = [
        alert("HighErrorRate", "critical", "endpoint-stats", "critical HighErrorRate for the test"),
        alert("HighErrorRate", "warning", "endpoint-stats", "warning that the critical one inhibits"),
        alert("SlowResponseTime", "warning", "endpoint-stats", "slow for the test"),
        alert("ErrorBudgetBurnFast", "critical", "endpoint-stats", "fast burn for the test"),
        alert("ErrorBudgetBurnSlow", "warning", "endpoint-stats", "slow burn that the fast one inhibits"),
        alert("Watchdog", "none", None, "watchdog for the test"),
    ]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = os.path.join(work, "alertmanager.log")
    try:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager") or "alertmanager"
        with Daemon([binary, f"--config.file={conf}", f"--storage.path={work}/data",
                     f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="], log) as d:
            def ready():
                d.check_alive("alertmanager")
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    return r.status == 200

            wait_for("Alertmanager to be ready", ready, 30, log)
            http_json(f"{base}/api/v2/alerts", sent)

            def channels():
                got = {body.get("channel") for _, body in SlackSink.posts}
                return got if {"#incidents", "#monitoring", "#monitoring-watchdog"} <= got else None

            wait_for("Slack posts to #incidents, #monitoring and #monitoring-watchdog", channels, 30, log)
            time.sleep(2)  # let anything that should not be there arrive too
            by_channel = {}
            for path, body in SlackSink.posts:
                channel = body.get("channel")
                if path.rsplit("/", 1)[-1] != webhook_of_channel.get(channel):
                    p.add(f"a post to {channel} came through {path}, not webhook {webhook_of_channel.get(channel)}")
                for att in body.get("attachments", []):
                    by_channel.setdefault(channel, []).append(att)
            for ch, atts in sorted(by_channel.items()):
                for att in atts:
                    print(f"     {ch:22} {att.get('title')}  -> {att.get('title_link')}")
            expect = {
                "#incidents": {"HighErrorRate", "ErrorBudgetBurnFast"},
                "#monitoring": {"SlowResponseTime"},
                "#monitoring-watchdog": {"Watchdog"},
            }
            for ch, names in expect.items():
                titles = [a.get("title", "") for a in by_channel.get(ch, [])]
                got_names = {re.sub(r"^\[[^\]]*\] (\S+).*$", r"\1", t) for t in titles}
                if got_names != names:
                    p.add(f"{ch}: got alerts {sorted(got_names)}, expected {sorted(names)}")
                for a in by_channel.get(ch, []):
                    name = re.sub(r"^\[[^\]]*\] (\S+).*$", r"\1", a.get("title", ""))
                    url = alerts_src.get(name, {}).get("annotations", {}).get("runbook_url")
                    if not a.get("title", "").startswith("[FIRING:1] "):
                        p.add(f"{ch}: title {a.get('title')!r} does not start with [FIRING:1]")
                    if url and (a.get("title_link") != url or url not in a.get("text", "")):
                        p.add(f"{ch}: {name} message lacks its runbook_url {url} (title_link and text)")
                    summary = alerts_src.get(name, {}).get("annotations", {}).get("summary", "")
                    if summary and summary not in a.get("text", ""):
                        p.add(f"{ch}: {name} message lacks its summary")
            texts = " ".join(a.get("text", "") for atts in by_channel.values() for a in atts)
            for quiet in ("warning that the critical one inhibits", "slow burn that the fast one inhibits"):
                if quiet in texts:
                    p.add(f"an inhibited alert was delivered: {quiet}")

            state = http_json(f"{base}/api/v2/alerts")
            for a in state:
                name, sev = a["labels"]["alertname"], a["labels"]["severity"]
                inhibited = bool(a["status"]["inhibitedBy"])
                should = (name, sev) in {("HighErrorRate", "warning"), ("ErrorBudgetBurnSlow", "warning")}
                print(f"     state {name:20} {sev:8} {a['status']['state']:10} inhibited={inhibited}")
                if inhibited != should:
                    p.add(f"{name}/{sev}: inhibited={inhibited}, expected {should}")
            if len(state) != len(sent):
                p.add(f"Alertmanager holds {len(state)} alerts, {len(sent)} were sent")
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    p.finish(f"{n_slack} Slack configs read a webhook of their own from api_url_file; critical -> #incidents, "
             f"warning -> #monitoring, Watchdog -> #monitoring-watchdog, with runbook links; "
             f"critical inhibits warning of the same alert and namespace")


# -------------------------------------------------------------------------------------- alerts

def cmd_alerts(args):
    """Prints `alertname severity` per alert, for the shell (amtool routing checks)."""
    for _, rule in rules_of(args.rules):
        if "alert" in rule:
            print(rule["alert"], rule.get("labels", {}).get("severity", ""))


# ---------------------------------------------------------------------------------------- main

def cmd_grafana_provisioning(args):
    """The provisioning files: valid YAML, the Prometheus datasource uid and URL, the dashboards path."""
    ds = load_yaml(args.datasources)["datasources"][0]
    assert ds["uid"] == "prometheus" and ds["url"] == "http://prometheus.endpoint-stats.svc:9090", ds
    prov = load_yaml(args.providers)["providers"][0]
    assert prov["options"]["path"] == "/var/lib/grafana/dashboards", prov
    print("datasource", ds["name"], ds["url"], "| provider", prov["name"], prov["options"]["path"])


def main():
    root = os.environ.get("REPO_ROOT") or os.path.abspath(os.path.join(HERE, "..", ".."))
    os.chdir(root)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("rules")
    s.add_argument("--rules", default=RULES)
    s.add_argument("--tests", default=TESTS_GLOB)
    s.set_defaults(fn=cmd_rules)

    s = sub.add_parser("alerts")
    s.add_argument("--rules", default=RULES)
    s.set_defaults(fn=cmd_alerts)

    s = sub.add_parser("runbooks")
    s.add_argument("--rules", default=RULES)
    s.add_argument("--runbooks-dir", default=RUNBOOKS)
    s.add_argument("--overview", default="docs/monitoring.md")
    s.set_defaults(fn=cmd_runbooks)

    s = sub.add_parser("dashboard")
    s.add_argument("--dashboard", default=DASHBOARD)
    s.add_argument("--rules-out")
    s.set_defaults(fn=cmd_dashboard)

    s = sub.add_parser("selectors")
    s.add_argument("--rules", default=RULES)
    s.add_argument("--dashboard", default=DASHBOARD)
    s.set_defaults(fn=cmd_selectors)

    s = sub.add_parser("kubernetes-panels")
    s.add_argument("--dashboard", default=DASHBOARD)
    s.add_argument("--fixture", default=os.path.join(HERE, "fixtures", "kubernetes-panels.yml"))
    s.add_argument("--test-out", help="the promtool test file to write")
    s.add_argument("--list", action="store_true", help="print the panel queries the fixture covers, one per line")
    s.add_argument("--rules", default=RULES)
    s.set_defaults(fn=cmd_kubernetes_panels)

    s = sub.add_parser("grafana-provisioning")
    s.add_argument("--datasources", default=f"{MONITORING}/grafana/datasources.yml")
    s.add_argument("--providers", default=f"{MONITORING}/grafana/dashboards.yml")
    s.set_defaults(fn=cmd_grafana_provisioning)

    s = sub.add_parser("metrics")
    s.add_argument("--rules", default=RULES)
    s.add_argument("--dashboard", default=DASHBOARD)
    s.add_argument("--contract", default="docs/CONTRACT.md")
    s.add_argument("--known", default=os.path.join(HERE, "known-metrics.txt"))
    s.set_defaults(fn=cmd_metrics)

    s = sub.add_parser("prometheus-local-config")
    s.add_argument("--config", default=PROMETHEUS_YML)
    s.add_argument("--rules", default=RULES)
    s.add_argument("--fixtures", default=os.path.join(HERE, "fixtures"))
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_prometheus_local_config)

    s = sub.add_parser("prometheus-targets")
    s.add_argument("--config", required=True, help="the local copy from prometheus-local-config")
    s.add_argument("--rules", default=RULES)
    s.add_argument("--expected", default=os.path.join(HERE, "fixtures", "expected-targets.json"))
    s.set_defaults(fn=cmd_prometheus_targets)

    s = sub.add_parser("alertmanager-live")
    s.add_argument("--config", default=ALERTMANAGER_YML)
    s.add_argument("--rules", default=RULES)
    s.set_defaults(fn=cmd_alertmanager_live)

    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
