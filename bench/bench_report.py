#!/usr/bin/env python3
"""The figures of scripts/bench.sh: it runs the loads and writes what it measured to files, this
file reads them and prints the summaries. Every value that is not in a file (wrk's threads and
connections, the load's duration, the machine's cores, ...) is an argument. Standard library only.

  bench_report.py wrk-summary WRK_OUTPUT
      one line "req/s p99_ms requests non2xx avg_ms socket_errors" of wrk --latency's output
  bench_report.py rounds ROUNDS COMMITS --threads N --connections N --duration S --cores N
                  --metrics-avg MS --metrics-p99 MS
      the hello-world baseline against the service on PostgreSQL (GET /, GET /stats, /metrics)
  bench_report.py production PRODUCTION --threads N --connections N --duration S
      the production shape: Redis on, each counted endpoint alone and the mix
  bench_report.py round-trips ROUND_TRIPS --threads N --connections N --duration S --cores N
      GET / across a round trip of 0, 0.5, 1 and 2 ms (--round-trips)
  bench_report.py soak WORKDIR --minutes M --threads N --connections N
      the soak (--soak): WORKDIR holds samples, soak.wrk, soak.stored, metrics.before and
      metrics.after

The line formats of the files are described where scripts/bench.sh writes them. --threads,
--connections, --cores and --minutes are printed as given; --duration is printed as given and
divides as a number.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys

sys.dont_write_bytecode = True

median = statistics.median


def number(text: str) -> int | float:
    """A number as Python reads it: an int when it is one, a float otherwise."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def wrk_summary(path: str) -> None:
    text = open(path).read()

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


def round_trips(path: str, threads: str, connections: str, duration_text: str, cores: str) -> None:
    duration = number(duration_text)
    rows = [line.split() for line in open(path) if line.strip()]
    by = {(int(r[0]), int(r[1])): r for r in rows}
    rounds = sorted({int(r[0]) for r in rows})
    delays = [0, 250, 500, 1000]
    g = lambda n, us, i: float(by[n, us][i])  # noqa: E731
    ratio = {us: [g(n, us, 2) / g(n, 0, 2) for n in rounds] for us in delays}
    print(f"\nendpoint-stats across a round trip: GET /, wrk -t{threads} -c{connections}, {len(rounds)} rounds of {duration_text}s "
          f"per round trip, {cores} cores; one delay-proxy and one service per round trip, same database")
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
        commits = [g(n, us, 8) / duration for n in rounds]
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


def soak(work: str, minutes: str, threads: str, connections: str) -> None:
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


def rounds_report(rounds_path: str, commits_path: str, threads: str, connections: str, duration_text: str, cores: str,
                  metrics_avg: float, metrics_p99: float) -> None:
    duration = number(duration_text)
    rounds = [line.split() for line in open(rounds_path) if line.strip()]
    commits = [tuple(map(float, line.split())) for line in open(commits_path) if line.strip()]
    f = lambda row, i: float(row[i])  # noqa: E731
    print(f"\nendpoint-stats benchmark: wrk -t{threads} -c{connections}, {len(rounds)} rounds of {duration_text}s per load, {cores} cores")
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
        ("GET / group commit", f"{sum(c for c, _, _ in commits) / (duration * len(commits)):,.0f} commits/s",
         f"mean {1000 * sum(c * t for c, t, _ in commits) / max(1, sum(c for c, _, _ in commits)):.3f} ms",
         f"{sum(int(r[4]) for r in rounds) / max(1, sum(c for c, _, _ in commits)):.1f} accesses per commit; "
         f"commits over 10 ms by round: {' '.join(str(int(slow)) for _, _, slow in commits)} (a p99 spike with none is not the database's)"),
        ("GET /stats (PostgreSQL)", f"{median(f(r, 7) for r in rounds):,.0f} req/s", f"p99 {max(f(r, 8) for r in rounds):.2f} ms",
         f"ratio {median(stats_ratios):.2f} (median of rounds; target >= 0.33)"),
        ("GET /metrics", f"avg {metrics_avg:.3f} ms", f"p99 {metrics_p99:.2f} ms", "(target well under 1 ms)"),
        ("resident memory under load", f"{max(f(r, 12) for r in rounds) / 1024:.1f} MB", "", "(peak; target < 50 MB)"),
        ("GET / counts", f"answered {root[0]:,}", f"stored {root[1]:,}",
         f"lost {root[3]} (cut off by wrk: {root[4]}), non-2xx {root[2]}, socket errors: {errors}"),
        ("GET /stats counts", f"answered {stats[0]:,}", f"stored {stats[1]:,}",
         f"lost {stats[3]} (cut off by wrk: {stats[4]}), non-2xx {stats[2]}"),
    ]
    print()
    for name, a, b, c in rows:
        print(f"  {name:<28} {a:>18} {b:>16}  {c}")


