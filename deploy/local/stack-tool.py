#!/usr/bin/env python3
"""The local stack's small Python steps (scripts/local-stack.sh). Standard library only.

  stack-tool.py render TEMPLATE OUT KEY=VALUE...
      writes TEMPLATE to OUT with every @KEY@ replaced by VALUE (values may span lines); fails
      when a placeholder is left
  stack-tool.py targets --prometheus URL [--all-up]
      Prometheus' active targets, one line each; with --all-up prints nothing and exits 0 only
      when there are targets and every one is up
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request

sys.dont_write_bytecode = True


def render(template: str, out: str, pairs: list[str]) -> int:
    with open(template, encoding="utf-8") as f:
        text = f.read()
    for pair in pairs:
        key, value = pair.split("=", 1)
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        sys.exit(f"unrendered placeholders in {template}: {sorted(set(left))}")
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


def targets(prometheus: str, all_up: bool) -> int:
    url = f"{prometheus.rstrip('/')}/api/v1/targets?state=active"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            active = json.load(r)["data"]["activeTargets"]
    except (OSError, ValueError, KeyError) as e:
        print(f"{url}: {e}", file=sys.stderr)
        return 1
    if all_up:
        return 0 if active and all(t["health"] == "up" for t in active) else 1
    for t in active:
        print(f"  {t['labels']['job']:20} {t['scrapeUrl']:40} {t['health']:8} {t.get('lastError', '')}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render")
    p.add_argument("template")
    p.add_argument("out")
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    p = sub.add_parser("targets")
    p.add_argument("--prometheus", required=True)
    p.add_argument("--all-up", action="store_true")
    args = parser.parse_args()
    if args.command == "render":
        return render(args.template, args.out, args.pairs)
    return targets(args.prometheus, args.all_up)


if __name__ == "__main__":
    sys.exit(main())
