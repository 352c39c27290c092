#!/usr/bin/env python3
"""Process, port and readiness helpers of every Python tool in this repository: the one place
where Python starts, waits for and stops a process of its own. The shell counterpart is
scripts/lib/stack-lib.sh (which calls this file for its port checks). Standard library only.

Imported by tests/monitoring/monitoring_checks.py and tests/e2e/e2e.py (sys.path gets
scripts/lib); run as a command by the shell:

  supervise.py free-port                 print a port of 127.0.0.1 that is free now
  supervise.py busy-ports PORT...        print those of the ports that are in use; exit 0
  supervise.py port-in-use PORT          exit 0 when PORT is in use, 1 when it is free
  supervise.py hold-port OUT --from A --to B [--step N] [--seconds S]
                                         listen on a free port of A..B, write it to OUT, hold it
                                         for S seconds (a test's stand-in for a busy port)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error

sys.dont_write_bytecode = True


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """True when something listens on 127.0.0.1:PORT (or on every address). The test binds like
    the servers do (SO_REUSEADDR), so sockets in TIME_WAIT do not count as "in use"."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(port)))
    except OSError:
        return True
    finally:
        s.close()
    return False


def log_tail(path: str | None, lines: int = 15) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def wait_for(what: str, fn, timeout: float, log: str | None = None, interval: float = 0.5):
    """Calls FN until it returns something true, and returns that. After TIMEOUT seconds exits
    with a FAIL line naming WHAT, the last error and the tail of LOG."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last = e
        time.sleep(interval)
    raise SystemExit(f"FAIL timed out after {timeout}s waiting for {what} (last error: {last})\n{log_tail(log)}")


class Daemon:
    """A process of ours, in a session of its own, its output in LOG; stopped by its pid (never
    by name) when the block ends: SIGTERM, then SIGKILL after STOP_TIMEOUT seconds."""

    def __init__(self, argv: list[str], log: str, stop_timeout: float = 10):
        self.log = log
        self.stop_timeout = stop_timeout
        self.logf = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> "Daemon":
        return self

    def check_alive(self, name: str) -> None:
        """Exits with a FAIL line and the log's end when the process has ended."""
        if self.proc.poll() is not None:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                raise SystemExit(f"FAIL {name} exited:\n{f.read()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


def hold_port(out: str, low: int, high: int, step: int, seconds: float) -> int:
    for _ in range(200):
        port = random.randrange(low, high, step)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.listen()
        with open(out, "w", encoding="utf-8") as f:
            f.write(str(port))
        time.sleep(seconds)
        return 0
    print(f"hold-port: no free port in {low}..{high}", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("free-port")
    p = sub.add_parser("busy-ports")
    p.add_argument("ports", nargs="+", type=int)
    p = sub.add_parser("port-in-use")
    p.add_argument("port", type=int)
    p = sub.add_parser("hold-port")
    p.add_argument("out")
    p.add_argument("--from", dest="low", type=int, required=True)
    p.add_argument("--to", dest="high", type=int, required=True)
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--seconds", type=float, default=120)
    args = parser.parse_args()
    if args.command == "free-port":
        print(free_port())
        return 0
    if args.command == "busy-ports":
        for port in args.ports:
            if port_in_use(port):
                print(port)
        return 0
    if args.command == "port-in-use":
        return 0 if port_in_use(args.port) else 1
    return hold_port(args.out, args.low, args.high, args.step, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
