#!/usr/bin/env python3
"""The Grafana dashboard "Endpoint Statistics", written with Grafana's Foundation SDK.

This program is the source of dashboards/endpoint-statistics.json: Kustomize and the tests load
that file, and tests/suites/30-monitoring.sh fails when it differs from what this program writes.
After a change here:

    .venv/bin/python deploy/kubernetes/base/monitoring/grafana/dashboard.py --write

--check compares instead (exit 1 and a diff when they differ). The SDK version is pinned in
requirements.txt beside this file, for the Grafana version of base/grafana/deployment.yaml.

The thresholds drawn on panels are read from the alerts of the rules file, so that a threshold is
changed in one place, where the alert is; the API requests are the recording rules' copies
(api:http_requests_total), so the routes that count toward the SLO are named only there.
"""

import argparse
import difflib
import json
import os
import re
import sys

import yaml
from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "dashboards", "endpoint-statistics.json")
RULES = os.path.join(HERE, "..", "prometheus", "rules", "endpoint-stats.rules.yml")
SOURCE = "deploy/kubernetes/base/monitoring/grafana/dashboard.py"

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="prometheus")
# Label selectors of the panels: the dashboard variables, as regexes (multi-value, "All").
NS = 'namespace=~"$namespace"'
POD = 'namespace=~"$namespace", pod=~"$pod"'
SVC = f'job="endpoint-stats", {POD}'


# ------------------------------------------------------------------------- thresholds of alerts

def alert_exprs(path=RULES):
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


def threshold(exprs, alert, pattern):
    """The number(s) that PATTERN captures in ALERT's expression; an error if it has changed shape."""
    m = re.search(pattern, exprs[alert])
    if not m:
        sys.exit(f"{SOURCE}: the expression of {alert} no longer matches {pattern!r}: {exprs[alert]!r}")
    values = [eval_number(v) for v in m.groups()]
    return values[0] if len(values) == 1 else values


def eval_number(text):
    """'0.05' or a product such as '26 * 3600'."""
    result = 1.0
    for factor in text.split("*"):
        result *= float(factor)
    return int(result) if result.is_integer() else result


# ----------------------------------------------------------------------------------- builders

def query(ref, expr, legend, instant=False):
    q = (prometheus.Dataquery().datasource(DATASOURCE).editor_mode("code").expr(expr)
         .legend_format(legend).ref_id(ref))
    return q.instant().format("table") if instant else q.range()


def steps(*pairs):
    """Threshold steps: (color, value) pairs, the first one's value None (the base)."""
    return (dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(color=c, value=v) for c, v in pairs]))


def with_queries(panel, queries):
    for q in queries:
        panel = panel.with_target(q)
    return panel


# A 0/1 health value shown as DOWN/UP.
UP_DOWN = [dm.ValueMap(options={"0": dm.ValueMappingResult(text="DOWN", color="red", index=0),
                                "1": dm.ValueMappingResult(text="UP", color="green", index=1)})]


def stat_panel(title, description, queries, unit, w, h=4, thresholds=(("green", None),), decimals=None,
               mappings=()):
    p = (stat.Panel().title(title).description(description).datasource(DATASOURCE).height(h).span(w)
         .unit(unit).thresholds(steps(*thresholds))
         .color_scheme(dashboard.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS)).mappings(list(mappings))
         .color_mode(cm.BigValueColorMode.VALUE).graph_mode(cm.BigValueGraphMode.AREA)
         .justify_mode(cm.BigValueJustifyMode.AUTO).orientation(cm.VizOrientation.AUTO)
         .text_mode(cm.BigValueTextMode.AUTO).wide_layout(True).show_percent_change(False)
         .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)))
    if decimals is not None:
        p = p.decimals(decimals)
    return with_queries(p, queries)


