#!/usr/bin/env python3
"""Helpers of the end-to-end suite tests/suites/60-e2e-stack.sh (standard library, plus PyYAML
for the `channel` command).

  channel       which Slack channel, and which webhook file, an alert of the rules file goes to:
                its labels from the rules file, the receiver from `amtool config routes test` on
                alertmanager.yml, channel and api_url_file from that receiver's slack_configs
  wait-slack    polls the sink's JSON lines until a FIRING post of an alert in a channel arrives,
                through the expected webhook
  wait-query    polls Prometheus until a query returns data (or the deadline passes)
  dashboard     runs every panel query of a Grafana dashboard against Prometheus, the way Grafana
                would (template variables resolved through the Prometheus API, $__rate_interval
                and friends substituted)
  rolling-load  GET / through the load balancer from several keep-alive clients until a stop
                file appears; records every status and access_count
  check-counts  the counting invariants on the recorded load against the stored count

Each prints PASS/FAIL/INFO lines and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request


def out(kind: str, message: str) -> None:
    print(f"{kind} {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Prometheus

def prom_get(base: str, path: str, params: dict) -> tuple[int, dict]:
    url = f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        try:
            body = json.load(error)
        except ValueError:
            body = {"status": "error", "error": str(error)}
        return error.code, body


def has_data(body: dict) -> bool:
    data = body.get("data") or {}
    if data.get("resultType") == "scalar":
        return True
    return bool(data.get("result"))


def sample_summary(body: dict, limit: int = 3) -> str:
    data = body.get("data") or {}
    result = data.get("result")
    if data.get("resultType") == "scalar":
        return f"scalar {result[1]}"
    parts = []
    for series in (result or [])[:limit]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(series.get("metric", {}).items()) if k != "__name__")
        value = series.get("value", [None, None])[1]
        parts.append(f"{{{labels}}} {value}")
    more = f" (+{len(result) - limit} more)" if result and len(result) > limit else ""
    return "; ".join(parts) + more


def cmd_wait_query(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    started = time.monotonic()
    while True:
        status, body = prom_get(args.prometheus, "/api/v1/query", {"query": args.query})
        if status == 200 and has_data(body):
            out("INFO", f"query has data after {time.monotonic() - started:.1f}s: {args.query} = {sample_summary(body)}")
            return 0
        if time.monotonic() > deadline:
            out("FAIL", f"query without data after {args.timeout}s: {args.query} (HTTP {status}, {body.get('error', '')})")
            return 1
        time.sleep(1)


# ----------------------------------------------------------------------------------------------
# Slack channel of an alert, from the sources

def cmd_channel(args: argparse.Namespace) -> int:
    import yaml  # PyYAML: the repository's venv has it

    rules = yaml.safe_load(open(args.rules, encoding="utf-8"))
    labels = None
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            if rule.get("alert") == args.alert:
                labels = dict(rule.get("labels") or {})
    if labels is None:
        print(f"alert {args.alert} not found in {args.rules}", file=sys.stderr)
        return 1
    labels["alertname"] = args.alert
    pairs = [f"{k}={v}" for k, v in sorted(labels.items())]
    routed = subprocess.run(["amtool", "config", "routes", "test", f"--config.file={args.alertmanager}", *pairs],
                            capture_output=True, text=True, check=False)
    if routed.returncode != 0:
        print(f"amtool config routes test failed: {routed.stderr.strip()}", file=sys.stderr)
        return 1
    receivers = [r.strip() for r in routed.stdout.strip().split(",") if r.strip()]
    config = yaml.safe_load(open(args.alertmanager, encoding="utf-8"))
    targets = []  # (channel, webhook file name): a Slack app's webhook decides the channel
    for receiver in config.get("receivers", []):
        if receiver.get("name") in receivers:
            targets += [(s.get("channel"), os.path.basename(str(s.get("api_url_file") or "")))
                        for s in receiver.get("slack_configs") or [] if s.get("channel")]
    if len(targets) != 1 or not targets[0][1]:
        print(f"alert {args.alert} ({' '.join(pairs)}) routes to {receivers} with Slack channels and webhook "
              f"files {targets}: expected exactly one of each", file=sys.stderr)
        return 1
    print(*targets[0])
    return 0


# ----------------------------------------------------------------------------------------------
# Slack sink

def read_posts(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def post_texts(post: dict) -> tuple[str, str]:
    """(channel, all text of the message: text, title, fallback of every attachment)."""
    body = post.get("body") or {}
    texts = [str(body.get("text") or "")]
    for attachment in body.get("attachments") or []:
        texts += [str(attachment.get(k) or "") for k in ("title", "text", "fallback", "pretext")]
    return str(body.get("channel") or ""), "\n".join(texts)


def firing_post_of(post: dict, alert: str) -> bool:
    _, text = post_texts(post)
    body = post.get("body") or {}
    titles = [str(a.get("title") or "") for a in body.get("attachments") or []]
    return any(t.startswith("[FIRING") and re.search(rf"\b{re.escape(alert)}\b", t) for t in titles) \
        and re.search(rf"alertname={re.escape(alert)}\b", text) is not None


def cmd_wait_slack(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.timeout
    while True:
        posts = read_posts(args.posts)[args.since:]
        for post in posts:
            if firing_post_of(post, args.alert):
                channel, _ = post_texts(post)
                title = (post["body"].get("attachments") or [{}])[0].get("title")
                if channel != args.channel:
                    out("FAIL", f"{args.alert} posted to {channel!r}, expected {args.channel!r} (title {title!r})")
                    return 1
                # The sink URL of each webhook file ends with the file's name.
                webhook = str(post.get("path") or "").rsplit("/", 1)[-1]
                if webhook != args.webhook:
                    out("FAIL", f"{args.alert} posted through webhook {webhook!r}, expected {args.webhook!r}")
                    return 1
                out("PASS", f"{args.alert} arrived in {channel} through webhook {webhook} after "
                            f"{time.monotonic() - started:.1f}s (title {title!r}, received {post.get('received_at')})")
                return 0
        if time.monotonic() > deadline:
            seen = [f"{post_texts(p)[0]} {((p.get('body') or {}).get('attachments') or [{}])[0].get('title')}" for p in posts]
            out("FAIL", f"no FIRING post of {args.alert} in {args.channel} within {args.timeout}s; "
                        f"posts since: {seen or 'none'}")
            return 1
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------
# Dashboard

K8S_METRIC = re.compile(r"\b(kube_[a-z_]+|container_[a-z_]+|kubelet_[a-z_]+)")
BUILTINS = {
    # Grafana: $__rate_interval = max($__interval + scrape interval, 4 x scrape interval); the
    # datasource's timeInterval is 15s (grafana/datasources.yml), so at least 1m.
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "6h",
    "__range_s": "21600",
    "__range_ms": "21600000",
}
VAR_REF = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def regex_escape(value: str) -> str:
    """Grafana's escaping of a multi-value for a Prometheus regex matcher."""
    return re.sub(r"([\\^$*+?.()|{}\[\]'])", r"\\\\\1", value)


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name in values:
            return values[name]
        return match.group(0)
    return VAR_REF.sub(repl, expr)


