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

# The summaries (and wrk's one-line figures) are printed by bench/bench_report.py.
bench_report() { python3 "$REPO_ROOT/bench/bench_report.py" "$@"; }
free_port() { python3 "$REPO_ROOT/scripts/lib/supervise.py" free-port; }
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
  bench_report wrk-summary "$workdir/wrk.out"
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
  bench_report round-trips "$workdir/round_trips" --threads "$threads" --connections "$connections" \
    --duration "$duration" --cores "$(nproc)"
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
  bench_report soak "$workdir" --minutes "$soak_minutes" --threads "$threads" --connections "$connections"
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

bench_report rounds "$workdir/rounds" "$workdir/commits" --threads "$threads" --connections "$connections" \
  --duration "$duration" --cores "$(nproc)" --metrics-avg "$metrics_avg" --metrics-p99 "$metrics_p99"

bench_report production "$workdir/production" --threads "$threads" --connections "$connections" --duration "$duration"
