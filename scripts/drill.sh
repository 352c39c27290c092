#!/usr/bin/env bash
# Disaster-recovery drill on synthetic data: how long backup, verify-backup and restore take, and
# how big the dump is, for N rows of endpoint_access (default one million) on this machine.
#
#     scripts/drill.sh                     # 1,000,000 rows
#     scripts/drill.sh --rows 200000
#     DRILL_ADMIN_URL=postgres://postgres@127.0.0.1:5432/postgres scripts/drill.sh
#
# It creates two throwaway databases on the server of DRILL_ADMIN_URL (the role needs CREATEDB):
# a source, migrated by the binary and filled with a bulk INSERT … generate_series, and an empty
# target. It runs the real commands (backup → verify-backup → restore --latest --yes
# --into-other-database into the empty target), checks that the target holds the same rows,
# prints the figures, and removes the databases and the dump directory whatever happens.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROWS=1000000
ADMIN_URL="${DRILL_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
BIN="${ENDPOINT_STATS_BIN:-$REPO_ROOT/target/release/endpoint-stats}"

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while (($#)); do
  case "$1" in
    --rows) ROWS="${2:?--rows needs a number}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "drill: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$ROWS" =~ ^[0-9]+$ ]] || { echo "drill: --rows must be a number" >&2; exit 2; }

for tool in psql pg_dump pg_restore; do
  command -v "$tool" >/dev/null || { echo "drill: $tool not found in PATH" >&2; exit 1; }
done
if [[ ! -x "$BIN" ]]; then
  echo "drill: building $BIN" >&2
  (cd "$REPO_ROOT" && cargo build --release --bin endpoint-stats)
fi

stamp="$(date -u +%Y%m%d%H%M%S)_$$"
SOURCE_DB="es_drill_source_$stamp"
TARGET_DB="es_drill_target_$stamp"
WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/es-drill.XXXXXX")"
BACKUP_DIR="$WORK_DIR/backups"

# URL of another database on the admin URL's server (keeps user, host, port and parameters).
db_url() {
  local base="${ADMIN_URL%%\?*}" query=""
  [[ "$ADMIN_URL" == *\?* ]] && query="?${ADMIN_URL#*\?}"
  echo "${base%/*}/$1$query"
}
SOURCE_URL="$(db_url "$SOURCE_DB")"
TARGET_URL="$(db_url "$TARGET_DB")"

admin() { psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -qAtX -c "$1"; }
cleanup() {
  admin "DROP DATABASE IF EXISTS \"$SOURCE_DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  admin "DROP DATABASE IF EXISTS \"$TARGET_DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK_DIR"
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
log() { echo "drill: $*" >&2; }

run_bin() {
  local url="$1"; shift
  DATABASE_URL="$url" LOG_FORMAT=text RUST_LOG=warn "$BIN" "$@"
}

log "creating $SOURCE_DB and $TARGET_DB"
admin "CREATE DATABASE \"$SOURCE_DB\""
admin "CREATE DATABASE \"$TARGET_DB\""
run_bin "$SOURCE_URL" migrate

log "seeding $ROWS rows"
t0="$(now)"
psql "$SOURCE_URL" -v ON_ERROR_STOP=1 -qAtX <<SQL
INSERT INTO endpoint_access (endpoint, access_count, first_accessed, last_accessed)
SELECT '/api/v1/synthetic/endpoint/' || g,
       (random() * 1000000)::bigint,
       now() - interval '90 days' + (g % 7776000) * interval '1 second',
       now() - (g % 86400) * interval '1 second'
FROM generate_series(1, $ROWS) AS g;
VACUUM ANALYZE endpoint_access;
SQL
seed_s="$(elapsed "$t0" "$(now)")"

read -r table_bytes heap_bytes index_bytes database_bytes < <(psql "$SOURCE_URL" -qAtX -F ' ' -c \
  "SELECT pg_total_relation_size('endpoint_access'), pg_relation_size('endpoint_access'),
          pg_indexes_size('endpoint_access'), pg_database_size(current_database())")
read -r source_rows source_sum < <(psql "$SOURCE_URL" -qAtX -F ' ' -c \
  "SELECT count(*), sum(access_count) FROM endpoint_access")

log "backup"
t0="$(now)"
run_bin "$SOURCE_URL" backup --dir "$BACKUP_DIR" --retention-days 10 >&2
backup_s="$(elapsed "$t0" "$(now)")"
dump_file="$(find "$BACKUP_DIR" -maxdepth 1 -name 'endpoint-stats-*.dump' -print | head -n 1)"
dump_bytes="$(stat -c %s "$dump_file")"

log "verify-backup"
t0="$(now)"
run_bin "$SOURCE_URL" verify-backup --dir "$BACKUP_DIR" >&2
verify_s="$(elapsed "$t0" "$(now)")"

log "restore --latest --yes --into-other-database into the empty $TARGET_DB"
t0="$(now)"
run_bin "$TARGET_URL" restore --latest --dir "$BACKUP_DIR" --yes --into-other-database >&2
restore_s="$(elapsed "$t0" "$(now)")"

read -r target_rows target_sum < <(psql "$TARGET_URL" -qAtX -F ' ' -c \
  "SELECT count(*), sum(access_count) FROM endpoint_access")
read -r restored_bytes restored_heap restored_index < <(psql "$TARGET_URL" -qAtX -F ' ' -c \
  "SELECT pg_total_relation_size('endpoint_access'), pg_relation_size('endpoint_access'),
          pg_indexes_size('endpoint_access')")
if [[ "$source_rows $source_sum" != "$target_rows $target_sum" ]]; then
  echo "drill: FAILED: source has $source_rows rows (sum $source_sum), restored $target_rows (sum $target_sum)" >&2
  exit 1
fi

per_row() { awk -v b="$1" -v r="$2" 'BEGIN { if (r > 0) printf "%.1f", b / r; else print "-" }'; }
server_version="$(admin "SHOW server_version")"
cpu="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || echo unknown)"

cat <<REPORT
endpoint-stats DR drill — $(date -u +%Y-%m-%dT%H:%M:%SZ)
machine:            $(nproc) CPU ($cpu), PostgreSQL $server_version, $(pg_dump --version)
rows:               $ROWS (restored: $target_rows, sum of access_count identical)
seed (INSERT):      ${seed_s} s
table on disk:      $table_bytes bytes ($(per_row "$table_bytes" "$ROWS") B/row; heap $heap_bytes, indexes $index_bytes)
after restore:      $restored_bytes bytes ($(per_row "$restored_bytes" "$ROWS") B/row; heap $restored_heap, indexes $restored_index)
database size:      $database_bytes bytes
dump (custom, gz):  $dump_bytes bytes ($(per_row "$dump_bytes" "$ROWS") B/row)
backup:             ${backup_s} s
verify-backup:      ${verify_s} s  (checksum + restore into scratch + compare)
restore --latest:   ${restore_s} s  (checksum + single-transaction restore + ANALYZE + compare)
REPORT