def resolve_variables(args: argparse.Namespace, dashboard: dict) -> tuple[dict[str, str], list[str]]:
    values = dict(BUILTINS)
    failures = []
    for var in (dashboard.get("templating") or {}).get("list") or []:
        name, kind = var.get("name"), var.get("type")
        if kind == "constant" or kind == "custom" or kind == "interval":
            options = [o.get("value") for o in var.get("options") or [] if o.get("value") not in (None, "$__all")]
            if not options and var.get("query"):
                options = [v.strip() for v in str(var["query"]).split(",") if v.strip()]
        elif kind == "query":
            query = var.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            query = substitute(str(query or var.get("definition") or ""), values)
            match = re.fullmatch(r"\s*label_values\((?:(.*),)?\s*(\w+)\s*\)\s*", query)
            if not match:
                failures.append(f"variable ${name}: query {query!r} is not label_values(...): not emulated")
                continue
            selector, label = match.group(1), match.group(2)
            if selector:
                status, body = prom_get(args.prometheus, "/api/v1/series",
                                        {"match[]": selector.strip(), "start": time.time() - 6 * 3600})
                options = sorted({s.get(label) for s in body.get("data") or [] if s.get(label)})
            else:
                status, body = prom_get(args.prometheus, f"/api/v1/label/{label}/values", {})
                options = sorted(body.get("data") or [])
            if status != 200:
                failures.append(f"variable ${name}: HTTP {status} {body.get('error')}")
        else:
            failures.append(f"variable ${name}: type {kind} not emulated")
            continue
        if not options:
            failures.append(f"variable ${name} has no values ({var.get('definition') or var.get('query')})")
            continue
        current = (var.get("current") or {}).get("value")
        all_selected = current == "$__all" or current == ["$__all"]
        if var.get("multi") or (var.get("includeAll") and all_selected):
            if all_selected and var.get("allValue"):
                values[name] = var["allValue"]
            else:
                values[name] = "(" + "|".join(regex_escape(o) for o in options) + ")"
        else:
            values[name] = options[0]
        out("INFO", f"variable ${name} = {values[name]} (values: {', '.join(options)})")
    return values, failures


