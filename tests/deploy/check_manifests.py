#!/usr/bin/env python3
"""Cross-checks over one rendered kustomization (`kubectl kustomize DIR > FILE`):

  - the objects the system needs exist (docs/CONTRACT.md, SPEC section 6);
  - the service's probes, ports, scrape annotations and Service agree with the binary's
    defaults ($ENDPOINT_STATS_BIN --help when that file exists, else docs/CONTRACT.md), and the
    subcommands and flags the init container and CronJobs use exist;
  - every container has requests and limits, the restricted security context and a pinned
    image; service account tokens only where needed;
  - the pods that share a ReadWriteOnce claim are kept on one node;
  - the ConfigMaps generated from the monitoring sources are byte-identical to them, and the
    paths those files name (rule_files, api_url_file, dashboard folder, --config.file) are where
    the manifests mount them; the hosts they name are Services of the render;
  - the NetworkPolicies allow the flows the system needs and deny a few it must not have;
  - least privilege: every client of PostgreSQL connects as its own role of
    base/postgres/roles.sql (never the administrator), which the Job endpoint-stats-db-roles
    creates from the very file; Redis requires a password from a Secret and every client sends
    it; Prometheus' RBAC grants exactly what its scrape jobs use (derived from prometheus.yml),
    namespaced where they are, and its egress reaches no public address.

Usage: check_manifests.py RENDERED.yaml --variant base|minikube|production|operator|external-postgres
                          [--repo-root DIR] [--monitoring-dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import ipaddress
import posixpath
import re
import sys
from pathlib import Path

import yaml

sys.dont_write_bytecode = True  # no __pycache__ inside the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))
import k8slib  # noqa: E402
from k8slib import Pod, Report, containers, label, pod_template, resolve_port, selects  # noqa: E402

NAMESPACE = "endpoint-stats"
# pods that talk to the API server and therefore mount their service account token
TOKEN_ALLOWED = {"prometheus", "kube-state-metrics"}

# ConfigMap -> {key: path under deploy/kubernetes/base/monitoring/}
GENERATED = {
    "prometheus-config": {"prometheus.yml": "prometheus/prometheus.yml"},
    "prometheus-rules": {"endpoint-stats.rules.yml": "prometheus/rules/endpoint-stats.rules.yml"},
    "alertmanager-config": {"alertmanager.yml": "alertmanager/alertmanager.yml"},
    "grafana-datasources": {"datasources.yml": "grafana/datasources.yml"},
    "grafana-dashboards-provider": {"dashboards.yml": "grafana/dashboards.yml"},
    "grafana-dashboards": {"endpoint-statistics.json": "grafana/dashboards/endpoint-statistics.json"},
}

# Least privilege (base/postgres/roles.sql): the Secret key holding each role's URL, and the role
# each client of PostgreSQL must connect as: (kind, workload, container) -> role.
ROLE_KEYS = {
    "endpoint_stats_app": "DATABASE_URL",
    "endpoint_stats_owner": "OWNER_DATABASE_URL",
    "endpoint_stats_backup": "BACKUP_DATABASE_URL",
    "endpoint_stats_verify": "VERIFY_DATABASE_URL",
    "endpoint_stats_monitor": "MONITOR_DATABASE_URL",
}
DB_CLIENTS = {
    ("Deployment", "endpoint-stats", "migrate"): "endpoint_stats_owner",
    ("Deployment", "endpoint-stats", "endpoint-stats"): "endpoint_stats_app",
    ("CronJob", "endpoint-stats-backup", "backup"): "endpoint_stats_backup",
    ("CronJob", "endpoint-stats-verify-backup", "verify-backup"): "endpoint_stats_verify",
    ("CronJob", "endpoint-stats-maintenance", "maintenance"): "endpoint_stats_owner",
    ("CronJob", "endpoint-stats-health-check", "health-check"): "endpoint_stats_app",
    ("CronJob", "endpoint-stats-deploy-gate", "deploy-gate"): "endpoint_stats_app",
    ("Deployment", "postgres-exporter", "postgres-exporter"): "endpoint_stats_monitor",
}
DB_URL_VARS = ("DATABASE_URL", "DATA_SOURCE_NAME")
# who may read the administrator's Secret
DB_ADMIN_READERS = {("StatefulSet", "postgres"), ("Job", "endpoint-stats-db-roles")}
ROLES_FILES = {"roles.sql": "deploy/kubernetes/base/postgres/roles.sql",
               "apply-roles.sh": "deploy/kubernetes/base/postgres/apply-roles.sh"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--variant", required=True, choices=["base", "minikube", "production", "operator", "external-postgres"])
    ap.add_argument("--repo-root", default=str(Path(__file__).resolve().parents[2]))
    ap.add_argument("--monitoring-dir", help="monitoring sources (default: REPO/deploy/kubernetes/base/monitoring)")
    args = ap.parse_args()

    repo = Path(args.repo_root)
    monitoring = Path(args.monitoring_dir) if args.monitoring_dir else repo / "deploy/kubernetes/base/monitoring"
    docs = k8slib.load_docs(args.rendered)
    r = Report(f"manifests[{args.variant}]")
    objs = k8slib.index(docs)

    check_objects(r, objs, docs, args.variant)
    check_service_contract(r, objs, repo)
    check_containers(r, docs)
    check_labels(r, docs)
    check_shared_rwo_claims(r, docs, objs)
    check_services_resolve(r, docs)
    check_generated_configmaps(r, objs, monitoring)
    check_paths(r, objs, docs)
    check_network(r, docs, args.variant)
    check_images_agree(r, docs, repo)
    check_database_roles(r, objs, docs, repo)
    check_redis_auth(r, objs, docs)
    check_prometheus_rbac(r, objs, docs)
    check_prometheus_egress(r, docs)
    if args.variant == "operator":
        check_servicemonitors(r, docs)
    return r.finish()


# ------------------------------------------------------------------ objects


def check_objects(r: Report, objs: dict, docs: list[dict], variant: str) -> None:
    required = [
        ("Namespace", NAMESPACE),
        ("Deployment", "endpoint-stats"), ("Service", "endpoint-stats"),
        ("HorizontalPodAutoscaler", "endpoint-stats"), ("PodDisruptionBudget", "endpoint-stats"),
        ("Deployment", "redis"), ("Service", "redis"), ("PersistentVolumeClaim", "redis-data"),
        ("Deployment", "postgres-exporter"), ("Service", "postgres-exporter"),
        ("Deployment", "redis-exporter"), ("Service", "redis-exporter"),
        ("Deployment", "prometheus"), ("Service", "prometheus"), ("PersistentVolumeClaim", "prometheus-pvc"),
        ("ServiceAccount", "prometheus"), ("ClusterRole", "endpoint-stats-prometheus"),
        ("ClusterRoleBinding", "endpoint-stats-prometheus"), ("Role", "prometheus"), ("RoleBinding", "prometheus"),
        ("Job", "endpoint-stats-db-roles"), ("ConfigMap", "postgres-roles"),
        ("Deployment", "alertmanager"), ("Service", "alertmanager"),
        ("Deployment", "grafana"), ("Service", "grafana"),
        ("Deployment", "kube-state-metrics"), ("Service", "kube-state-metrics"),
        ("ClusterRole", "endpoint-stats-kube-state-metrics"), ("ClusterRoleBinding", "endpoint-stats-kube-state-metrics"),
        ("ServiceAccount", "maintenance-sa"), ("Role", "maintenance"), ("RoleBinding", "maintenance"),
        ("PersistentVolumeClaim", "endpoint-stats-backups"),
        ("CronJob", "endpoint-stats-backup"), ("CronJob", "endpoint-stats-verify-backup"),
        ("CronJob", "endpoint-stats-maintenance"), ("CronJob", "endpoint-stats-health-check"),
        ("CronJob", "endpoint-stats-deploy-gate"),
        ("NetworkPolicy", "default-deny-all"),
        *[("ConfigMap", name) for name in GENERATED],
    ]
    if variant != "external-postgres":
        required += [("StatefulSet", "postgres"), ("Service", "postgres"), ("Service", "db")]
    else:
        r.check(("StatefulSet", "postgres") not in objs, "external-postgres still renders the bundled StatefulSet")
        r.check(("Service", "db") not in objs, "external-postgres still renders Service db")
    if variant != "base":
        required += [("Secret", "endpoint-stats-db"), ("Secret", "endpoint-stats-db-admin"), ("Secret", "endpoint-stats-redis"),
                     ("Secret", "alertmanager-slack"), ("Secret", "grafana-admin")]
    if variant == "operator":
        required += [("ServiceMonitor", n) for n in ("kube-state-metrics", "postgres-exporter", "redis-exporter")]
    for kind, name in required:
        r.check((kind, name) in objs, f"missing {kind}/{name}")

    for doc in docs:
        kind, name = k8slib.key(doc)
        cluster_scoped = kind in {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
        ns = doc["metadata"].get("namespace")
        r.check(cluster_scoped or ns == NAMESPACE, f"{kind}/{name} is in namespace {ns!r}, not {NAMESPACE}")
        if kind in {"ClusterRoleBinding", "RoleBinding"}:
            for s in doc.get("subjects") or []:
                if s.get("kind") == "ServiceAccount":
                    r.check(("ServiceAccount", s["name"]) in objs and s.get("namespace") == NAMESPACE,
                            f"{kind}/{name} binds ServiceAccount {s.get('namespace')}/{s['name']}, not one of this render")

    if ("Secret", "alertmanager-slack") in objs:
        # One webhook per Slack channel, each a key of the Secret (a Slack app's webhook decides
        # the channel, so receivers cannot share one).
        keys = set(objs[("Secret", "alertmanager-slack")].get("data") or {})
        am_text = ((objs.get(("ConfigMap", "alertmanager-config")) or {}).get("data") or {}).get("alertmanager.yml") or ""
        receivers = (yaml.safe_load(am_text) or {}).get("receivers") or []
        webhooks = [posixpath.basename(str(sc.get("api_url_file") or "")) for rc in receivers for sc in rc.get("slack_configs") or []]
        r.check(bool(webhooks) and len(set(webhooks)) == len(webhooks),
                f"every Slack receiver needs a webhook file of its own, alertmanager.yml has {webhooks}")
        for webhook in webhooks:
            r.check(webhook in keys, f"Secret alertmanager-slack lacks key {webhook} (it has {sorted(keys)})")
    for secret, keys in (("endpoint-stats-db", sorted(ROLE_KEYS.values())),
                         ("endpoint-stats-db-admin", ["POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"]),
                         ("endpoint-stats-redis", ["REDIS_PASSWORD"])):
        if ("Secret", secret) in objs:
            data = objs[("Secret", secret)].get("data") or {}
            for k in keys:
                r.check(k in data, f"Secret {secret} lacks key {k}")

    # the service's rollout, autoscaling and disruption budget
    dep = objs.get(("Deployment", "endpoint-stats"))
    if dep:
        spec = dep["spec"]
        ru = spec.get("strategy", {}).get("rollingUpdate", {})
        r.check(spec.get("replicas") == 3, f"Deployment endpoint-stats replicas {spec.get('replicas')}, expected 3")
        r.check(spec.get("strategy", {}).get("type") == "RollingUpdate" and ru.get("maxSurge") == 1 and ru.get("maxUnavailable") == 0,
                f"Deployment endpoint-stats strategy must be RollingUpdate maxSurge 1 maxUnavailable 0, got {spec.get('strategy')}")
        tpl = spec["template"]
        r.check(bool(tpl["spec"].get("topologySpreadConstraints")), "Deployment endpoint-stats has no topologySpreadConstraints")
        r.check(selects(spec["selector"], tpl["metadata"]["labels"]), "Deployment endpoint-stats selector does not select its pods")
    hpa = objs.get(("HorizontalPodAutoscaler", "endpoint-stats"))
    if hpa:
        s = hpa["spec"]
        r.check(hpa["apiVersion"] == "autoscaling/v2", "HPA must be autoscaling/v2")
        r.check(s["scaleTargetRef"].get("kind") == "Deployment" and s["scaleTargetRef"].get("name") == "endpoint-stats",
                "HPA does not target Deployment endpoint-stats")
        r.check(s.get("minReplicas") == 2 and s.get("maxReplicas") == 10, "HPA must scale 2..10")
        resources = {m["resource"]["name"] for m in s.get("metrics", []) if m.get("type") == "Resource"}
        r.check(resources == {"cpu", "memory"}, f"HPA must scale on cpu and memory, got {sorted(resources)}")
    pdb = objs.get(("PodDisruptionBudget", "endpoint-stats"))
    if pdb and dep:
        r.check(selects(pdb["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"]),
                "PodDisruptionBudget endpoint-stats does not select the service's pods")
    sts = objs.get(("StatefulSet", "postgres"))
    if sts:
        r.check(bool(sts["spec"].get("volumeClaimTemplates")), "StatefulSet postgres has no volumeClaimTemplates")
        svc = objs.get(("Service", sts["spec"].get("serviceName", "")))
        r.check(svc is not None and svc["spec"].get("clusterIP") == "None",
                f"StatefulSet postgres's serviceName {sts['spec'].get('serviceName')!r} is not a headless Service of the render")
    redis = objs.get(("Deployment", "redis"))
    if redis:
        c = redis["spec"]["template"]["spec"]["containers"][0]
        argv = c.get("command", []) + c.get("args", [])
        r.check("--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes", "Redis runs without --appendonly yes")
        claims = [v["persistentVolumeClaim"]["claimName"] for v in redis["spec"]["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in v]
        r.check(claims == ["redis-data"], "Redis does not keep its data on PVC redis-data")

    crons = {
        "endpoint-stats-backup": ["backup", "--dir", "/backups", "--retention-days", "10"],
        "endpoint-stats-verify-backup": ["verify-backup", "--dir", "/backups"],
        "endpoint-stats-maintenance": ["maintain"],
        "endpoint-stats-health-check": ["check", "--replicas-dns", "http://endpoint-stats-pods:9999", "--prometheus", "http://prometheus:9090",
                                        "--alertmanager", "http://alertmanager:9093", "--backup-dir", "/backups"],
        "endpoint-stats-deploy-gate": ["check", "--replicas-dns", "http://endpoint-stats-pods:9999", "--timeout-secs", "5"],
    }
    for name, argv in crons.items():
        cj = objs.get(("CronJob", name))
        if not cj:
            continue
        pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        r.check(c.get("args") == argv, f"CronJob {name} runs {c.get('args')}, expected {argv}")
        r.check(pod.get("serviceAccountName") == "maintenance-sa", f"CronJob {name} does not run as maintenance-sa")
        r.check(cj["spec"].get("concurrencyPolicy") == "Forbid", f"CronJob {name} may overlap itself (concurrencyPolicy)")
        r.check(bool(cj["spec"].get("suspend")) == (name == "endpoint-stats-deploy-gate"),
                f"CronJob {name}: only the deploy gate template is suspended")
        if "/backups" in argv:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            vol = vols.get(mounts.get("/backups", ""), {})
            r.check(vol.get("persistentVolumeClaim", {}).get("claimName") == "endpoint-stats-backups",
                    f"CronJob {name} does not mount PVC endpoint-stats-backups at /backups")


# ------------------------------------------------------------------ the service vs the binary


def check_service_contract(r: Report, objs: dict, repo: Path) -> None:
    table = k8slib.contract_table(repo)
    binary = k8slib.Binary()
    if binary.available and binary.help():
        source = f"{binary.path} --help"
        port = binary.default_of("--port")
        grace = binary.default_of("--shutdown-grace-secs")
        env_names = binary.env_names()
        r.check(port is not None, f"{source} shows no default for --port")
    else:
        source = "docs/CONTRACT.md"
        r.note(f"ENDPOINT_STATS_BIN is not an executable file ({binary.path or 'unset'}): defaults taken from docs/CONTRACT.md")
        port = table.get("PORT", {}).get("default")
        grace = table.get("SHUTDOWN_GRACE_SECS", {}).get("default")
        env_names = set(table)
    r.check(port is not None and str(port).isdigit(), f"no port default found in {source}")
    if port is None or not str(port).isdigit():
        return
    port = int(port)
    r.note(f"service port {port}, shutdown grace {grace}s (from {source})")

    dep = objs.get(("Deployment", "endpoint-stats"))
    svc = objs.get(("Service", "endpoint-stats"))
    if not dep:
        return
    tpl = dep["spec"]["template"]
    spec = tpl["spec"]
    main = next((c for c in spec["containers"] if c["name"] == "endpoint-stats"), None)
    if not r.check(main is not None, "Deployment endpoint-stats has no container endpoint-stats"):
        return
    cports = [p["containerPort"] for p in main.get("ports", [])]
    r.check(cports == [port], f"container endpoint-stats exposes {cports}, the binary listens on {port}")
    env = {e["name"]: e for e in main.get("env", [])}
    if "PORT" in env:
        r.check(env["PORT"].get("value") == str(port), f"PORT env {env['PORT'].get('value')} != {port}")
    for name in binary_env(main):
        r.check(name in env_names, f"container endpoint-stats sets {name}, which {source} does not list")
    for init in spec.get("initContainers", []):
        for name in binary_env(init):
            r.check(name in env_names, f"init container {init['name']} sets {name}, which {source} does not list")

    probes = {
        "livenessProbe": {"/health"},
        "readinessProbe": {"/ready"},
        "startupProbe": {"/health", "/ready"},
    }
    for probe, paths in probes.items():
        p = main.get(probe)
        if not r.check(p is not None and "httpGet" in p, f"container endpoint-stats has no HTTP {probe}"):
            continue
        r.check(p["httpGet"].get("path") in paths, f"{probe} path {p['httpGet'].get('path')}, expected one of {sorted(paths)}")
        r.check(resolve_port(p["httpGet"]["port"], spec) == port, f"{probe} port {p['httpGet']['port']} does not resolve to {port}")

    ann = tpl["metadata"].get("annotations") or {}
    r.check(ann.get("prometheus.io/scrape") == "true", "pod annotation prometheus.io/scrape must be \"true\"")
    r.check(ann.get("prometheus.io/port") == str(port), f"pod annotation prometheus.io/port {ann.get('prometheus.io/port')!r} != {port}")
    r.check(ann.get("prometheus.io/path") == "/metrics", f"pod annotation prometheus.io/path {ann.get('prometheus.io/path')!r} != /metrics")
    r.check(label(tpl) == "endpoint-stats", "service pods lack label app.kubernetes.io/name: endpoint-stats (the Prometheus job)")

    if r.check(svc is not None, "no Service endpoint-stats"):
        sp = svc["spec"]["ports"]
        r.check(len(sp) == 1 and sp[0]["port"] == port and resolve_port(sp[0].get("targetPort", sp[0]["port"]), spec) == port,
                f"Service endpoint-stats ports {sp} do not lead to {port}")

    # graceful shutdown: preStop sleep + drain fits in the pod's grace period
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    r.check(tgps == 30, f"terminationGracePeriodSeconds {tgps}, expected 30")
    pre = (main.get("lifecycle") or {}).get("preStop") or {}
    sleep = (pre.get("sleep") or {}).get("seconds")
    r.check(sleep is not None and sleep > 0, "container endpoint-stats has no preStop sleep")
    drain = int(env.get("SHUTDOWN_GRACE_SECS", {}).get("value") or grace or 0)
    r.check((sleep or 0) + drain < tgps, f"preStop sleep {sleep}s + drain {drain}s does not fit in the grace period {tgps}s")

    # subcommands, flags and environment used by the init container and the CronJobs
    uses: list[tuple[str, list[str], list[str]]] = []
    for init in spec.get("initContainers", []):
        uses.append((f"init container {init['name']}", init.get("args", []), binary_env(init)))
    uses.append(("container endpoint-stats", main.get("args", []), binary_env(main)))
    for (kind, name), doc in objs.items():
        if kind == "CronJob":
            for c in doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
                uses.append((f"CronJob {name}", c.get("args", []), binary_env(c)))
    subcommands = k8slib.contract_subcommands(repo)
    for where, argv, env_used in uses:
        if not argv:
            continue
        r.check(argv[0] in subcommands, f"{where} runs subcommand {argv[0]!r}, not in docs/CONTRACT.md {sorted(subcommands)}")
        if binary.available and binary.help():
            text = binary.help(argv[0])
            if not r.check(bool(text), f"{where}: `{binary.path} {argv[0]} --help` fails"):
                continue
            for flag in (a for a in argv[1:] if a.startswith("--")):
                r.check(re.search(re.escape(flag) + r"\b", text) is not None, f"{where} passes {flag}, unknown to `{argv[0]} --help`")
            known = binary.env_names(argv[0])
            for name in env_used:
                r.check(name in known, f"{where} sets {name}, which `{argv[0]} --help` does not list")


def binary_env(container: dict) -> list[str]:
    """The environment variables a container hands to the binary: all of them but those only
    used to compose another one (`$(REDIS_PASSWORD)` inside REDIS_URL), which the kubelet expands."""
    env = container.get("env") or []
    composed = {m for e in env for m in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(e.get("value") or ""))}
    return [e["name"] for e in env if e["name"] not in composed]


# ------------------------------------------------------------------ containers


def check_containers(r: Report, docs: list[dict]) -> None:
    for doc, tpl in k8slib.workloads(docs):
        kind, name = k8slib.key(doc)
        spec = tpl["spec"]
        psc = spec.get("securityContext") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            r.check(not spec.get(flag), f"{kind}/{name} sets {flag}")
        for v in spec.get("volumes") or []:
            r.check("hostPath" not in v, f"{kind}/{name} mounts hostPath {v['name']}")
        token = spec.get("automountServiceAccountToken")
        if label(tpl) in TOKEN_ALLOWED:
            r.check(token is True, f"{kind}/{name} needs its token and must say so (automountServiceAccountToken: true)")
        else:
            r.check(token is False, f"{kind}/{name} must set automountServiceAccountToken: false")
        for where, c in containers(spec):
            what = f"{kind}/{name} {where} {c['name']}"
            res = c.get("resources") or {}
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    r.check(resource in (res.get(section) or {}), f"{what} lacks resources.{section}.{resource}")
            sc = c.get("securityContext") or {}
            r.check(sc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation must be false")
            r.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{what}: capabilities must drop ALL")
            r.check(not (sc.get("capabilities") or {}).get("add"), f"{what}: adds capabilities")
            r.check(not sc.get("privileged"), f"{what}: privileged")
            r.check(sc.get("readOnlyRootFilesystem") is True, f"{what}: readOnlyRootFilesystem must be true")
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            r.check(non_root is True, f"{what}: runAsNonRoot must be true")
            uid = sc.get("runAsUser", psc.get("runAsUser"))
            r.check(uid is None or uid != 0, f"{what}: runs as UID 0")
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            r.check(seccomp == "RuntimeDefault", f"{what}: seccompProfile must be RuntimeDefault, got {seccomp}")
            image = c.get("image", "")
            r.check(image_pinned(image), f"{what}: image {image!r} is not pinned to a version")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                p = c.get(probe) or {}
                for handler in ("httpGet", "tcpSocket"):
                    if handler in p:
                        r.check(resolve_port(p[handler]["port"], spec) is not None,
                                f"{what} {probe} port {p[handler]['port']} is no port of the pod")


def image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.rsplit(":", 1)[1]
    return bool(tag) and tag != "latest"


def check_labels(r: Report, docs: list[dict]) -> None:
    for doc in docs:
        kind, name = k8slib.key(doc)
        labels = doc["metadata"].get("labels") or {}
        r.check(labels.get("app.kubernetes.io/part-of") == "endpoint-stats", f"{kind}/{name} lacks app.kubernetes.io/part-of: endpoint-stats")
        if kind in k8slib.WORKLOAD_KINDS | {"Service", "ServiceAccount", "PersistentVolumeClaim"}:
            r.check("app.kubernetes.io/name" in labels, f"{kind}/{name} lacks app.kubernetes.io/name")
        tpl = pod_template(doc)
        if tpl is not None:
            r.check("app.kubernetes.io/name" in (tpl["metadata"].get("labels") or {}), f"{kind}/{name}'s pods lack app.kubernetes.io/name")


def check_shared_rwo_claims(r: Report, docs: list[dict], objs: dict) -> None:
    """A ReadWriteOnce claim attaches to one node at a time. When the pods of several workloads
    mount it (the backup, verify and health-check Jobs), a pod started on another node while one
    of them runs would hang on a multi-attach error; a required pod affinity on the node
    (topologyKey hostname) to every pod that mounts it, its own kind included, keeps them on one
    node. The scheduler lets the first of them go anywhere."""
    users: dict[str, list[tuple[str, dict]]] = {}
    for doc, tpl in k8slib.workloads(docs):
        for volume in tpl["spec"].get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim:
                users.setdefault(claim, []).append(("{}/{}".format(*k8slib.key(doc)), tpl))
    for claim, mounters in sorted(users.items()):
        pvc = objs.get(("PersistentVolumeClaim", claim))
        if pvc is None or set(pvc["spec"].get("accessModes") or []) != {"ReadWriteOnce"} or len(mounters) < 2:
            continue
        for where, tpl in mounters:
            terms = (((tpl["spec"].get("affinity") or {}).get("podAffinity") or {})
                     .get("requiredDuringSchedulingIgnoredDuringExecution") or [])
            node_terms = [t for t in terms if t.get("topologyKey") == "kubernetes.io/hostname"]
            apart = [other for other, other_tpl in mounters
                     if not any(selects(t.get("labelSelector"), other_tpl["metadata"].get("labels") or {}) for t in node_terms)]
            r.check(not apart, f"{where} mounts ReadWriteOnce claim {claim} with no required pod affinity on the node "
                               f"(topologyKey kubernetes.io/hostname) to the pods of {', '.join(apart)}: they may land on two nodes")


def check_services_resolve(r: Report, docs: list[dict]) -> None:
    pods = [(d, t) for d, t in k8slib.workloads(docs) if d["kind"] != "CronJob"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        name = svc["metadata"]["name"]
        selected = [t for _, t in pods if k8slib.service_selects(svc["spec"].get("selector"), t["metadata"].get("labels") or {})]
        if not r.check(bool(selected), f"Service {name} selects no pod of the render"):
            continue
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            r.check(all(resolve_port(target, t["spec"]) is not None for t in selected),
                    f"Service {name} port {p['port']} -> targetPort {target} is no container port of its pods")


# ------------------------------------------------------------------ monitoring sources


def check_generated_configmaps(r: Report, objs: dict, monitoring: Path) -> None:
    for cm, files in GENERATED.items():
        doc = objs.get(("ConfigMap", cm))
        if doc is None:
            continue
        data = doc.get("data") or {}
        for k, rel in files.items():
            source = monitoring / rel
            if not r.check(source.is_file(), f"monitoring source {rel} is missing"):
                continue
            r.check(k in data and data[k].encode("utf-8") == source.read_bytes(),
                    f"ConfigMap {cm} key {k} is not byte-identical to {rel}")
        r.check(set(data) == set(files), f"ConfigMap {cm} has keys {sorted(data)}, expected {sorted(files)}")
    # a new rules file or dashboard must not be forgotten by the kustomization
    for pattern, cm in (("prometheus/rules/*.yml", "prometheus-rules"), ("prometheus/rules/*.yaml", "prometheus-rules"),
                        ("grafana/dashboards/*.json", "grafana-dashboards")):
        for f in sorted(monitoring.glob(pattern)):
            rel = f.relative_to(monitoring).as_posix()
            r.check(rel in GENERATED[cm].values() and ("ConfigMap", cm) in objs, f"{rel} is not generated into ConfigMap {cm}")


def mounted_files(spec: dict, container: dict, objs: dict) -> dict[str, tuple[str, str, str]]:
    """Absolute path -> (kind, name, key) of every ConfigMap/Secret key a container sees
    (configMap, secret and projected volumes; keys of a source without items come from the
    rendered object, or '*' when the Secret is not part of the render)."""
    vols = {v["name"]: v for v in spec.get("volumes") or []}
    files: dict[str, tuple[str, str, str]] = {}
    for m in container.get("volumeMounts") or []:
        vol = vols.get(m["name"], {})
        base = m["mountPath"].rstrip("/")
        if m.get("subPath"):
            continue  # subPath mounts never see updates: not used for configuration here
        sources = []
        if "configMap" in vol:
            sources.append(("ConfigMap", vol["configMap"]["name"], vol["configMap"].get("items")))
        if "secret" in vol:
            sources.append(("Secret", vol["secret"]["secretName"], vol["secret"].get("items")))
        for src in (vol.get("projected") or {}).get("sources") or []:
            if "configMap" in src:
                sources.append(("ConfigMap", src["configMap"]["name"], src["configMap"].get("items")))
            if "secret" in src:
                sources.append(("Secret", src["secret"]["name"], src["secret"].get("items")))
        for kind, name, items in sources:
            if items:
                pairs = [(i["key"], i["path"]) for i in items]
            else:
                obj = objs.get((kind, name))
                pairs = [(k, k) for k in ((obj or {}).get("data") or {})] if obj else [("*", "*")]
            for k, path in pairs:
                files[f"{base}/{path}"] = (kind, name, k)
    return files


def file_is_mounted(r: Report, objs: dict, spec: dict, container: dict, path: str, kind: str, name: str, what: str) -> None:
    files = mounted_files(spec, container, objs)
    src = files.get(path) or files.get(posixpath.join(posixpath.dirname(path), "*"))
    r.check(src is not None and src[:2] == (kind, name),
            f"{what}: {path} is not a key of {kind} {name} mounted in container {container['name']} (it sees {sorted(files)})")


def check_paths(r: Report, objs: dict, docs: list[dict]) -> None:
    cm = lambda name, key: yaml.safe_load(((objs.get(("ConfigMap", name)) or {}).get("data") or {}).get(key) or "null")  # noqa: E731

    prom = objs.get(("Deployment", "prometheus"))
    prom_cfg = cm("prometheus-config", "prometheus.yml")
    if prom and isinstance(prom_cfg, dict):
        spec = prom["spec"]["template"]["spec"]
        c = next(c for c in spec["containers"] if c["name"] == "prometheus")
        flags = dict(a.split("=", 1) for a in c.get("args", []) if a.startswith("--") and "=" in a)
        file_is_mounted(r, objs, spec, c, flags.get("--config.file", "?"), "ConfigMap", "prometheus-config", "Prometheus --config.file")
        r.check("--web.enable-lifecycle" in c.get("args", []), "Prometheus lacks --web.enable-lifecycle (the config-reloader calls /-/reload)")
        files = mounted_files(spec, c, objs)
        loaded = {src[2] for path, src in files.items() if src[1] == "prometheus-rules"
                  and any(fnmatch.fnmatch(path, pattern) for pattern in prom_cfg.get("rule_files") or [])}
        rules_cm = set(((objs.get(("ConfigMap", "prometheus-rules")) or {}).get("data") or {}))
        r.check(bool(rules_cm) and loaded == rules_cm,
                f"rule_files {prom_cfg.get('rule_files')} load keys {sorted(loaded)} of ConfigMap prometheus-rules, which has {sorted(rules_cm)}")
        needs_token = "/var/run/secrets/kubernetes.io/serviceaccount" in yaml.safe_dump(prom_cfg)
        if needs_token:
            r.check(spec.get("automountServiceAccountToken") is True, "prometheus.yml reads the service account token, the pod does not mount it")
        for job in prom_cfg.get("scrape_configs") or []:
            for sd in job.get("kubernetes_sd_configs") or []:
                names = (sd.get("namespaces") or {}).get("names")
                if names:
                    r.check(NAMESPACE in names, f"job {job['job_name']} discovers namespaces {names}, not {NAMESPACE}")
        targets = []
        for job in prom_cfg.get("scrape_configs") or []:
            for sc in job.get("static_configs") or []:
                targets += [(job["job_name"], t) for t in sc.get("targets") or []]
        for am in (prom_cfg.get("alerting") or {}).get("alertmanagers") or []:
            for sc in am.get("static_configs") or []:
                targets += [("alerting", t) for t in sc.get("targets") or []]
        for job, target in targets:
            check_target(r, objs, job, target, spec)

    am = objs.get(("Deployment", "alertmanager"))
    am_cfg = cm("alertmanager-config", "alertmanager.yml")
    if am and isinstance(am_cfg, dict):
        spec = am["spec"]["template"]["spec"]
        c = next(c for c in spec["containers"] if c["name"] == "alertmanager")
        flags = dict(a.split("=", 1) for a in c.get("args", []) if a.startswith("--") and "=" in a)
        file_is_mounted(r, objs, spec, c, flags.get("--config.file", "?"), "ConfigMap", "alertmanager-config", "Alertmanager --config.file")
        files = sorted(set(find_file_refs(am_cfg)))
        r.check(bool(files), "alertmanager.yml names no *_file (the Slack webhook must come from a file)")
        for path in files:
            file_is_mounted(r, objs, spec, c, path, "Secret", "alertmanager-slack", "alertmanager.yml")

    graf = objs.get(("Deployment", "grafana"))
    provider = cm("grafana-dashboards-provider", "dashboards.yml")
    datasources = cm("grafana-datasources", "datasources.yml")
    if graf and isinstance(provider, dict):
        spec = graf["spec"]["template"]["spec"]
        c = next(c for c in spec["containers"] if c["name"] == "grafana")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        prov = env.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning").rstrip("/")
        files = mounted_files(spec, c, objs)
        for sub, cmname in (("datasources", "grafana-datasources"), ("dashboards", "grafana-dashboards-provider")):
            keys = set(((objs.get(("ConfigMap", cmname)) or {}).get("data") or {}))
            for k in sorted(keys):
                file_is_mounted(r, objs, spec, c, f"{prov}/{sub}/{k}", "ConfigMap", cmname, f"Grafana {sub} provisioning")
        dashboards = set(((objs.get(("ConfigMap", "grafana-dashboards")) or {}).get("data") or {}))
        for p in provider.get("providers") or []:
            path = ((p.get("options") or {}).get("path") or "").rstrip("/")
            seen = {src[2] for f, src in files.items() if src[1] == "grafana-dashboards" and posixpath.dirname(f) == path}
            r.check(bool(dashboards) and seen == dashboards,
                    f"Grafana provider {p.get('name')} reads {path}: it holds dashboards {sorted(seen)}, the ConfigMap has {sorted(dashboards)}")
        for key_name in ("GF_SECURITY_ADMIN_USER__FILE", "GF_SECURITY_ADMIN_PASSWORD__FILE"):
            if key_name in env:
                file_is_mounted(r, objs, spec, c, env[key_name], "Secret", "grafana-admin", f"Grafana {key_name}")
    if isinstance(datasources, dict):
        for ds in datasources.get("datasources") or []:
            m = re.match(r"https?://([^/:]+):(\d+)", ds.get("url", ""))
            r.check(m is not None, f"datasource {ds.get('name')} url {ds.get('url')!r} names no host:port")
            if m:
                check_target(r, objs, f"datasource {ds.get('name')}", f"{m.group(1)}:{m.group(2)}", None)


def find_file_refs(node) -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, str) and k.endswith("_file") and isinstance(v, str):
                out.append(v)
            else:
                out += find_file_refs(v)
    elif isinstance(node, list):
        for v in node:
            out += find_file_refs(v)
    return out


def check_target(r: Report, objs: dict, job: str, target: str, self_spec: dict | None) -> None:
    host, _, port = target.rpartition(":")
    port = int(port)
    if host in ("localhost", "127.0.0.1"):
        r.check(self_spec is not None and port in k8slib.container_ports(self_spec).values(), f"{job}: {target} is no port of the pod itself")
        return
    parts = host.split(".")
    if parts[0] == "kubernetes" and parts[1:2] == ["default"]:
        return
    name, ns = parts[0], parts[1] if len(parts) > 1 else NAMESPACE
    r.check(ns == NAMESPACE, f"{job}: target {target} is in namespace {ns}, not {NAMESPACE}")
    svc = objs.get(("Service", name))
    r.check(svc is not None and any(p["port"] == port for p in svc["spec"]["ports"]), f"{job}: target {target} is no Service port of the render")


# ------------------------------------------------------------------ network policies


def check_network(r: Report, docs: list[dict], variant: str) -> None:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"].get("podSelector") == {} and set(p["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    r.check(bool(deny), "no default-deny NetworkPolicy (empty podSelector, Ingress+Egress, no rules)")
    pods: dict[str, Pod] = {}
    for doc, tpl in k8slib.workloads(docs):
        name = label(tpl) or doc["metadata"]["name"]
        pods.setdefault(name, Pod(name, tpl["metadata"].get("labels") or {}, tpl["spec"], NAMESPACE))
    namespaces = {NAMESPACE: {"kubernetes.io/metadata.name": NAMESPACE}, "kube-system": {"kubernetes.io/metadata.name": "kube-system"}}
    dns = Pod("kube-dns", {"k8s-app": "kube-dns"}, {"containers": [{"name": "dns", "ports": [{"containerPort": 53}]}]}, "kube-system")

    for name, pod in pods.items():
        r.check(k8slib.flow_allowed(policies, pod, dns, 53, namespaces), f"{name} cannot resolve names (DNS egress to kube-dns:53)")

    postgres = variant != "external-postgres"
    must = [
        ("endpoint-stats", "redis", 6379), ("redis-exporter", "redis", 6379),
        ("prometheus", "endpoint-stats", 9999), ("prometheus", "postgres-exporter", 9187), ("prometheus", "redis-exporter", 9121),
        ("prometheus", "kube-state-metrics", 8080), ("prometheus", "alertmanager", 9093),
        ("grafana", "prometheus", 9090),
        ("endpoint-stats-ops", "redis", 6379), ("endpoint-stats-ops", "endpoint-stats", 9999),
        ("endpoint-stats-ops", "prometheus", 9090), ("endpoint-stats-ops", "alertmanager", 9093),
    ]
    if postgres:
        must += [("endpoint-stats", "postgres", 5432), ("postgres-exporter", "postgres", 5432), ("endpoint-stats-ops", "postgres", 5432)]
    must_not = [
        ("endpoint-stats", "prometheus", 9090), ("grafana", "redis", 6379), ("redis-exporter", "endpoint-stats", 9999),
        ("endpoint-stats", "grafana", 3000), ("endpoint-stats-ops", "grafana", 3000), ("alertmanager", "redis", 6379),
        ("prometheus", "grafana", 3000), ("grafana", "alertmanager", 9093), ("prometheus", "kube-state-metrics", 8081),
    ]
    if postgres:
        must_not += [("grafana", "postgres", 5432), ("redis-exporter", "postgres", 5432), ("redis", "postgres", 5432), ("prometheus", "postgres", 5432)]
    for src, dst, port in must:
        if r.check(src in pods and dst in pods, f"flow {src} -> {dst}: workload missing"):
            r.check(k8slib.flow_allowed(policies, pods[src], pods[dst], port, namespaces), f"NetworkPolicies block {src} -> {dst}:{port}, which the system needs")
    for src, dst, port in must_not:
        if src in pods and dst in pods:
            r.check(not k8slib.flow_allowed(policies, pods[src], pods[dst], port, namespaces), f"NetworkPolicies allow {src} -> {dst}:{port}, which nothing needs")
    if not postgres:
        for src in ("endpoint-stats", "postgres-exporter", "endpoint-stats-ops"):
            r.check(k8slib.egress_to_addresses_allowed(policies, pods[src], 5432), f"{src} cannot reach the external PostgreSQL (egress 5432)")
    # to the outside: the API server for Prometheus and kube-state-metrics, Slack for Alertmanager
    for src in ("prometheus", "kube-state-metrics"):
        if src in pods:
            r.check(k8slib.egress_to_addresses_allowed(policies, pods[src], 443), f"{src} cannot reach the API server (egress 443)")
    if "alertmanager" in pods:
        r.check(k8slib.egress_to_addresses_allowed(policies, pods["alertmanager"], 443), "alertmanager cannot reach Slack (egress 443)")
    for src in ("endpoint-stats", "postgres", "redis", "grafana", "redis-exporter", "endpoint-stats-ops"):
        if src in pods:
            r.check(not k8slib.egress_to_addresses_allowed(policies, pods[src], 443), f"{src} may reach addresses outside the cluster on 443")


# ------------------------------------------------------------------ images


def check_images_agree(r: Report, docs: list[dict], repo: Path) -> None:
    images: dict[str, set[str]] = {}
    for _, tpl in k8slib.workloads(docs):
        for _, c in containers(tpl["spec"]):
            repo_name, _, tag = c["image"].rpartition(":")
            images.setdefault(repo_name, set()).add(tag)
    for repo_name, tags in images.items():
        r.check(len(tags) == 1, f"image {repo_name} is used at several versions: {sorted(tags)}")
    app = [t for n, t in images.items() if n.endswith("/endpoint-stats") or n == "endpoint-stats"]
    ops = [t for n, t in images.items() if n.endswith("/endpoint-stats-ops") or n == "endpoint-stats-ops"]
    r.check(bool(app) and bool(ops) and app[0] == ops[0], f"service and ops images have different tags: {app} {ops}")
    dockerfile = (repo / "Dockerfile").read_text(encoding="utf-8")
    m = re.search(r"^FROM\s+(postgres:\S+)\s+AS\s+ops\b", dockerfile, re.M | re.I)
    pg = [f"{n}:{t}" for n, ts in images.items() for t in ts if n.rsplit("/", 1)[-1] == "postgres"]
    if pg:
        r.check(m is not None and m.group(1) == pg[0],
                f"the ops image (Dockerfile: {m.group(1) if m else 'no FROM postgres:... AS ops'}) must start from the PostgreSQL image the StatefulSet runs ({pg[0]}), so that pg_dump matches the server")


def check_servicemonitors(r: Report, docs: list[dict]) -> None:
    services = [d for d in docs if d["kind"] == "Service"]
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        name = sm["metadata"]["name"]
        spec = sm["spec"]
        r.check(NAMESPACE in ((spec.get("namespaceSelector") or {}).get("matchNames") or []), f"ServiceMonitor {name} does not look in {NAMESPACE}")
        matched = [s for s in services if selects(spec["selector"], s["metadata"].get("labels") or {})]
        if not r.check(len(matched) == 1, f"ServiceMonitor {name} selects {len(matched)} Services, expected 1"):
            continue
        port_names = {p.get("name") for p in matched[0]["spec"]["ports"]}
        for ep in spec.get("endpoints") or []:
            r.check(ep.get("port") in port_names, f"ServiceMonitor {name} scrapes port {ep.get('port')!r}, Service has {sorted(port_names)}")
        job = (matched[0]["metadata"].get("labels") or {}).get(spec.get("jobLabel", ""), matched[0]["metadata"]["name"])
        r.check(job == name, f"ServiceMonitor {name} would produce job {job!r}")


# ------------------------------------------------------------------ least privilege


def secret_value(objs: dict, name: str, key: str) -> str | None:
    secret = objs.get(("Secret", name))
    if not secret:
        return None
    if key in (secret.get("stringData") or {}):
        return secret["stringData"][key]
    raw = (secret.get("data") or {}).get(key)
    return None if raw is None else base64.b64decode(raw).decode()


def url_user(url: str) -> str:
    m = re.match(r"^[a-z]+://([^:@/]*)(?::[^@]*)?@", url)
    return m.group(1) if m else ""


def env_secret_refs(container: dict) -> dict[str, tuple[str, str]]:
    out = {}
    for e in container.get("env") or []:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            out[e["name"]] = (ref["name"], ref["key"])
    return out


def check_database_roles(r: Report, objs: dict, docs: list[dict], repo: Path) -> None:
    """Every client of PostgreSQL connects as its own role, through its own Secret key; none as
    the administrator; the roles come from base/postgres/roles.sql, which grants no superuser."""
    # the roles' definition: the ConfigMap is the repository's files, byte for byte
    cm = (objs.get(("ConfigMap", "postgres-roles")) or {}).get("data") or {}
    for key, path in ROLES_FILES.items():
        r.check(cm.get(key) == (repo / path).read_text(encoding="utf-8"),
                f"ConfigMap postgres-roles key {key} differs from {path} (it must be generated from it)")
    sql = (repo / ROLES_FILES["roles.sql"]).read_text(encoding="utf-8")
    code = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    for role in ROLE_KEYS:
        r.check(re.search(rf"ALTER ROLE {role}\b[^;]*\bNOSUPERUSER\b", code) is not None,
                f"roles.sql does not make {role} NOSUPERUSER")
    r.check(re.search(r"(?<!NO)SUPERUSER\b", code.replace("NOSUPERUSER", "")) is None, "roles.sql grants SUPERUSER")
    r.check(re.search(r"ALTER DEFAULT PRIVILEGES FOR ROLE endpoint_stats_owner\b", code) is not None,
            "roles.sql sets no default privileges for tables the owner creates later")
    createdb = set(re.findall(r"ALTER ROLE (\w+)[^;]*(?<!NO)CREATEDB\b", code))
    r.check(createdb == {"endpoint_stats_verify"}, f"only the verify role may create databases, roles.sql lets {sorted(createdb)}")

    admin_user = secret_value(objs, "endpoint-stats-db-admin", "POSTGRES_USER")
    for doc, tpl in k8slib.workloads(docs):
        kind, name = k8slib.key(doc)
        for _, c in containers(tpl["spec"]):
            refs = env_secret_refs(c)
            for var, (secret, key) in refs.items():
                if secret == "endpoint-stats-db-admin":
                    r.check((kind, name) in DB_ADMIN_READERS,
                            f"{kind}/{name} container {c['name']} reads the PostgreSQL administrator's Secret ({var})")
            want = DB_CLIENTS.get((kind, name, c["name"]))
            urls = [v for v in DB_URL_VARS if v in refs or any(e["name"] == v for e in c.get("env") or [])]
            if want is None:
                r.check(not urls or (kind, name) == ("Job", "endpoint-stats-db-roles"),
                        f"{kind}/{name} container {c['name']} connects to PostgreSQL ({urls}) with no role assigned to it here")
                continue
            if not r.check(len(urls) == 1 and urls[0] in refs,
                           f"{kind}/{name} container {c['name']} must take its database URL from a Secret, has {urls}"):
                continue
            secret, key = refs[urls[0]]
            r.check((secret, key) == ("endpoint-stats-db", ROLE_KEYS[want]),
                    f"{kind}/{name} container {c['name']} reads {urls[0]} from {secret}/{key}, expected endpoint-stats-db/{ROLE_KEYS[want]} ({want})")
            value = secret_value(objs, secret, key)
            if value is None:
                continue  # the base has no Secrets: the overlays are checked
            user = url_user(value)
            r.check(user != "" and user != admin_user and user != "postgres",
                    f"{kind}/{name} container {c['name']} connects as the PostgreSQL superuser {user or '(default user)'} ({secret}/{key})")
            r.check(user == want, f"{kind}/{name} container {c['name']} connects as {user or '(default user)'}, expected {want} ({secret}/{key})")
    job = objs.get(("Job", "endpoint-stats-db-roles"))
    if job:
        c = job["spec"]["template"]["spec"]["containers"][0]
        refs = env_secret_refs(c)
        r.check(refs.get("PGUSER") == ("endpoint-stats-db-admin", "POSTGRES_USER") and refs.get("PGPASSWORD") == ("endpoint-stats-db-admin", "POSTGRES_PASSWORD"),
                "Job endpoint-stats-db-roles does not run as the administrator of Secret endpoint-stats-db-admin")
        for role, key in ROLE_KEYS.items():
            var = {"DATABASE_URL": "APP_DATABASE_URL"}.get(key, key)
            r.check(refs.get(var) == ("endpoint-stats-db", key), f"Job endpoint-stats-db-roles does not set {role}'s password from endpoint-stats-db/{key}")
        vols = {v["name"]: v for v in job["spec"]["template"]["spec"].get("volumes") or []}
        mounted = {m["mountPath"]: vols.get(m["name"], {}).get("configMap", {}).get("name") for m in c.get("volumeMounts") or []}
        script = next((a for a in c.get("command", []) + c.get("args", []) if a.endswith("/apply-roles.sh")), "")
        r.check(mounted.get(posixpath.dirname(script)) == "postgres-roles",
                f"Job endpoint-stats-db-roles runs {script or 'no apply-roles.sh'}, not from ConfigMap postgres-roles")


def check_redis_auth(r: Report, objs: dict, docs: list[dict]) -> None:
    """Redis requires the password of Secret endpoint-stats-redis, and every client sends it."""
    ref = ("endpoint-stats-redis", "REDIS_PASSWORD")
    redis = objs.get(("Deployment", "redis"))
    if redis:
        c = redis["spec"]["template"]["spec"]["containers"][0]
        argv = c.get("command", []) + c.get("args", [])
        refs = env_secret_refs(c)
        password = argv[argv.index("--requirepass") + 1] if "--requirepass" in argv[:-1] else None
        m = re.fullmatch(r"\$\((\w+)\)", password or "")
        r.check(m is not None and refs.get(m.group(1)) == ref,
                f"Redis accepts clients without a password: redis-server needs --requirepass $(VAR) with VAR from Secret {ref[0]} key {ref[1]} (args {argv})")
        if "--protected-mode" in argv[:-1]:
            r.check(argv[argv.index("--protected-mode") + 1] != "no" or password is not None, "Redis runs --protected-mode no without a password")
        probe = ((c.get("readinessProbe") or {}).get("exec") or {}).get("command") or []
        if probe and probe[0] == "redis-cli":
            r.check(refs.get("REDISCLI_AUTH") == ref, "Redis' readiness probe (redis-cli) has no REDISCLI_AUTH from the Secret")
    for doc, tpl in k8slib.workloads(docs):
        kind, name = k8slib.key(doc)
        for _, c in containers(tpl["spec"]):
            env = {e["name"]: e for e in c.get("env") or []}
            refs = env_secret_refs(c)
            order = [e["name"] for e in c.get("env") or []]
            if "REDIS_URL" in env:
                value = env["REDIS_URL"].get("value")
                if "REDIS_URL" in refs:
                    continue  # a whole URL from a Secret: its password is not in the manifest
                m = re.match(r"^rediss?://[^:@/]*:\$\((\w+)\)@", value or "")
                r.check(m is not None and refs.get(m.group(1)) == ref and order.index(m.group(1)) < order.index("REDIS_URL"),
                        f"{kind}/{name} container {c['name']}: REDIS_URL {value!r} sends no password: it must be redis://:$(VAR)@... with VAR defined before it from Secret {ref[0]} key {ref[1]}")
            if "REDIS_ADDR" in env:  # redis_exporter
                r.check(refs.get("REDIS_PASSWORD") == ref, f"{kind}/{name} container {c['name']}: redis_exporter has no REDIS_PASSWORD from Secret {ref[0]}")
    value = secret_value(objs, *ref)
    if value is not None:
        r.check(re.fullmatch(r"[A-Za-z0-9._~-]{12,}", value) is not None,
                f"Secret {ref[0]} key {ref[1]} must be at least 12 URL-safe characters (it goes into REDIS_URL)")


# kubernetes_sd_configs role -> (apiGroup, resource) that Prometheus lists and watches
SD_RESOURCES = {
    "node": [("", "nodes")],
    "pod": [("", "pods")],
    "service": [("", "services")],
    "endpoints": [("", "endpoints"), ("", "services"), ("", "pods")],
    "endpointslice": [("discovery.k8s.io", "endpointslices"), ("", "services"), ("", "pods")],
    "ingress": [("networking.k8s.io", "ingresses")],
}


def prometheus_needs(prom_cfg: dict) -> dict[tuple[str, str, str, str], set[str]]:
    """(scope, apiGroup, resource, verb) -> the jobs that need it; scope is a namespace or '*'."""
    needs: dict[tuple[str, str, str, str], set[str]] = {}
    for job in prom_cfg.get("scrape_configs") or []:
        name = job["job_name"]
        for sd in job.get("kubernetes_sd_configs") or []:
            scopes = (sd.get("namespaces") or {}).get("names") or ["*"]
            for group, resource in SD_RESOURCES.get(sd.get("role"), []):
                scoped = ["*"] if resource in ("nodes",) else scopes
                for scope in scoped:
                    for verb in ("list", "watch"):
                        needs.setdefault((scope, group, resource, verb), set()).add(name)
            if (sd.get("attach_metadata") or {}).get("node"):
                for verb in ("list", "watch"):
                    needs.setdefault(("*", "", "nodes", verb), set()).add(name)
        relabels = job.get("relabel_configs") or []
        address = next((rc.get("replacement") for rc in relabels if rc.get("target_label") == "__address__"), "")
        path = next((rc.get("replacement") for rc in relabels if rc.get("target_label") == "__metrics_path__"), "") or ""
        through_api = str(address).startswith("kubernetes.default.svc")
        if through_api and re.match(r"^/api/v1/nodes/[^/]+/proxy(/|$)", path):
            needs.setdefault(("*", "", "nodes/proxy", "get"), set()).add(name)
        elif through_api and re.match(r"^/api/v1/namespaces/", path):
            needs.setdefault(("*", "", "pods/proxy", "get"), set()).add(name)
        elif "credentials_file" in str(job.get("authorization") or "") and "node" in [sd.get("role") for sd in job.get("kubernetes_sd_configs") or []]:
            needs.setdefault(("*", "", "nodes/metrics", "get"), set()).add(name)  # kubelets scraped directly
    return needs


def check_prometheus_rbac(r: Report, objs: dict, docs: list[dict]) -> None:
    """Prometheus' grants are exactly what its scrape jobs use: no grant without a job, no job
    without its grant, namespaced where the job is namespaced."""
    prom_cfg = yaml.safe_load(((objs.get(("ConfigMap", "prometheus-config")) or {}).get("data") or {}).get("prometheus.yml") or "null")
    prom = objs.get(("Deployment", "prometheus"))
    if not isinstance(prom_cfg, dict) or not prom:
        return
    sa = prom["spec"]["template"]["spec"].get("serviceAccountName", "default")
    needs = prometheus_needs(prom_cfg)
    grants: dict[tuple[str, str, str, str], str] = {}
    for binding in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == NAMESPACE for s in binding.get("subjects") or []):
            continue
        ref = binding["roleRef"]
        role = objs.get((ref["kind"], ref["name"]))
        if not r.check(role is not None, f"{binding['kind']}/{binding['metadata']['name']} binds {ref['kind']}/{ref['name']}, not in the render"):
            continue
        scope = "*" if binding["kind"] == "ClusterRoleBinding" else binding["metadata"].get("namespace", NAMESPACE)
        where = f"{ref['kind']} {ref['name']} (through {binding['kind']} {binding['metadata']['name']})"
        for rule in role.get("rules") or []:
            for url in rule.get("nonResourceURLs") or []:
                r.check(False, f"{where} grants {rule.get('verbs')} on non-resource URL {url}, which no scrape job of prometheus.yml needs")
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    for verb in rule.get("verbs") or []:
                        r.check("*" not in (group, resource, verb), f"{where} grants a wildcard ({verb} {group}/{resource})")
                        grants[(scope, group, resource, verb)] = where
    for (scope, group, resource, verb), where in sorted(grants.items()):
        needed = needs.get((scope, group, resource, verb))
        if needed:
            continue
        narrower = sorted(ns for (ns, g, res, v) in needs if (g, res, v) == (group, resource, verb) and ns != "*")
        if scope == "*" and narrower:
            r.check(False, f"{where} grants {verb} {group or 'core'}/{resource} cluster-wide; the scrape jobs need it only in namespace(s) {narrower}: use a Role there")
        else:
            r.check(False, f"{where} grants {verb} {group or 'core'}/{resource}{'' if scope == '*' else ' in namespace ' + scope}, which no scrape job of prometheus.yml needs")
    for (scope, group, resource, verb), jobs in sorted(needs.items()):
        r.check((scope, group, resource, verb) in grants or ("*", group, resource, verb) in grants,
                f"scrape job(s) {sorted(jobs)} need {verb} {group or 'core'}/{resource}{'' if scope == '*' else ' in namespace ' + scope}, which no binding grants ServiceAccount {sa}")


PRIVATE_NETS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")]


def check_prometheus_egress(r: Report, docs: list[dict]) -> None:
    """Prometheus reaches the API server by address: only private ranges, or a single address
    (a /32 an overlay adds for a control plane with a public address)."""
    for p in (d for d in docs if d["kind"] == "NetworkPolicy"):
        if not selects(p["spec"].get("podSelector", {}), {"app.kubernetes.io/name": "prometheus"}):
            continue
        for rule in p["spec"].get("egress") or []:
            for peer in rule.get("to") or []:
                block = peer.get("ipBlock")
                if not block:
                    continue
                net = ipaddress.ip_network(block["cidr"], strict=False)
                narrow = any(net.version == n.version and net.subnet_of(n) for n in PRIVATE_NETS) or net.num_addresses == 1
                r.check(narrow, f"NetworkPolicy {p['metadata']['name']} lets Prometheus reach {block['cidr']}: public addresses (only private ranges or single addresses of the API server)")


if __name__ == "__main__":
    sys.exit(main())
