#!/usr/bin/env bash
# Benchmark of SPEC §10, with the baseline measured in the same run:
#   scripts/bench.sh [--duration SECONDS] [--connections N]
# Measures a bare axum hello-world (bench/hello_baseline.rs, built from this repo), then the
# service on PostgreSQL: GET / and GET /stats (req/s, p99), resident memory under load, /metrics
# latency, and lost counts (stored vs answered). Prints figures and ratios. Nothing is asserted:
# targets are printed next to the figures for a person to read.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/lib/ensure-deps.sh
source scripts/lib/ensure-deps.sh

duration=10
connections=64
threads=2
while (($#)); do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

ensure_debian_packages
ensure_postgres
ensure_postgres_role
cargo build --release --locked --bins >&2

admin_url="${BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
database="es_bench_$$"
workdir="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$admin_url" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 1 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "no answer from $1" >&2; return 1
}
# "req/s p99_ms requests non2xx"
run_wrk() {
  local url="$1" conns="${2:-$connections}" thr="${3:-$threads}" dur="${4:-$duration}"
  wrk -t"$thr" -c"$conns" -d"${dur}s" --latency "$url" >"$workdir/wrk.out"
  python3 - "$workdir/wrk.out" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def ms(v):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
    if not m:
        sys.exit(f"cannot read wrk latency {v!r} in:\n{text}")
    n, unit = float(m.group(1)), m.group(2)
    return {"us": n / 1000, "ms": n, "s": n * 1000, "m": n * 60000}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p99 = ms(re.search(r"99%\s+(\S+)", text).group(1))
avg = ms(re.search(r"Latency\s+(\S+)", text).group(1))
total = int(re.search(r"(\d+) requests in", text).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
errors = re.search(r"Socket errors: (.*)", text)
print(f"{rps:.0f} {p99:.2f} {total} {int(non2xx.group(1)) if non2xx else 0} {avg:.3f} {'errors' if errors else 'none'}")
PY
}
stored() { psql "postgres://postgres@127.0.0.1:5432/$database" -tAc "SELECT COALESCE((SELECT access_count FROM endpoint_access WHERE endpoint = '$1'), 0)"; }
peak_rss_kb() { # samples RSS of a pid for N seconds, prints the peak
  local pid="$1" seconds="$2" peak=0 rss
  for _ in $(seq 1 $((seconds * 4))); do
    rss="$(awk '/VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)"
    ((rss > peak)) && peak="$rss"
    sleep 0.25
  done
  echo "$peak"
}

psql "$admin_url" -qc "CREATE DATABASE $database" >/dev/null

hello_port="$(free_port)"
target/release/hello-baseline "$hello_port" & pids+=($!)
service_port="$(free_port)"
DATABASE_URL="postgres://postgres@127.0.0.1:5432/$database" PORT="$service_port" BIND=127.0.0.1 \
  RUST_LOG=warn target/release/endpoint-stats & service_pid=$!; pids+=("$service_pid")
wait_http "http://127.0.0.1:$hello_port/"
wait_http "http://127.0.0.1:$service_port/ready"

echo "warming up..." >&2
run_wrk "http://127.0.0.1:$hello_port/" "$connections" "$threads" 2 >/dev/null
run_wrk "http://127.0.0.1:$service_port/" "$connections" "$threads" 2 >/dev/null
before_root="$(stored /)"

echo "measuring hello-world baseline (${duration}s, $connections connections)..." >&2
read -r hello_rps hello_p99 _ _ _ _ < <(run_wrk "http://127.0.0.1:$hello_port/")

echo "measuring GET / ..." >&2
peak_rss_kb "$service_pid" "$duration" >"$workdir/rss" & sampler=$!
read -r root_rps root_p99 root_total root_non2xx _ root_errors < <(run_wrk "http://127.0.0.1:$service_port/")
wait "$sampler"; rss_kb="$(cat "$workdir/rss")"
sleep 0.5
root_stored=$(($(stored /) - before_root))

echo "measuring GET /stats ..." >&2
before_stats="$(stored /stats)"
read -r stats_rps stats_p99 stats_total stats_non2xx _ _ < <(run_wrk "http://127.0.0.1:$service_port/stats")
sleep 0.5
stats_stored=$(($(stored /stats) - before_stats))

echo "measuring GET /metrics (1 connection)..." >&2
read -r _ metrics_p99 _ _ metrics_avg _ < <(run_wrk "http://127.0.0.1:$service_port/metrics" 1 1 3)

python3 - <<PY
hello, root, stats = $hello_rps, $root_rps, $stats_rps
def lost(answered_total, non2xx, stored):
    answered = answered_total - non2xx
    # wrk stops mid-flight: up to one request per connection is committed but never read by wrk.
    return max(0, answered - stored), max(0, stored - answered)
root_lost, root_cut = lost($root_total, $root_non2xx, $root_stored)
stats_lost, stats_cut = lost($stats_total, $stats_non2xx, $stats_stored)
rows = [
    ("hello-world baseline", f"{hello:,.0f} req/s", f"p99 {$hello_p99:.2f} ms", ""),
    ("GET / (PostgreSQL)", f"{root:,.0f} req/s", f"p99 {$root_p99:.2f} ms", f"ratio {root/hello:.2f} (target >= 0.50, p99 < 10 ms)"),
    ("GET /stats (PostgreSQL)", f"{stats:,.0f} req/s", f"p99 {$stats_p99:.2f} ms", f"ratio {stats/hello:.2f} (target >= 0.33)"),
    ("GET /metrics", f"avg {$metrics_avg:.3f} ms", f"p99 {$metrics_p99:.2f} ms", "(target well under 1 ms)"),
    ("resident memory under load", f"{$rss_kb/1024:.1f} MB", "", "(target < 50 MB)"),
    ("GET / counts", f"answered {$root_total - $root_non2xx:,}", f"stored {$root_stored:,}", f"lost {root_lost} (cut off by wrk: {root_cut}), non-2xx {$root_non2xx}, socket errors: $root_errors"),
    ("GET /stats counts", f"answered {$stats_total - $stats_non2xx:,}", f"stored {$stats_stored:,}", f"lost {stats_lost} (cut off by wrk: {stats_cut}), non-2xx {$stats_non2xx}"),
]
print(f"\nendpoint-stats benchmark: wrk -t$threads -c$connections -d${duration}s, $(nproc) cores, same run")
for name, a, b, c in rows:
    print(f"  {name:<28} {a:>18} {b:>16}  {c}")
PY