def panel_targets(node, found: list) -> None:
    if isinstance(node, dict):
        if "targets" in node and isinstance(node.get("targets"), list):
            found.append(node)
        for key in ("panels", "rows"):
            for child in node.get(key) or []:
                panel_targets(child, found)
    elif isinstance(node, list):
        for child in node:
            panel_targets(child, found)


def cmd_dashboard(args: argparse.Namespace) -> int:
    dashboard = json.load(open(args.dashboard, encoding="utf-8"))
    expected_empty = set(args.expect_empty or [])
    values, failures = resolve_variables(args, dashboard)
    for failure in failures:
        out("FAIL" if args.assert_data else "INFO", failure)
    panels: list = []
    panel_targets(dashboard, panels)
    counts = collections.Counter()
    listed_seen = set()
    for panel in panels:
        title = panel.get("title") or f"panel {panel.get('id')}"
        for target in panel["targets"]:
            ref = f"{title}/{target.get('refId', '?')}"
            expr = target.get("expr")
            datasource = target.get("datasource") or panel.get("datasource") or {}
            ds_type = datasource.get("type", "prometheus") if isinstance(datasource, dict) else "prometheus"
            if not expr or ds_type != "prometheus":
                out("INFO", f"{ref}: no Prometheus expression (datasource {ds_type}), skipped")
                counts["skipped"] += 1
                continue
            query = substitute(expr, values)
            left = VAR_REF.findall(query)
            status, body = prom_get(args.prometheus, "/api/v1/query", {"query": query})
            valid = status == 200 and body.get("status") == "success"
            k8s = bool(K8S_METRIC.search(expr))
            listed = ref in expected_empty
            if listed:
                listed_seen.add(ref)
            if not valid:
                verdict, why = "FAIL", f"invalid query: HTTP {status} {body.get('errorType', '')} {body.get('error', '')}"
            elif left:
                verdict, why = "FAIL", f"unsubstituted variables {left}"
            elif listed and not k8s:
                verdict, why = "FAIL", "listed as Kubernetes-only but reads no kube_/container_/kubelet_ metric"
            elif k8s and not listed:
                verdict, why = "FAIL", "reads a Kubernetes-only metric but is not in the expected-empty list of the test"
            elif listed and has_data(body):
                verdict, why = "FAIL", f"listed as Kubernetes-only (expected empty) but returned data: {sample_summary(body)}"
            elif listed:
                verdict, why = "PASS", "Kubernetes-only: valid query, empty here as expected"
            elif has_data(body):
                verdict, why = "PASS", f"data: {sample_summary(body)}"
            else:
                verdict, why = "FAIL", "valid query but NO DATA on the local stack"
            if verdict == "FAIL" and not args.assert_data:
                verdict = "INFO"
            counts[verdict] += 1
            out(verdict, f"{ref}: {why}" + (f"\n      query: {query}" if verdict != "PASS" or args.verbose else ""))
    for ref in sorted(expected_empty - listed_seen):
        out("FAIL" if args.assert_data else "INFO", f"{ref}: in the expected-empty list but not in the dashboard")
        counts["FAIL" if args.assert_data else "INFO"] += 1
    failed = counts["FAIL"] + (len(failures) if args.assert_data else 0)
    out("INFO", f"dashboard {os.path.basename(args.dashboard)}: {sum(counts.values())} queries, "
                f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['INFO']} informational, "
                f"{counts['skipped']} skipped")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# Rolling restart load

def cmd_rolling_load(args: argparse.Namespace) -> int:
    url = urllib.parse.urlsplit(args.url)
    results: list[tuple[float, str, int | None]] = []
    lock = threading.Lock()
    stop = threading.Event()
    started = time.monotonic()

    def worker() -> None:
        conn = None
        local = []
        sent = 0
        while not stop.is_set() and sent < args.max_requests_per_client:
            if conn is None:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=15)
            at = time.monotonic() - started
            sent += 1
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read()
                status = str(response.status)
                count = None
                if response.status == 200:
                    count = json.loads(body).get("access_count")
                local.append((at, status, count))
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException, ValueError) as error:
                local.append((at, f"error:{type(error).__name__}", None))
                conn.close()
                conn = None
            if args.pause:
                time.sleep(args.pause)
        if conn is not None:
            conn.close()
        with lock:
            results.extend(local)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    deadline = started + args.max_seconds
    while time.monotonic() < deadline and not os.path.exists(args.stop_file):
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    results.sort()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"seconds": time.monotonic() - started, "stopped_by_file": os.path.exists(args.stop_file),
                   "requests": results}, fh)
    statuses = collections.Counter(r[1] for r in results)
    out("INFO", f"rolling load: {len(results)} requests in {time.monotonic() - started:.1f}s from "
                f"{args.clients} clients, statuses {dict(statuses)}")
    return 0