def timeseries_panel(title, description, queries, unit, w=12, h=8, thresholds=None, min0=True,
                     stacked=False, maximum=None):
    p = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE).height(h).span(w)
         .unit(unit).color_scheme(dashboard.FieldColor().mode(dm.FieldColorModeId.PALETTE_CLASSIC))
         .draw_style(cm.GraphDrawStyle.LINE).line_interpolation(cm.LineInterpolation.LINEAR).line_width(1)
         .fill_opacity(10).gradient_mode(cm.GraphGradientMode.NONE).show_points(cm.VisibilityMode.NEVER)
         .span_nulls(False).axis_placement(cm.AxisPlacement.AUTO).axis_soft_min(0)
         .stacking(common.StackingConfig().group("A")
                   .mode(cm.StackingMode.NORMAL if stacked else cm.StackingMode.NONE))
         .thresholds_style(common.GraphThresholdsStyleConfig()
                           .mode(cm.GraphThresholdsStyleMode.LINE if thresholds else cm.GraphThresholdsStyleMode.OFF))
         .thresholds(steps(*(thresholds or (("green", None),))))
         .legend(common.VizLegendOptions().calcs(["lastNotNull", "max"]).display_mode(cm.LegendDisplayMode.TABLE)
                 .placement(cm.LegendPlacement.BOTTOM).show_legend(True))
         .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)))
    if min0:
        p = p.min(0)
    if maximum is not None:
        p = p.max(maximum)
    return with_queries(p, queries)


def table_panel(title, description, query_, hide_columns, w, h=8):
    p = (table.Panel().title(title).description(description).datasource(DATASOURCE).height(h).span(w)
         .align(cm.FieldTextAlignment.AUTO).cell_options(cm.TableAutoCellOptions())
         .thresholds(steps(("green", None))).mappings([])
         .show_header(True).cell_height(cm.TableCellHeight.SM)
         .footer(common.TableFooterOptions().show(False).reducer(["sum"]).fields("").count_rows(False))
         .with_transformation(dm.DataTransformerConfig(id_val="organize", options={
             "excludeByName": {c: True for c in hide_columns}, "indexByName": {}, "renameByName": {}})))
    return p.with_target(query_)


def variable(name, label, description, definition):
    return (dashboard.QueryVariable(name).label(label).description(description).datasource(DATASOURCE)
            .query({"qryType": 1, "query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"})
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).regex("")
            .sort(dm.VariableSort.ALPHABETICAL_ASC).include_all(True).multi(True)
            .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
            .hide(dm.VariableHide.DONT_HIDE).options([]))


def percent(x):
    return f"{x * 100:g}%"


def hours(seconds):
    return f"{seconds / 3600:g}h"


# ---------------------------------------------------------------------------------- dashboard

