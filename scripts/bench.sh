#!/usr/bin/env bash
# Benchmark of SPEC §10, with the baseline measured in the same run:
#   scripts/bench.sh [--duration SECONDS] [--rounds N] [--connections N]
#   scripts/bench.sh --soak MINUTES [--connections N]
#   scripts/bench.sh --round-trips [--duration SECONDS] [--rounds N] [--connections N]
# Measures a bare axum hello-world (bench/hello_baseline.rs, built from this repo) and the
# service on PostgreSQL: GET / and GET /stats (req/s, p99), resident memory under load, /metrics
# latency, lost counts (stored vs answered) and the group commit under GET / (commits/s, mean
# commit time, accesses per commit, commits over 10 ms). Then the production shape: a second
# replica with Redis on (REDIS_URL, its own key prefix), each counted endpoint alone and an even
# mix over all of them (wrk with a Lua script that rotates the paths). The loads take turns for N
# rounds, so that a shared machine's drift hits the baseline and the service alike; each ratio is
# taken within one round, and the summary gives the median ratio, the range of the rounds and the
# worst p99. Nothing is asserted: targets are printed next to the figures for a person to read.
# --soak runs the mix with Redis for MINUTES instead, samples resident memory and open files every
# 10 s and prints their first, last and maximum, the answers against the stored counts, and every
# non-200 by route and status.
# --round-trips runs GET / across a network round trip instead (issue 14): one delay-proxy
# (bench/delay_proxy.rs) per round trip of 0, 0.5, 1 and 2 ms (one-way 0/250/500/1000 µs) in front
# of the same PostgreSQL database, and one service instance behind each, started together and kept
# for the whole run, so that each sees one constant round trip from its first connection, as in a
# cluster. Only one load runs at a time; in each round the four take turns, in an order rotated
# from round to round. Per round trip: req/s, p99, commits/s, accesses per commit, lost counts and
# the ratio to the 0 ms load of the same round (median and range over the rounds).
# The binaries come from `cargo build --release` in $CARGO_TARGET_DIR (default ./target); with
# BENCH_BIN_DIR set, the hello-baseline, delay-proxy and endpoint-stats found there are used and
# nothing is built.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/lib/ensure-deps.sh
source scripts/lib/ensure-deps.sh

duration=5
rounds=5
connections=64
threads=2
soak_minutes=0
round_trips=0
while (($#)); do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    --soak) soak_minutes="$2"; shift 2 ;;
    --round-trips) round_trips=1; shift ;;
    -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

ensure_debian_packages
ensure_postgres
ensure_postgres_role
ensure_redis
if [[ -n "${BENCH_BIN_DIR:-}" ]]; then
  bin_dir="$BENCH_BIN_DIR"
else
  cargo build --release --locked --bins >&2
  bin_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release"
fi

admin_url="${BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
database="es_bench_$$"
redis_prefix="es_bench_$$:"
workdir="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$admin_url" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null 2>&1 || true
  redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "${redis_prefix}*" 2>/dev/null |
    xargs -r redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1 || true
  rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 1 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "no answer from $1" >&2; return 1
}
# The production shape's mix: every counted endpoint in turn, on every wrk thread.
cat >"$workdir/mix.lua" <<'LUA'
local paths = { "/", "/stats", "/api/v1/endpoints" }
local requests = {}
local next_index = 0
function init(_)
  for i, path in ipairs(paths) do requests[i] = wrk.format("GET", path) end
