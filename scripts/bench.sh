#!/usr/bin/env bash
# Benchmark of SPEC §10, with the baseline measured in the same run:
#   scripts/bench.sh [--duration SECONDS] [--rounds N] [--connections N]
# Measures a bare axum hello-world (bench/hello_baseline.rs, built from this repo) and the
# service on PostgreSQL: GET / and GET /stats (req/s, p99), resident memory under load, /metrics
# latency, lost counts (stored vs answered) and the group commit under GET / (commits/s, mean
# commit time, accesses per commit, commits over 10 ms). The three loads take turns for N rounds, so that
# a shared machine's drift hits the baseline and the service alike; each ratio is taken within one
# round, and the summary gives the median ratio and the worst p99. Nothing is asserted: targets
# are printed next to the figures for a person to read.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/lib/ensure-deps.sh
source scripts/lib/ensure-deps.sh

duration=5
rounds=5
connections=64
threads=2
while (($#)); do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
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
# "sum count within_10ms" of the service's commit duration histogram
commit_histogram() {
  curl -fs "http://127.0.0.1:$service_port/metrics" | awk -v n=endpoint_stats_db_commit_duration_seconds '
    $1 == n "_sum" {s = $2} $1 == n "_count" {c = $2} $1 == n "_bucket{le=\"0.01\"}" {b = $2}
    END {print s + 0, c + 0, b + 0}'
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

# One line per round: hello_rps hello_p99 root_rps root_p99 root_answered root_stored root_non2xx
#   stats_rps stats_p99 stats_answered stats_stored stats_non2xx rss_kb socket_errors
: >"$workdir/rounds"
: >"$workdir/commits"
for round in $(seq 1 "$rounds"); do
  echo "round $round/$rounds: hello-world, GET /, GET /stats (${duration}s each, $connections connections)..." >&2
  read -r hello_rps hello_p99 _ _ _ _ < <(run_wrk "http://127.0.0.1:$hello_port/")

  before="$(stored /)"
  read -r commit_s0 commits0 fast0 < <(commit_histogram)
  peak_rss_kb "$service_pid" "$duration" >"$workdir/rss" & sampler=$!
  read -r root_rps root_p99 root_total root_non2xx _ root_errors < <(run_wrk "http://127.0.0.1:$service_port/")
  wait "$sampler"
  read -r commit_s1 commits1 fast1 < <(commit_histogram)
  sleep 0.5
  root_stored=$(($(stored /) - before))
  # group commit under GET /: "commits mean_commit_seconds commits_over_10ms"
  echo "$commits0 $commits1 $commit_s0 $commit_s1 $fast0 $fast1" |
    awk '{print $2 - $1, ($2 > $1) ? ($4 - $3) / ($2 - $1) : 0, ($2 - $1) - ($6 - $5)}' >>"$workdir/commits"

  before="$(stored /stats)"
  read -r stats_rps stats_p99 stats_total stats_non2xx _ stats_errors < <(run_wrk "http://127.0.0.1:$service_port/stats")
  sleep 0.5
  stats_stored=$(($(stored /stats) - before))

  errors=none
  [[ "$root_errors" == none && "$stats_errors" == none ]] || errors=yes
  echo "$hello_rps $hello_p99 $root_rps $root_p99 $((root_total - root_non2xx)) $root_stored $root_non2xx" \
    "$stats_rps $stats_p99 $((stats_total - stats_non2xx)) $stats_stored $stats_non2xx $(cat "$workdir/rss") $errors" \
    >>"$workdir/rounds"
done

echo "measuring GET /metrics (1 connection)..." >&2
read -r _ metrics_p99 _ _ metrics_avg _ < <(run_wrk "http://127.0.0.1:$service_port/metrics" 1 1 3)

python3 - "$workdir/rounds" "$workdir/commits" <<PY
import statistics, sys
rounds = [line.split() for line in open(sys.argv[1]) if line.strip()]
commits = [tuple(map(float, line.split())) for line in open(sys.argv[2]) if line.strip()]
f = lambda row, i: float(row[i])
median = statistics.median
print(f"\nendpoint-stats benchmark: wrk -t$threads -c$connections, {len(rounds)} rounds of ${duration}s per load, $(nproc) cores")
print(f"  {'round':<6} {'hello req/s':>12} {'GET / req/s':>12} {'ratio':>6} {'p99 ms':>7} {'/stats req/s':>13} {'ratio':>6} {'p99 ms':>7}")
root_ratios, stats_ratios = [], []
for n, r in enumerate(rounds, 1):
    hello = f(r, 0)
    root_ratios.append(f(r, 2) / hello)
    stats_ratios.append(f(r, 7) / hello)
    print(f"  {n:<6} {hello:>12,.0f} {f(r, 2):>12,.0f} {root_ratios[-1]:>6.2f} {f(r, 3):>7.2f} {f(r, 7):>13,.0f} {stats_ratios[-1]:>6.2f} {f(r, 8):>7.2f}")

def counts(answered_i, stored_i, non2xx_i):
    answered = sum(int(r[answered_i]) for r in rounds)
    stored = sum(int(r[stored_i]) for r in rounds)
    non2xx = sum(int(r[non2xx_i]) for r in rounds)
    # wrk stops mid-flight: up to one request per connection and round is committed but never read.
    return answered, stored, non2xx, max(0, answered - stored), max(0, stored - answered)

root = counts(4, 5, 6)
stats = counts(9, 10, 11)
errors = "yes" if any(r[13] != "none" for r in rounds) else "none"
rows = [
    ("hello-world baseline", f"{median(f(r, 0) for r in rounds):,.0f} req/s", f"p99 {max(f(r, 1) for r in rounds):.2f} ms", "(median req/s, worst p99)"),
    ("GET / (PostgreSQL)", f"{median(f(r, 2) for r in rounds):,.0f} req/s", f"p99 {max(f(r, 3) for r in rounds):.2f} ms",
     f"ratio {median(root_ratios):.2f} (median of rounds; target >= 0.50, p99 < 10 ms)"),
    ("GET / group commit", f"{sum(c for c, _, _ in commits) / ($duration * len(commits)):,.0f} commits/s",
     f"mean {1000 * sum(c * t for c, t, _ in commits) / max(1, sum(c for c, _, _ in commits)):.3f} ms",
     f"{sum(int(r[4]) for r in rounds) / max(1, sum(c for c, _, _ in commits)):.1f} accesses per commit; "
     f"commits over 10 ms by round: {' '.join(str(int(slow)) for _, _, slow in commits)} (a p99 spike with none is not the database's)"),
    ("GET /stats (PostgreSQL)", f"{median(f(r, 7) for r in rounds):,.0f} req/s", f"p99 {max(f(r, 8) for r in rounds):.2f} ms",
     f"ratio {median(stats_ratios):.2f} (median of rounds; target >= 0.33)"),
    ("GET /metrics", f"avg {$metrics_avg:.3f} ms", f"p99 {$metrics_p99:.2f} ms", "(target well under 1 ms)"),
    ("resident memory under load", f"{max(f(r, 12) for r in rounds) / 1024:.1f} MB", "", "(peak; target < 50 MB)"),
    ("GET / counts", f"answered {root[0]:,}", f"stored {root[1]:,}",
     f"lost {root[3]} (cut off by wrk: {root[4]}), non-2xx {root[2]}, socket errors: {errors}"),
    ("GET /stats counts", f"answered {stats[0]:,}", f"stored {stats[1]:,}",
     f"lost {stats[3]} (cut off by wrk: {stats[4]}), non-2xx {stats[2]}"),
]
print()
for name, a, b, c in rows:
    print(f"  {name:<28} {a:>18} {b:>16}  {c}")
PY