def production(path: str, threads: str, connections: str, duration_text: str) -> None:
    duration = number(duration_text)
    rows = [line.split() for line in open(path) if line.strip()]
    loads = ["root", "stats", "endpoints", "mix"]
    names = {"root": "GET /", "stats": "GET /stats", "endpoints": "GET /api/v1/endpoints", "mix": "the mix (1/3 each)"}
    by = {(int(r[0]), r[1]): r for r in rows}
    rounds = sorted({int(r[0]) for r in rows})
    ratio = {load: [float(by[n, load][2]) / float(by[n, "root"][2]) for n in rounds] for load in loads}
    print(f"\nproduction shape: Redis on, wrk -t{threads} -c{connections}, {len(rounds)} rounds of {duration_text}s per load "
          "(ratios to GET / alone with Redis in the same round)")
    print(f"  {'round':<6} {'GET / req/s':>12} {'p99 ms':>7} {'/stats':>8} {'ratio':>6} {'/api/v1/endpoints':>18} {'ratio':>6} {'p99 ms':>7} "
          f"{'mix req/s':>10} {'ratio':>6} {'p99 ms':>7}  mix per endpoint (stored /, /stats, /api/v1/endpoints)")
    for n in rounds:
        g = lambda load, i: float(by[n, load][i])  # noqa: E731
        mix = by[n, "mix"]
        print(f"  {n:<6} {g('root', 2):>12,.0f} {g('root', 3):>7.2f} {g('stats', 2):>8,.0f} {ratio['stats'][n - 1]:>6.2f} "
              f"{g('endpoints', 2):>18,.0f} {ratio['endpoints'][n - 1]:>6.2f} {g('endpoints', 3):>7.2f} "
              f"{g('mix', 2):>10,.0f} {ratio['mix'][n - 1]:>6.2f} {g('mix', 3):>7.2f}  "
              + " + ".join(f"{int(mix[i]) / duration:,.0f}" for i in (5, 6, 7)))
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
              f"{commits / (duration * len(rounds)):,.0f} commits/s of {answered / max(1, commits):.1f} accesses, "
              f"mean {1000 * mean_commit:.3f} ms, over 10 ms by round: {slow}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def load_args(p, cores=True):
        p.add_argument("--threads", required=True, help="wrk's threads (-t)")
        p.add_argument("--connections", required=True, help="wrk's connections (-c)")
        p.add_argument("--duration", required=True, help="seconds of each load")
        if cores:
            p.add_argument("--cores", required=True, help="the machine's cores (nproc)")

    p = sub.add_parser("wrk-summary", help="one line of figures from wrk --latency's output")
    p.add_argument("wrk_output")
    p = sub.add_parser("rounds", help="the baseline against the service on PostgreSQL")
    p.add_argument("rounds_file")
    p.add_argument("commits_file")
    load_args(p)
    p.add_argument("--metrics-avg", type=float, required=True, help="GET /metrics mean latency, ms")
    p.add_argument("--metrics-p99", type=float, required=True, help="GET /metrics p99 latency, ms")
    p = sub.add_parser("production", help="the production shape (Redis on)")
    p.add_argument("production_file")
    load_args(p, cores=False)
    p = sub.add_parser("round-trips", help="GET / across a round trip")
    p.add_argument("round_trips_file")
    load_args(p)
    p = sub.add_parser("soak", help="the soak's figures")
    p.add_argument("workdir")
    p.add_argument("--minutes", required=True)
    p.add_argument("--threads", required=True)
    p.add_argument("--connections", required=True)
    args = parser.parse_args()

    if args.command == "wrk-summary":
        wrk_summary(args.wrk_output)
    elif args.command == "rounds":
        rounds_report(args.rounds_file, args.commits_file, args.threads, args.connections, args.duration, args.cores,
                      args.metrics_avg, args.metrics_p99)
    elif args.command == "production":
        production(args.production_file, args.threads, args.connections, args.duration)
    elif args.command == "round-trips":
        round_trips(args.round_trips_file, args.threads, args.connections, args.duration, args.cores)
    else:
        soak(args.workdir, args.minutes, args.threads, args.connections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