end
function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end
LUA
# "req/s p99_ms requests non2xx avg_ms socket_errors"; a base URL ending in /mix runs the mix.
run_wrk() {
  local url="$1" conns="${2:-$connections}" thr="${3:-$threads}" dur="${4:-$duration}" script=()
  if [[ "$url" == */mix ]]; then url="${url%/mix}/"; script=(-s "$workdir/mix.lua"); fi
  wrk -t"$thr" -c"$conns" -d"${dur}s" --latency "${script[@]}" "$url" >"$workdir/wrk.out"
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
p99 = ms(re.search(r"^\s*99%\s+(\S+)", text, re.M).group(1))  # not a "+/- Stdev" ending in 99%
avg = ms(re.search(r"Latency\s+(\S+)", text).group(1))
total = int(re.search(r"(\d+) requests in", text).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
errors = re.search(r"Socket errors: (.*)", text)
print(f"{rps:.0f} {p99:.2f} {total} {int(non2xx.group(1)) if non2xx else 0} {avg:.3f} {'errors' if errors else 'none'}")
PY
}
# "sum count within_10ms" of a service's commit duration histogram (default: the one without Redis)
commit_histogram() {
  curl -fs "http://127.0.0.1:${1:-$service_port}/metrics" | awk -v n=endpoint_stats_db_commit_duration_seconds '
    $1 == n "_sum" {s = $2} $1 == n "_count" {c = $2} $1 == n "_bucket{le=\"0.01\"}" {b = $2}
    END {print s + 0, c + 0, b + 0}'
}
stored() { psql "postgres://postgres@127.0.0.1:5432/$database" -tAc "SELECT COALESCE((SELECT access_count FROM endpoint_access WHERE endpoint = '$1'), 0)"; }
# "/ /stats /api/v1/endpoints" stored counts
stored_all() {
  psql "postgres://postgres@127.0.0.1:5432/$database" -tA -F' ' -c "SELECT
    COALESCE((SELECT access_count FROM endpoint_access WHERE endpoint = '/'), 0),
    COALESCE((SELECT access_count FROM endpoint_access WHERE endpoint = '/stats'), 0),
    COALESCE((SELECT access_count FROM endpoint_access WHERE endpoint = '/api/v1/endpoints'), 0)"
}
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

if ((round_trips)); then
  one_way_us=(0 250 500 1000)
  declare -A rt_port rt_pid proxy_pid
  for us in "${one_way_us[@]}"; do
    "$bin_dir/delay-proxy" --listen 127.0.0.1:0 --upstream 127.0.0.1:5432 --delay-us "$us" \
      </dev/null >"$workdir/proxy.$us" 2>"$workdir/proxy.$us.err" & proxy_pid[$us]=$!; pids+=("${proxy_pid[$us]}")
    for _ in $(seq 1 50); do grep -qs '^listening ' "$workdir/proxy.$us" && break; sleep 0.1; done
    proxy_port="$(awk '/^listening /{n = split($2, a, ":"); print a[n]; exit}' "$workdir/proxy.$us")"
    [[ -n "$proxy_port" ]] || { echo "delay-proxy at $us us did not start" >&2; exit 1; }
    rt_port[$us]="$(free_port)"
    DATABASE_URL="postgres://postgres@127.0.0.1:$proxy_port/$database" PORT="${rt_port[$us]}" BIND=127.0.0.1 \
      RUST_LOG=warn "$bin_dir/endpoint-stats" & rt_pid[$us]=$!; pids+=("${rt_pid[$us]}")
  done
  for us in "${one_way_us[@]}"; do wait_http "http://127.0.0.1:${rt_port[$us]}/ready"; done
  echo "warming up..." >&2
  for us in "${one_way_us[@]}"; do run_wrk "http://127.0.0.1:${rt_port[$us]}/" "$connections" "$threads" 2 >/dev/null; done
  # "commits batch_sum batch_count" of one service
  commit_figures() {
    curl -fs "http://127.0.0.1:$1/metrics" | awk '
      $1 == "endpoint_stats_db_commit_duration_seconds_count" {c = $2}
      $1 == "endpoint_stats_db_batch_size_sum" {s = $2} $1 == "endpoint_stats_db_batch_size_count" {n = $2}
      END {print c + 0, s + 0, n + 0}'
  }
  # One line per round and round trip:
  #   round one_way_us req/s p99 answered stored non2xx socket_errors commits batch_sum batch_count
  : >"$workdir/round_trips"
  for round in $(seq 1 "$rounds"); do
    order=()
    for i in 0 1 2 3; do order+=("${one_way_us[$(((i + round - 1) % 4))]}"); done
    echo "round $round/$rounds: GET / at one-way ${order[*]} us (${duration}s each, $connections connections)..." >&2
    for us in "${order[@]}"; do
      before="$(stored /)"
      read -r c0 s0 n0 < <(commit_figures "${rt_port[$us]}")
      read -r rps p99 total non2xx _ errors < <(run_wrk "http://127.0.0.1:${rt_port[$us]}/")
      read -r c1 s1 n1 < <(commit_figures "${rt_port[$us]}")
      sleep 0.5
      after="$(stored /)"
      echo "$round $us $rps $p99 $((total - non2xx)) $((after - before)) $non2xx $errors" \
        "$(echo "$c0 $c1 $s0 $s1 $n0 $n1" | awk '{print $2 - $1, $4 - $3, $6 - $5}')" >>"$workdir/round_trips"
    done
  done
  python3 - "$workdir/round_trips" <<PY
import statistics, sys
median = statistics.median
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
by = {(int(r[0]), int(r[1])): r for r in rows}
rounds = sorted({int(r[0]) for r in rows})
delays = [0, 250, 500, 1000]
g = lambda n, us, i: float(by[n, us][i])
ratio = {us: [g(n, us, 2) / g(n, 0, 2) for n in rounds] for us in delays}
print(f"\nendpoint-stats across a round trip: GET /, wrk -t$threads -c$connections, {len(rounds)} rounds of ${duration}s "
      f"per round trip, $(nproc) cores; one delay-proxy and one service per round trip, same database")
print(f"  {'round':<6}" + "".join(f" {f'{2 * us / 1000:g} ms req/s':>14} {'ratio':>6} {'p99 ms':>7}" for us in delays))
for n in rounds:
    print(f"  {n:<6}" + "".join(f" {g(n, us, 2):>14,.0f} {ratio[us][n - 1]:>6.2f} {g(n, us, 3):>7.2f}" for us in delays))
targets = {500: (0.8, 10.0), 1000: (0.6, None)}
base = [g(n, 0, 2) for n in rounds]
if max(base) > 1.3 * min(base):
    print(f"\n  NOTE: the 0 ms load moved between {min(base):,.0f} and {max(base):,.0f} req/s from round to round: "
          "the machine was not quiet, and the ratios below say little")
print()
print(f"  {'round trip':<11} {'req/s (median, rounds)':>30} {'ratio to 0 ms (median, rounds)':>32} {'p99 ms (median, worst)':>24} "
      f"{'commits/s':>10} {'acc/commit':>10}  counts")
for us in delays:
    rps = [g(n, us, 2) for n in rounds]
    p99 = [g(n, us, 3) for n in rounds]
    r = ratio[us]
    answered = sum(int(by[n, us][4]) for n in rounds)
    stored = sum(int(by[n, us][5]) for n in rounds)
    non2xx = sum(int(by[n, us][6]) for n in rounds)
    errors = "yes" if any(by[n, us][7] != "none" for n in rounds) else "none"
    commits = [g(n, us, 8) / $duration for n in rounds]
    per_commit = sum(g(n, us, 9) for n in rounds) / max(1, sum(g(n, us, 10) for n in rounds))
    line = (f"  {f'{2 * us / 1000:g} ms':<11} {f'{median(rps):,.0f} ({min(rps):,.0f}-{max(rps):,.0f})':>30} "
            f"{f'{median(r):.2f} ({min(r):.2f}-{max(r):.2f})':>32} {f'{median(p99):.2f}, {max(p99):.2f}':>24} "
            f"{median(commits):>10,.0f} {per_commit:>10.1f}  answered {answered:,} stored {stored:,}: "
            f"lost {max(0, answered - stored)} (cut off by wrk: {max(0, stored - answered)}), non-2xx {non2xx}, "
            f"socket errors: {errors}")
    print(line)
    if us in targets:
        want, p99_max = targets[us]
        met = median(r) >= want and (p99_max is None or max(p99) < p99_max) and answered <= stored and non2xx == 0
        print(f"  {'':<11} target at {2 * us / 1000:g} ms: ratio >= {want:.2f}"
              + (f", p99 < {p99_max:g} ms (worst round)" if p99_max else "")
              + f", zero lost: {'met' if met else 'NOT met'}")
PY
  # What each proxy really added beyond its delay: it prints how late it wrote its chunks when it ends.
  for us in "${one_way_us[@]}"; do kill "${rt_pid[$us]}" 2>/dev/null || true; wait "${rt_pid[$us]}" 2>/dev/null || true; done
  echo "  the proxies' own error (how late each chunk was written after its deadline, per direction):"
  for us in "${one_way_us[@]}"; do
    kill "${proxy_pid[$us]}" 2>/dev/null || true
    wait "${proxy_pid[$us]}" 2>/dev/null || true
    printf '  %-11s %s\n' "$(awk -v us="$us" 'BEGIN {print 2 * us / 1000 " ms"}')" \
      "$(sed -n 's/^delay-proxy: since the start, //p' "$workdir/proxy.$us.err")"
  done
  exit 0
fi

# The production shape: a replica with Redis on, on the same database (loads never overlap).
redis_port="$(free_port)"
DATABASE_URL="postgres://postgres@127.0.0.1:5432/$database" PORT="$redis_port" BIND=127.0.0.1 \
  REDIS_URL="redis://127.0.0.1:6379" REDIS_KEY_PREFIX="$redis_prefix" \
  RUST_LOG=warn "$bin_dir/endpoint-stats" & redis_pid=$!; pids+=("$redis_pid")
wait_http "http://127.0.0.1:$redis_port/ready"

if ((soak_minutes > 0)); then
  echo "soak: ${soak_minutes} min of the mix with Redis (wrk -t$threads -c$connections), sampling every 10 s..." >&2
  curl -fs "http://127.0.0.1:$redis_port/metrics" >"$workdir/metrics.before"
  read -r before_root before_stats before_endpoints < <(stored_all)
  run_wrk "http://127.0.0.1:$redis_port/mix" "$connections" "$threads" "$((soak_minutes * 60))" >"$workdir/soak.wrk" &
  load=$!
  : >"$workdir/samples"
  sleep 2 # the first sample with wrk's connections open
  while kill -0 "$load" 2>/dev/null; do
    rss="$(awk '/VmRSS/{print $2}' "/proc/$redis_pid/status")"
    fds="$(find "/proc/$redis_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
    echo "$(date +%s) $rss $fds" >>"$workdir/samples"
    for _ in $(seq 1 20); do kill -0 "$load" 2>/dev/null && sleep 0.5; done
  done
  wait "$load"
  sleep 0.5
  read -r after_root after_stats after_endpoints < <(stored_all)
  curl -fs "http://127.0.0.1:$redis_port/metrics" >"$workdir/metrics.after"
  echo "$((after_root - before_root)) $((after_stats - before_stats)) $((after_endpoints - before_endpoints))" >"$workdir/soak.stored"
  python3 - "$workdir" "$soak_minutes" "$threads" "$connections" <<'PY'
import re, sys
work, minutes, threads, connections = sys.argv[1:5]
samples = [tuple(map(int, line.split())) for line in open(f"{work}/samples") if line.strip()]
rps, p99, total, non2xx, avg, errors = open(f"{work}/soak.wrk").read().split()
stored = list(map(int, open(f"{work}/soak.stored").read().split()))
def requests(path):
    series = {}
    for line in open(path):
        m = re.match(r'http_requests_total\{(.*)\} (\S+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            series[(labels.get("route"), labels.get("status"))] = float(m.group(2))
    return series
before, after = requests(f"{work}/metrics.before"), requests(f"{work}/metrics.after")
delta = {k: int(v - before.get(k, 0)) for k, v in after.items() if v - before.get(k, 0) > 0}
routes = ["/", "/stats", "/api/v1/endpoints"]
print(f"\nendpoint-stats soak: the mix with Redis, wrk -t{threads} -c{connections}, {minutes} min, {len(samples)} samples every 10 s")
rss = [s[1] / 1024 for s in samples]
fds = [s[2] for s in samples]
print(f"  {'resident memory (MB)':<28} first {rss[0]:.1f}  last {rss[-1]:.1f}  max {max(rss):.1f}")
print(f"  {'open files':<28} first {fds[0]}  last {fds[-1]}  max {max(fds)}")
print(f"  {'mix':<28} {float(rps):,.0f} req/s, p99 {float(p99):.2f} ms, {int(total):,} requests, non-2xx {non2xx}, socket errors: {errors}")
answered = int(total) - int(non2xx)
print(f"  {'answered (wrk) vs stored':<28} answered {answered:,}  stored {sum(stored):,}  "
      f"lost {max(0, answered - sum(stored))} (cut off by wrk: {max(0, sum(stored) - answered)})")
for route, n in zip(routes, stored):
    ok = delta.get((route, "200"), 0)
    # A client that wrk cut off after its access committed leaves no 200 in the metrics.
    print(f"  {route:<28} 200s {ok:,} (the service's http_requests_total)  stored {n:,}  "
          f"stored - 200s: {n - ok} (at most the connections cut off by wrk)")
others = {k: v for k, v in delta.items() if k[1] != "200" and k[0] in routes}
print(f"  {'non-200 answers':<28} {', '.join(f'{r} {s}: {v}' for (r, s), v in sorted(others.items())) or 'none'}")
PY
  exit 0
fi

hello_port="$(free_port)"
"$bin_dir/hello-baseline" "$hello_port" & pids+=($!)
service_port="$(free_port)"
DATABASE_URL="postgres://postgres@127.0.0.1:5432/$database" PORT="$service_port" BIND=127.0.0.1 \
  RUST_LOG=warn "$bin_dir/endpoint-stats" & service_pid=$!; pids+=("$service_pid")
wait_http "http://127.0.0.1:$hello_port/"
wait_http "http://127.0.0.1:$service_port/ready"

echo "warming up..." >&2
run_wrk "http://127.0.0.1:$hello_port/" "$connections" "$threads" 2 >/dev/null
run_wrk "http://127.0.0.1:$service_port/" "$connections" "$threads" 2 >/dev/null
run_wrk "http://127.0.0.1:$redis_port/mix" "$connections" "$threads" 2 >/dev/null

# One line per round: hello_rps hello_p99 root_rps root_p99 root_answered root_stored root_non2xx
#   stats_rps stats_p99 stats_answered stats_stored stats_non2xx rss_kb socket_errors
: >"$workdir/rounds"
: >"$workdir/commits"
# The production shape, one line per round and load (root, stats, endpoints, mix):
#   round load req/s p99 answered stored_root stored_stats stored_endpoints non2xx socket_errors
#   commits mean_commit_seconds commits_over_10ms
: >"$workdir/production"
production_load() {
  local round="$1" load="$2" path="$3" rps p99 total non2xx errors s0 c0 f0 s1 c1 f1 a b c
  read -r a b c < <(stored_all)
  read -r s0 c0 f0 < <(commit_histogram "$redis_port")
  read -r rps p99 total non2xx _ errors < <(run_wrk "http://127.0.0.1:$redis_port$path")
  read -r s1 c1 f1 < <(commit_histogram "$redis_port")
  sleep 0.5
  read -r a1 b1 c1_ < <(stored_all)
  echo "$round $load $rps $p99 $((total - non2xx)) $((a1 - a)) $((b1 - b)) $((c1_ - c)) $non2xx $errors" \
    "$(echo "$c0 $c1 $s0 $s1 $f0 $f1" | awk '{print $2 - $1, ($2 > $1) ? ($4 - $3) / ($2 - $1) : 0, ($2 - $1) - ($6 - $5)}')" \
    >>"$workdir/production"
}
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

  echo "round $round/$rounds: production shape with Redis: GET /, GET /stats, GET /api/v1/endpoints, the mix..." >&2
  production_load "$round" root /
  production_load "$round" stats /stats
  production_load "$round" endpoints /api/v1/endpoints
  production_load "$round" mix /mix
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

python3 - "$workdir/production" <<PY
import statistics, sys
median = statistics.median
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
loads = ["root", "stats", "endpoints", "mix"]
names = {"root": "GET /", "stats": "GET /stats", "endpoints": "GET /api/v1/endpoints", "mix": "the mix (1/3 each)"}
by = {(int(r[0]), r[1]): r for r in rows}
rounds = sorted({int(r[0]) for r in rows})
ratio = {load: [float(by[n, load][2]) / float(by[n, "root"][2]) for n in rounds] for load in loads}
print(f"\nproduction shape: Redis on, wrk -t$threads -c$connections, {len(rounds)} rounds of ${duration}s per load "
      "(ratios to GET / alone with Redis in the same round)")
print(f"  {'round':<6} {'GET / req/s':>12} {'p99 ms':>7} {'/stats':>8} {'ratio':>6} {'/api/v1/endpoints':>18} {'ratio':>6} {'p99 ms':>7} "
      f"{'mix req/s':>10} {'ratio':>6} {'p99 ms':>7}  mix per endpoint (stored /, /stats, /api/v1/endpoints)")
for n in rounds:
    g = lambda load, i: float(by[n, load][i])
    mix = by[n, "mix"]
    print(f"  {n:<6} {g('root', 2):>12,.0f} {g('root', 3):>7.2f} {g('stats', 2):>8,.0f} {ratio['stats'][n - 1]:>6.2f} "
          f"{g('endpoints', 2):>18,.0f} {ratio['endpoints'][n - 1]:>6.2f} {g('endpoints', 3):>7.2f} "
          f"{g('mix', 2):>10,.0f} {ratio['mix'][n - 1]:>6.2f} {g('mix', 3):>7.2f}  "
          + " + ".join(f"{int(mix[i]) / $duration:,.0f}" for i in (5, 6, 7)))
print()
targets = {"root": "", "stats": "", "endpoints": "target >= 0.60, p99 < 10 ms", "mix": "target >= 0.80"}
for load in loads:
    rps = [float(by[n, load][2]) for n in rounds]
    p99 = max(float(by[n, load][3]) for n in rounds)
    answered = sum(int(by[n, load][4]) for n in rounds)
    stored = sum(int(by[n, load][i]) for n in rounds for i in (5, 6, 7))
    non2xx = sum(int(by[n, load][8]) for n in rounds)
    errors = "yes" if any(by[n, load][9] != "none" for n in rounds) else "none"
    commits = sum(float(by[n, load][10]) for n in rounds)
    mean_commit = sum(float(by[n, load][10]) * float(by[n, load][11]) for n in rounds) / max(1, commits)
    slow = " ".join(str(int(float(by[n, load][12]))) for n in rounds)
    r = ratio[load]
    print(f"  {names[load]:<24} {median(rps):>10,.0f} req/s (rounds {min(rps):,.0f}-{max(rps):,.0f})  p99 {p99:.2f} ms"
          + (f"  ratio {median(r):.2f} (rounds {min(r):.2f}-{max(r):.2f}) {targets[load]}" if load != "root" else ""))
    print(f"  {'':<24} answered {answered:,} stored {stored:,}: lost {max(0, answered - stored)} "
          f"(cut off by wrk: {max(0, stored - answered)}), non-2xx {non2xx}, socket errors: {errors}; "
          f"{commits / ($duration * len(rounds)):,.0f} commits/s of {answered / max(1, commits):.1f} accesses, "
          f"mean {1000 * mean_commit:.3f} ms, over 10 ms by round: {slow}")
PY
