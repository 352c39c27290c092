#!/usr/bin/env bash
# Creates or updates the PostgreSQL roles of endpoint-stats: runs roles.sql (beside this file, or
# $ROLES_SQL) as an administrator, on the server and database that OWNER_DATABASE_URL names.
# Used by the Kubernetes Job endpoint-stats-db-roles (ConfigMap postgres-roles) and by the local
# stack (scripts/local-stack.sh): one procedure, one SQL file.
#
# Environment:
#   OWNER_DATABASE_URL, APP_DATABASE_URL, BACKUP_DATABASE_URL, VERIFY_DATABASE_URL,
#   MONITOR_DATABASE_URL   postgres://ROLE:PASSWORD@HOST:PORT/DB?...: each must name its role
#                          (endpoint_stats_owner, _app, _backup, _verify, _monitor); its password
#                          is what the role gets (percent-encoded in the URL, as URLs require)
#   PGUSER, PGPASSWORD     the administrator (the image's POSTGRES_USER, or a managed database's
#                          admin role); host, port, database and TLS parameters are the owner URL's
#   ROLES_WAIT_SECS        how long to wait for the server to accept connections (default 120)
# No password is ever put on a command line: roles.sql reads them with \getenv.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROLES_SQL="${ROLES_SQL:-$here/roles.sql}"

die() { printf 'apply-roles: %s\n' "$*" >&2; exit 1; }

# password_of VARIABLE ROLE: the decoded password of the URL in VARIABLE, which must name ROLE.
password_of() {
  local name="$1" role="$2" url rest user password
  url="${!name:-}"
  [[ -n "$url" ]] || die "$name is not set"
  [[ "$url" == postgres://* || "$url" == postgresql://* ]] || die "$name must be a postgres:// URL"
  rest="${url#*://}"
  [[ "$rest" == *@* ]] || die "$name names no user: it must be postgres://$role:PASSWORD@..."
  rest="${rest%%@*}"
  user="${rest%%:*}"
  password="${rest#*:}"
  [[ "$user" == "$role" ]] || die "$name must connect as $role, not ${user:-nobody}"
  [[ "$password" != "$rest" && -n "$password" ]] || die "$name has no password"
  printf '%b' "${password//%/\\x}"
}

ROLE_PASSWORD_OWNER="$(password_of OWNER_DATABASE_URL endpoint_stats_owner)"
ROLE_PASSWORD_APP="$(password_of APP_DATABASE_URL endpoint_stats_app)"
ROLE_PASSWORD_BACKUP="$(password_of BACKUP_DATABASE_URL endpoint_stats_backup)"
ROLE_PASSWORD_VERIFY="$(password_of VERIFY_DATABASE_URL endpoint_stats_verify)"
ROLE_PASSWORD_MONITOR="$(password_of MONITOR_DATABASE_URL endpoint_stats_monitor)"
export ROLE_PASSWORD_OWNER ROLE_PASSWORD_APP ROLE_PASSWORD_BACKUP ROLE_PASSWORD_VERIFY ROLE_PASSWORD_MONITOR

[[ -n "${PGUSER:-}" ]] || die "PGUSER (the administrator) is not set"
# The owner's URL without its user and password: the administrator's PGUSER/PGPASSWORD apply.
# It must name its host and database: libpq's defaults (a local socket, the database named like
# the user) would configure some other database.
server="${OWNER_DATABASE_URL#*@}"
[[ "$server" =~ ^[^/?]+/[^/?]+ ]] || die "OWNER_DATABASE_URL must name host and database: postgres://endpoint_stats_owner:PASSWORD@HOST:PORT/DATABASE"
for name in APP_DATABASE_URL BACKUP_DATABASE_URL VERIFY_DATABASE_URL MONITOR_DATABASE_URL; do
  [[ "${!name#*@}" == "$server" ]] || die "$name and OWNER_DATABASE_URL name different servers or databases"
done
admin_url="postgresql://$server"
export PGCONNECT_TIMEOUT="${PGCONNECT_TIMEOUT:-5}"

deadline=$((SECONDS + ${ROLES_WAIT_SECS:-120}))
until psql --no-password -X -q -d "$admin_url" -c 'SELECT 1' >/dev/null 2>&1; do
  ((SECONDS < deadline)) || {
    psql --no-password -X -q -d "$admin_url" -c 'SELECT 1' >&2 || true
    die "the database of OWNER_DATABASE_URL does not accept $PGUSER"
  }
  sleep 2
done
psql --no-password -X -q -d "$admin_url" -f "$ROLES_SQL"
echo "apply-roles: roles of endpoint-stats applied on $(psql --no-password -X -At -d "$admin_url" -c \
  "SELECT current_database() || ' (' || string_agg(rolname, ', ' ORDER BY rolname) || ')' FROM pg_roles WHERE rolname LIKE 'endpoint\_stats\_%'")"