def cmd_check_counts(args: argparse.Namespace) -> int:
    data = json.load(open(args.results, encoding="utf-8"))
    requests = data["requests"]
    ok = [r for r in requests if r[1] == "200"]
    failed = [r for r in requests if r[1] != "200"]
    counts = [r[2] for r in ok]
    failures = 0
    if not data.get("stopped_by_file"):
        out("FAIL", "the load ran into its time bound before the restarts ended")
        failures += 1
    if len(requests) < args.min_requests:
        out("FAIL", f"only {len(requests)} requests (at least {args.min_requests} expected)")
        failures += 1
    if failed:
        sample = ", ".join(f"t={r[0]:.2f}s {r[1]}" for r in failed[:10])
        out("FAIL", f"{len(failed)} of {len(requests)} requests did not answer 200: {sample}")
        failures += 1
    else:
        out("PASS", f"all {len(requests)} requests through the load balancer answered 200 during the rolling restart")
    stored = args.after - args.before
    if stored != len(ok):
        difference = f"{len(ok) - stored} lost" if stored < len(ok) else f"{stored - len(ok)} counted without a 200"
        out("FAIL", f"stored count of / grew by {stored} ({args.before} -> {args.after}) but {len(ok)} requests "
                    f"got 200: {difference}")
        failures += 1
    else:
        out("PASS", f"zero lost counts: the stored count of / grew by {stored} = the {len(ok)} answers 200")
    duplicates = [c for c, n in collections.Counter(counts).items() if n > 1]
    outside = [c for c in counts if c is None or not args.before < c <= args.after]
    if duplicates or outside:
        out("FAIL", f"access_count values: {len(duplicates)} duplicated (e.g. {duplicates[:5]}), "
                    f"{len(outside)} outside ({args.before}, {args.after}] (e.g. {outside[:5]})")
        failures += 1
    else:
        out("PASS", f"the {len(counts)} access_count values are unique and exactly ({args.before}, {args.after}]")
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------
# Small steps of scripts/monitoring-screenshots.sh

def cmd_urlencode(args: argparse.Namespace) -> int:
    print(urllib.parse.quote(args.text, safe=""))
    return 0


def cmd_json_page(args: argparse.Namespace) -> int:
    """JSON on stdin -> an HTML page showing it indented under TITLE (Chromium shows raw JSON on one line)."""
    import html
    data = json.load(sys.stdin)
    print("<html><body style=\"font-family: sans-serif; margin: 16px\"><h2>" + html.escape(args.title)
          + "</h2><pre style=\"font-size: 14px\">" + html.escape(json.dumps(data, indent=2)) + "</pre></body></html>")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("channel")
    p.add_argument("--rules", required=True)
    p.add_argument("--alertmanager", required=True)
    p.add_argument("--alert", required=True)
    p.set_defaults(func=cmd_channel)

    p = sub.add_parser("wait-slack")
    p.add_argument("--posts", required=True)
    p.add_argument("--since", type=int, default=0, help="ignore the first N posts")
    p.add_argument("--alert", required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--webhook", required=True, help="name of the webhook file the post must come through")
    p.add_argument("--timeout", type=float, default=90)
    p.set_defaults(func=cmd_wait_slack)

    p = sub.add_parser("wait-query")
    p.add_argument("--prometheus", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--timeout", type=float, default=60)
    p.set_defaults(func=cmd_wait_query)

    p = sub.add_parser("dashboard")
    p.add_argument("--prometheus", required=True)
    p.add_argument("--dashboard", required=True)
    p.add_argument("--expect-empty", action="append", metavar="PANEL_TITLE/REFID")
    p.add_argument("--assert-data", action="store_true", help="FAIL (not INFO) on queries without data")
    p.add_argument("--verbose", action="store_true", help="print every substituted query")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("rolling-load")
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=180)
    p.add_argument("--max-requests-per-client", type=int, default=100000)
    p.add_argument("--pause", type=float, default=0.0)
    p.set_defaults(func=cmd_rolling_load)

    p = sub.add_parser("check-counts")
    p.add_argument("--results", required=True)
    p.add_argument("--before", type=int, required=True)
    p.add_argument("--after", type=int, required=True)
    p.add_argument("--min-requests", type=int, default=500)
    p.set_defaults(func=cmd_check_counts)

    p = sub.add_parser("urlencode")
    p.add_argument("text")
    p.set_defaults(func=cmd_urlencode)

    p = sub.add_parser("json-page")
    p.add_argument("--title", required=True)
    p.set_defaults(func=cmd_json_page)

    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
