"""Helpers shared by the manifest checkers in tests/deploy/: loading rendered YAML, walking pod
specs, resolving ports, evaluating NetworkPolicies, reading the binary's contract."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import yaml

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


class Report:
    """Collects failures; every check is counted so that a run proves it ran something."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failures: list[str] = []
        self.checks = 0

    def check(self, ok: bool, message: str) -> bool:
        self.checks += 1
        if not ok:
            self.failures.append(message)
        return ok

    def note(self, message: str) -> None:
        print(f"{self.name}: note: {message}")

    def finish(self) -> int:
        for failure in self.failures:
            print(f"FAIL {self.name}: {failure}")
        print(f"{self.name}: {self.checks - len(self.failures)} passed, {len(self.failures)} failed")
        return 1 if self.failures else 0


def load_docs(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def key(doc: dict) -> tuple[str, str]:
    return doc.get("kind", ""), doc.get("metadata", {}).get("name", "")


def index(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {key(d): d for d in docs}


def pod_template(doc: dict) -> dict | None:
    """The pod template (metadata + spec) of a workload, or None."""
    kind = doc.get("kind")
    if kind == "Pod":
        return {"metadata": doc.get("metadata", {}), "spec": doc.get("spec", {})}
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    if kind in WORKLOAD_KINDS:
        return doc["spec"]["template"]
    return None


def workloads(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    for doc in docs:
        tpl = pod_template(doc)
        if tpl is not None:
            yield doc, tpl


def containers(pod_spec: dict) -> Iterator[tuple[str, dict]]:
    for c in pod_spec.get("initContainers") or []:
        yield "initContainer", c
    for c in pod_spec.get("containers") or []:
        yield "container", c


def label(doc: dict, name: str = "app.kubernetes.io/name") -> str | None:
    return (doc.get("metadata", {}).get("labels") or {}).get(name)


def selects(selector: dict | None, labels: dict) -> bool:
    """Kubernetes label selector semantics (an empty selector selects everything)."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        k, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(k) not in values:
            return False
        if op == "NotIn" and labels.get(k) in values:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def service_selects(selector: dict | None, labels: dict) -> bool:
    """A Service's selector: a plain map (an empty or missing one selects nothing here)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(pod_spec: dict) -> dict[str, int]:
    """name -> number for every named port of every container (and str(number) -> number)."""
    ports: dict[str, int] = {}
    for _, c in containers(pod_spec):
        for p in c.get("ports") or []:
            ports[str(p["containerPort"])] = p["containerPort"]
            if "name" in p:
                ports[p["name"]] = p["containerPort"]
    return ports


def resolve_port(port: int | str, pod_spec: dict) -> int | None:
    if isinstance(port, int):
        return port
    return container_ports(pod_spec).get(str(port))


# ------------------------------------------------------------------ NetworkPolicy evaluation


class Pod:
    def __init__(self, name: str, labels: dict, spec: dict, namespace: str) -> None:
        self.name, self.labels, self.spec, self.namespace = name, labels, spec, namespace


def _peer_matches(peer: dict, pod: Pod, policy_ns: str, namespaces: dict[str, dict]) -> bool:
    if "ipBlock" in peer:
        return False  # addresses outside the cluster; pods are matched by selectors only
    ns_sel = peer.get("namespaceSelector")
    pod_sel = peer.get("podSelector")
    if ns_sel is None:
        if pod.namespace != policy_ns:
            return False
    elif not selects(ns_sel, namespaces.get(pod.namespace, {})):
        return False
    return pod_sel is None or selects(pod_sel, pod.labels)


def _port_matches(rule_ports: list | None, port: int, dst: Pod) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in p:
            return True
        number = resolve_port(p["port"], dst.spec)
        end = p.get("endPort", number)
        if number is not None and number <= port <= end:
            return True
    return False


def flow_allowed(policies: list[dict], src: Pod, dst: Pod, port: int, namespaces: dict[str, dict]) -> bool:
    """Whether TCP from src to dst:port is allowed by both ends' policies."""

    def direction_allows(direction: str, subject: Pod, peer: Pod) -> bool:
        field = "egress" if direction == "Egress" else "ingress"
        peer_field = "to" if direction == "Egress" else "from"
        relevant = [
            p
            for p in policies
            if p["metadata"].get("namespace", subject.namespace) == subject.namespace
            and selects(p["spec"].get("podSelector", {}), subject.labels)
            and direction in (p["spec"].get("policyTypes") or ["Ingress"])
        ]
        if not relevant:
            return True  # not isolated in this direction
        for p in relevant:
            for rule in p["spec"].get(field) or []:
                peers = rule.get(peer_field)
                peer_ok = (not peers) or any(
                    _peer_matches(x, peer, p["metadata"].get("namespace", subject.namespace), namespaces) for x in peers
                )
                if peer_ok and _port_matches(rule.get("ports"), port, dst):
                    return True
        return False

    return direction_allows("Egress", src, dst) and direction_allows("Ingress", dst, src)


def egress_to_addresses_allowed(policies: list[dict], src: Pod, port: int) -> bool:
    """Whether src may open TCP port `port` to some address outside the cluster (ipBlock)."""
    relevant = [
        p
        for p in policies
        if selects(p["spec"].get("podSelector", {}), src.labels) and "Egress" in (p["spec"].get("policyTypes") or [])
    ]
    if not relevant:
        return True
    for p in relevant:
        for rule in p["spec"].get("egress") or []:
            peers = rule.get("to")
            if peers and not any("ipBlock" in x for x in peers):
                continue
            for q in rule.get("ports") or [{"port": port}]:
                if q.get("port") == port:
                    return True
    return False


# ------------------------------------------------------------------ the binary's contract


def contract_table(repo_root: Path) -> dict[str, dict[str, str]]:
    """docs/CONTRACT.md's env var table: ENV -> {flag, default}. A flag cell may name aliases after
    the flag ("`--rust-log` (alias `--log-level`)")."""
    rows: dict[str, dict[str, str]] = {}
    text = (repo_root / "docs" / "CONTRACT.md").read_text(encoding="utf-8")
    for m in re.finditer(r"^\|\s*`([A-Z_]+)`\s*\|\s*`(--[a-z-]+)`[^|]*\|\s*([^|]*)\|", text, re.M):
        default = m.group(3).strip()
        dm = re.match(r"`([^`]*)`", default)
        rows[m.group(1)] = {"flag": m.group(2), "default": dm.group(1) if dm else ""}
    return rows


def contract_subcommands(repo_root: Path) -> set[str]:
    text = (repo_root / "docs" / "CONTRACT.md").read_text(encoding="utf-8")
    m = re.search(r"Subcommands:(.*?)\n\n", text, re.S)
    return set(re.findall(r"`([a-z-]+)`", m.group(1))) if m else set()


def contract_metrics(repo_root: Path) -> set[str]:
    """Metric names of the service, from the table of docs/CONTRACT.md's Metrics section."""
    text = (repo_root / "docs" / "CONTRACT.md").read_text(encoding="utf-8")
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        first_cell = line.split("|")[1]
        names.update(re.findall(r"`([a-zA-Z_:][a-zA-Z0-9_:]*)`", first_cell))
    return names


class Binary:
    """`endpoint-stats --help` output when $ENDPOINT_STATS_BIN is an executable file."""

    def __init__(self) -> None:
        self.path = os.environ.get("ENDPOINT_STATS_BIN", "")
        self.available = bool(self.path) and os.path.isfile(self.path) and os.access(self.path, os.X_OK)
        self._help: dict[tuple[str, ...], str] = {}

    def help(self, *subcommand: str) -> str:
        if subcommand not in self._help:
            try:
                out = subprocess.run(
                    [self.path, *subcommand, "--help"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                    env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")},
                )
                self._help[subcommand] = out.stdout + out.stderr if out.returncode == 0 else ""
            except (OSError, subprocess.TimeoutExpired):
                self._help[subcommand] = ""
        return self._help[subcommand]

    def default_of(self, flag: str) -> str | None:
        """The [default: X] clap prints for `flag` (top-level or `serve` help)."""
        for text in (self.help(), self.help("serve")):
            m = re.search(re.escape(flag) + r"\b(.*?)(?=\n\s*-{1,2}[a-zA-Z]|\Z)", text, re.S)
            if m:
                d = re.search(r"\[default: ([^\]]+)\]", m.group(1))
                if d:
                    return d.group(1).strip()
        return None

    def env_names(self, *subcommand: str) -> set[str]:
        """Environment variables the help lists ([env: NAME=] or, for secrets, [env: NAME])."""
        texts = [self.help(*subcommand)] if subcommand else [self.help(), self.help("serve")]
        names: set[str] = set()
        for text in texts:
            names.update(re.findall(r"\[env: ([A-Z_][A-Z0-9_]*)[=\]]", text))
        return names
