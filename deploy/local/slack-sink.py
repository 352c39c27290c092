#!/usr/bin/env python3
"""A Slack-compatible webhook sink for the local stack.

Alertmanager's slack_configs POST a JSON message to the webhook URL; Slack answers 200 "ok". This
server does the same on 127.0.0.1 and appends every POST, as one JSON line, to --out:

    {"received_at": "2026-…Z", "path": "/services/local/sink", "body": {…Slack JSON…}}

A body that is not JSON is kept as text under "raw". GET answers 200 with the number of posts
recorded (a readiness probe). Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    server_version = "slack-sink/1"
    lock = threading.Lock()
    out_path = ""
    posts = 0

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        record: dict = {
            "received_at": datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z"),
            "path": self.path,
        }
        try:
            record["body"] = json.loads(raw)
        except ValueError:
            record["raw"] = raw.decode("utf-8", "replace")
        line = json.dumps(record, sort_keys=True) + "\n"
        with Sink.lock:
            with open(Sink.out_path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
            Sink.posts += 1
        self._answer(200, b"ok")

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200, f"slack-sink: {Sink.posts} posts recorded\n".encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:  # one line per request on stderr
        super().log_message(fmt, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True, help="JSON lines file, appended to")
    args = parser.parse_args()
    Sink.out_path = args.out
    open(args.out, "a", encoding="utf-8").close()
    server = ThreadingHTTPServer((args.bind, args.port), Sink)
    server.daemon_threads = True
    print(f"slack-sink: listening on http://{args.bind}:{args.port}/, recording to {args.out}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
