#!/usr/bin/env python3
"""Whether this Python has the modules a script needs, for the shell (so that it can say what is
missing before a helper fails on an import).

  pymodules.py MODULE...             exit 0 when every MODULE imports, 1 (naming it) otherwise
  pymodules.py --versions MODULE...  the same, and print the Python and module versions
"""

import importlib
import sys

sys.dont_write_bytecode = True


def main() -> int:
    args = sys.argv[1:]
    show = bool(args) and args[0] == "--versions"
    if show:
        args = args[1:]
    found = []
    for name in args:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            print(f"{sys.executable}: no module {name} ({e})", file=sys.stderr)
            return 1
        found.append(f"{name} {getattr(module, '__version__', '?')}")
    if show:
        print(sys.version.split()[0], *found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