def build(exprs):
    error_5xx = threshold(exprs, "HighErrorRate", r">\s*([0-9.]+)\s*$")
    slow = threshold(exprs, "SlowResponseTime", r">\s*([0-9.]+)\s*$")
    budget, fast = threshold(exprs, "ErrorBudgetBurnFast", r"rate1h\s*/\s*([0-9.]+)\s*>\s*([0-9.]+)")
    slow_burn = threshold(exprs, "ErrorBudgetBurnSlow", r"rate6h\s*/\s*[0-9.]+\s*>\s*([0-9.]+)")
    restarts = threshold(exprs, "PodRestartingFrequently", r">\s*([0-9.]+)\s*$")
    volume = threshold(exprs, "VolumeNearlyFull", r"<\s*([0-9.]+)\s*$")
    cpu = threshold(exprs, "HighCPUUsage", r">\s*([0-9.]+)\s*$")
    backup_age = threshold(exprs, "BackupTooOld", r">\s*([0-9. *]+?)\s*\n")

    api = f"api:http_requests_total{{{POD}}}"
    api_5xx = f'api:http_requests_total{{{POD}, status=~"5.."}}'

    d = (dashboard.Dashboard("Endpoint Statistics").uid("endpoint-statistics")
         .description("endpoint-stats: traffic, errors, latency, Kubernetes resources, PostgreSQL, Redis, "
                      f"backups and alerts. Generated by {SOURCE}: edit that, not this JSON.")
         .tags(["endpoint-stats"]).readonly().tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .time("now-6h", "now").timezone("utc").refresh("30s").version(1).week_start("").fiscal_year_start_month(0)
         .link(dashboard.DashboardLink("Runbooks").type(dm.DashboardLinkType.LINK).icon("doc")
               .tooltip("Runbooks of the alerts").target_blank(True)
               .url("https://github.com/endpoint-stats/endpoint-stats/tree/main/docs/runbooks")
               .as_dropdown(False).include_vars(False).keep_time(False).tags([]))
         .annotation(dashboard.AnnotationQuery().name("Annotations & Alerts").built_in(1).type("dashboard")
                     .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
                     .enable(True).hide(True).icon_color("rgba(0, 211, 255, 1)"))
         .with_variable(variable("namespace", "Namespace", "Namespace(s) of endpoint-stats",
                                 'label_values(up{job="endpoint-stats"}, namespace)'))
         .with_variable(variable("pod", "Pod", "Pods of endpoint-stats",
                                 'label_values(up{job="endpoint-stats", namespace=~"$namespace"}, pod)')))

    d = d.with_row(dashboard.Row("Overview"))
    d = d.with_panel(stat_panel(
        "API request rate", "Requests per second to the API routes (all but /health, /ready, /metrics).",
        [query("A", f"sum(rate({api}[$__rate_interval]))", "req/s")], "reqps", 6))
    d = d.with_panel(stat_panel(
        "API 5xx ratio",
        f"Share of API requests answered with a 5xx status. HighErrorRate fires above {percent(error_5xx)} "
        "for 5 minutes.",
        [query("A", f"(sum(rate({api_5xx}[$__rate_interval])) or vector(0)) / sum(rate({api}[$__rate_interval]))",
               "5xx ratio")],
        "percentunit", 6, thresholds=(("green", None), ("orange", budget), ("red", error_5xx)), decimals=2))
    d = d.with_panel(stat_panel(
        "Availability (30 days)", f"Non-5xx share of API requests over 30 days. SLO: {percent(1 - budget)}.",
        [query("A", f"1 - ((sum(increase({api_5xx}[30d])) or vector(0)) / sum(increase({api}[30d])))",
               "availability")],
        "percentunit", 6, thresholds=(("red", None), ("green", 1 - budget)), decimals=3))
    d = d.with_panel(stat_panel(
        "Healthy scrape targets",
        "Pods of endpoint-stats that Prometheus scrapes successfully (up == 1).",
        [query("A", f'sum(up{{{SVC}}})', "up")], "short", 6, thresholds=(("red", None), ("green", 1))))

    d = d.with_row(dashboard.Row("Traffic"))
    d = d.with_panel(timeseries_panel(
        "Request rate per route", "http_requests_total by route (route templates; unknown paths are 'unmatched').",
        [query("A", f"sum by (route) (rate(http_requests_total{{{SVC}}}[$__rate_interval]))", "{{route}}")],
        "reqps", min0=False))
    d = d.with_panel(timeseries_panel(
        "Responses by status code", "http_requests_total by status code, stacked.",
        [query("A", f"sum by (status) (rate(http_requests_total{{{SVC}}}[$__rate_interval]))", "{{status}}")],
        "reqps", min0=False, stacked=True))
    per_route = f"sum by (route) (rate(http_requests_total{{{SVC}}}[$__rate_interval]))"
    per_route_5xx = f'sum by (route) (rate(http_requests_total{{{SVC}, status=~"5.."}}[$__rate_interval]))'
    d = d.with_panel(timeseries_panel(
        "5xx ratio per route",
        f"Share of 5xx responses per route. The red line is the HighErrorRate threshold ({percent(error_5xx)}).",
        [query("A", f"({per_route_5xx} or 0 * {per_route}) / {per_route}", "{{route}}")],
        "percentunit", thresholds=(("green", None), ("red", error_5xx))))
    d = d.with_panel(timeseries_panel(
        "Error budget burn rate",
        f"Burn rate of the 30-day error budget ({percent(budget)}) per window, from the recording rules. "
        f"ErrorBudgetBurnFast: 1h and 5m above {fast:g}. ErrorBudgetBurnSlow: 6h and 30m above {slow_burn:g}.",
        [query(ref, f'namespace:http_requests_error_ratio:rate{w}{{{NS}}} / {budget:g}', f"{w} {{{{namespace}}}}")
         for ref, w in zip("ABCD", ("5m", "30m", "1h", "6h"))],
        "x", thresholds=(("green", None), ("orange", slow_burn), ("red", fast))))
    d = d.with_panel(timeseries_panel(
        "API latency p50 / p95 / p99",
        "From the http_request_duration_seconds histogram of the API routes. SlowResponseTime fires when "
        f"p95 of a route is above {slow:g}s for 5 minutes.",
        [query(ref, f"histogram_quantile({q}, sum by (le) (rate(api:http_request_duration_seconds_bucket{{{POD}}}"
                    "[$__rate_interval])))", f"p{int(float(q) * 100)}")
         for ref, q in zip("ABC", ("0.50", "0.95", "0.99"))],
        "s", thresholds=(("green", None), ("red", slow))))
    d = d.with_panel(timeseries_panel(
        "p95 latency per route", "95th percentile of http_request_duration_seconds per route.",
        [query("A", f"histogram_quantile(0.95, sum by (route, le) (rate(http_request_duration_seconds_bucket{{{SVC}}}"
                    "[$__rate_interval])))", "{{route}}")], "s"))
    d = d.with_panel(timeseries_panel(
        "In-flight requests", "http_requests_in_flight per pod.",
        [query("A", f"sum by (pod) (http_requests_in_flight{{{SVC}}})", "{{pod}}")], "short"))
    d = d.with_panel(table_panel(
        "Running versions", "endpoint_stats_build_info: replicas per version and revision.",
        query("A", f"count by (version, revision) (endpoint_stats_build_info{{{SVC}}})", "__auto", instant=True),
        ["Time"], 12))

    d = d.with_row(dashboard.Row("Kubernetes"))
    hpa = f"{{{NS}}}"
    d = d.with_panel(timeseries_panel(
        "Replicas and autoscaler", "Available replicas of the Deployment, and the HorizontalPodAutoscaler's current, "
        "desired and maximum replicas (HPAAtMaximum fires after 15 minutes at the maximum).",
        [query("A", f'sum by (deployment) (kube_deployment_status_replicas_available{{{NS}, deployment="endpoint-stats"}})',
               "available ({{deployment}})")]
        + [query(ref, f"sum by (horizontalpodautoscaler) (kube_horizontalpodautoscaler_{metric}{hpa})",
                 f"HPA {what} ({{{{horizontalpodautoscaler}}}})")
           for ref, metric, what in (("B", "status_current_replicas", "current"), ("C", "status_desired_replicas", "desired"),
                                     ("D", "spec_max_replicas", "max"), ("E", "spec_min_replicas", "min"))],
        "short"))
    d = d.with_panel(timeseries_panel(
        "Container restarts (1h)",
        f"Restarts per pod over the last hour (PodRestartingFrequently fires above {restarts:g}).",
        [query("A", f"sum by (pod) (increase(kube_pod_container_status_restarts_total{{{POD}}}[1h]))", "{{pod}}")],
        "short", thresholds=(("green", None), ("red", restarts))))
    # cAdvisor: the app's containers only (not the pod cgroup "" nor the pause container "POD"), and
    # not the kubelet's /metrics/resource copy of the same counters (Prometheus Operator).
    cadvisor = f'{POD}, container!="", container!="POD", metrics_path!="/metrics/resource"'
    resources = lambda resource: [  # noqa: E731
        query(ref, f'sum by (pod) (kube_pod_container_resource_{kind}{{{POD}, resource="{resource}"}})',
              f"{{{{pod}}}} {kind[:-1]}")
        for ref, kind in (("B", "requests"), ("C", "limits"))]
    d = d.with_panel(timeseries_panel(
        "CPU per pod vs requests and limits",
        "CPU used per pod (cAdvisor), against the sum of its containers' requests and limits (kube-state-metrics). "
        f"HighCPUUsage fires above {percent(cpu)} of the limit.",
        [query("A", f"sum by (pod) (rate(container_cpu_usage_seconds_total{{{cadvisor}}}[$__rate_interval]))",
               "{{pod}} used")] + resources("cpu"),
        "cores"))
    memory = resources("memory")
    for q, ref in zip(memory, "CD"):
        q.ref_id(ref)
    d = d.with_panel(timeseries_panel(
        "Memory per pod vs requests and limits",
        "Working set per pod (cAdvisor) and resident memory of the process, against requests and limits.",
        [query("A", f"sum by (pod) (container_memory_working_set_bytes{{{cadvisor}}})", "{{pod}} working set"),
         query("B", f"sum by (pod) (process_resident_memory_bytes{{{SVC}}})", "{{pod}} process RSS")] + memory,
        "bytes"))

    d = d.with_row(dashboard.Row("PostgreSQL"))
    pg = f'job="postgres-exporter", {NS}'
    d = d.with_panel(stat_panel(
        "PostgreSQL", "pg_up from postgres_exporter: can the exporter reach the database?",
        [query("A", f"min(pg_up{{{pg}}})", "pg_up")], "none", 4, h=8, thresholds=(("red", None), ("green", 1)),
        mappings=UP_DOWN))
    d = d.with_panel(timeseries_panel(
        "Connections", "Backends per database (pg_stat_database_numbackends) against max_connections, and the "
        "service's pool (in use / idle).",
        [query("A", f'sum by (datname) (pg_stat_database_numbackends{{{pg}, datname!=""}})', "backends {{datname}}"),
         query("B", f"max(pg_settings_max_connections{{{pg}}})", "max_connections"),
         query("C", f"sum by (state) (endpoint_stats_db_connections{{{SVC}}})", "service pool {{state}}"),
         query("D", f"sum(endpoint_stats_db_pool_max_connections{{{SVC}}})", "service pool max")],
        "short", w=10))
    d = d.with_panel(timeseries_panel(
        "Transactions", "Commits and rollbacks per second per database (pg_stat_database_xact_commit / xact_rollback).",
        [query(ref, f'sum by (datname) (rate(pg_stat_database_xact_{what}{{{pg}, datname!=""}}[$__rate_interval]))',
               f"{what}s {{{{datname}}}}") for ref, what in (("A", "commit"), ("B", "rollback"))],
        "ops", w=10))
    commits = f"endpoint_stats_db_commit_duration_seconds_bucket{{{SVC}}}"
    d = d.with_panel(timeseries_panel(
        "Service commit duration", "Duration of one group commit (endpoint_stats_db_commit_duration_seconds), and "
        "commits per second.",
        [query(ref, f"histogram_quantile({q}, sum by (le) (rate({commits}[$__rate_interval])))", f"p{int(float(q) * 100)}")
         for ref, q in zip("ABC", ("0.50", "0.95", "0.99"))]
        + [query("D", f"sum(rate(endpoint_stats_db_commit_duration_seconds_count{{{SVC}}}[$__rate_interval]))",
                 "commits/s")],
        "s", w=8).override_by_name("commits/s", [dm.DynamicConfigValue(id_val="unit", value="ops"),
                                                  dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right")]))
    d = d.with_panel(timeseries_panel(
        "Service batch size", "Accesses per commit (endpoint_stats_db_batch_size): how well concurrent accesses coalesce.",
        [query("A", f"sum(rate(endpoint_stats_db_batch_size_sum{{{SVC}}}[$__rate_interval])) / "
                    f"sum(rate(endpoint_stats_db_batch_size_count{{{SVC}}}[$__rate_interval]))", "mean"),
         query("B", f"histogram_quantile(0.95, sum by (le) (rate(endpoint_stats_db_batch_size_bucket{{{SVC}}}"
                    "[$__rate_interval])))", "p95")],
        "short", w=8))
    d = d.with_panel(timeseries_panel(
        "Service database errors", "endpoint_stats_db_errors_total per operation.",
        [query("A", f"sum by (operation) (rate(endpoint_stats_db_errors_total{{{SVC}}}[$__rate_interval]))",
               "{{operation}}")], "ops", w=8))

    d = d.with_row(dashboard.Row("Redis"))
    redis = f'job="redis-exporter", {NS}'
    d = d.with_panel(stat_panel(
        "Redis", "redis_up from redis_exporter, and whether the service sees Redis (endpoint_stats_redis_available, "
        "min over pods).",
        [query("A", f"min(redis_up{{{redis}}})", "redis_up"),
         query("B", f"min(endpoint_stats_redis_available{{{SVC}}})", "service")],
        "none", 4, h=8, thresholds=(("red", None), ("green", 1)), mappings=UP_DOWN))
    d = d.with_panel(timeseries_panel(
        "Redis memory", "redis_memory_used_bytes against redis_memory_max_bytes (0 = no limit).",
        [query("A", f"sum(redis_memory_used_bytes{{{redis}}})", "used"),
         query("B", f"sum(redis_memory_max_bytes{{{redis}}})", "max")], "bytes", w=10))
    d = d.with_panel(timeseries_panel(
        "Redis commands and clients", "Commands processed per second and connected clients.",
        [query("A", f"sum(rate(redis_commands_processed_total{{{redis}}}[$__rate_interval]))", "commands/s"),
         query("B", f"sum(redis_connected_clients{{{redis}}})", "clients")], "short", w=10))
    d = d.with_panel(timeseries_panel(
        "Service Redis operations and errors", "endpoint_stats_redis_operations_total and "
        "endpoint_stats_redis_errors_total per operation.",
        [query("A", f"sum by (operation) (rate(endpoint_stats_redis_operations_total{{{SVC}}}[$__rate_interval]))",
               "{{operation}}"),
         query("B", f"sum by (operation) (rate(endpoint_stats_redis_errors_total{{{SVC}}}[$__rate_interval]))",
               "errors {{operation}}")], "ops", w=24))

    d = d.with_row(dashboard.Row("Alerts"))
    d = d.with_panel(table_panel(
        "Firing alerts", 'ALERTS{alertstate="firing"}: every alert that fires now, across namespaces (Watchdog always fires).',
        query("A", 'ALERTS{alertstate="firing"}', "__auto", instant=True),
        ["Time", "Value", "__name__", "alertstate"], 24))

    # The alerts below had no panel to look at when they fire.
    d = d.with_row(dashboard.Row("Backups and volumes"))
    d = d.with_panel(timeseries_panel(
        "Time since the last successful run",
        "Per CronJob (kube-state-metrics). BackupTooOld fires when that of endpoint-stats-backup "
        f"passes {hours(backup_age)} (red line).",
        [query("A", f'time() - max by (cronjob) (kube_cronjob_status_last_successful_time{{job="kube-state-metrics", {NS}}})',
               "{{cronjob}}")],
        "s", w=8, thresholds=(("green", None), ("red", backup_age))))
    d = d.with_panel(timeseries_panel(
        "Failed Jobs since the last success",
        "Failed pods of each CronJob's Jobs that started after its last success (the recording rule the alerts "
        "read): BackupFailed, BackupVerificationFailed and MaintenanceFailed fire while it is above 0.",
        [query("A", f"sum by (cronjob) (namespace_cronjob_job_name:kube_job_status_failed:since_last_success{{{NS}}})",
               "{{cronjob}}")],
        "short", w=8, thresholds=(("green", None), ("red", 1))))
    d = d.with_panel(timeseries_panel(
        "Volume space left",
        f"Free share of each PersistentVolumeClaim (kubelet). VolumeNearlyFull fires below {percent(volume)} "
        "for 5 minutes.",
        [query("A", f"namespace_persistentvolumeclaim:kubelet_volume_stats_available:ratio{{{NS}}}",
               "{{persistentvolumeclaim}}")],
        "percentunit", w=8, maximum=1, thresholds=(("red", None), ("green", volume))))

    return d.build()


def render(rules=RULES):
    model = build(alert_exprs(rules))
    # Panel ids in order, rows included: stable, and what links to a panel (viewPanel=N) use.
    for n, panel in enumerate(model.panels, start=1):
        panel.id_val = n
    return json.dumps(model, cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"write {os.path.relpath(OUT, HERE)}")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when the JSON differs")
    mode.add_argument("--print", action="store_true", help="print the JSON")
    ap.add_argument("--dashboard", default=OUT, help="the JSON to write or check (default: the committed one)")
    ap.add_argument("--rules", default=RULES, help="rules file the thresholds are read from")
    args = ap.parse_args()
    text = render(args.rules)
    shown = os.path.relpath(args.dashboard)
    shown = args.dashboard if shown.startswith("..") else shown
    if args.print:
        sys.stdout.write(text)
    elif args.write:
        with open(args.dashboard, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {shown}")
    else:
        with open(args.dashboard, encoding="utf-8") as f:
            committed = f.read()
        if committed != text:
            diff = difflib.unified_diff(committed.splitlines(), text.splitlines(),
                                        f"{shown} (committed)", f"{SOURCE} (generated)", lineterm="")
            print(f"FAIL {shown} is not the output of {SOURCE}; regenerate it with --write:")
            print("\n".join(list(diff)[:40]))
            sys.exit(1)
        print(f"ok   {shown} is the output of {SOURCE}")


if __name__ == "__main__":
    main()
