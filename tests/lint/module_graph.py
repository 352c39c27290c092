#!/usr/bin/env python3
"""The crate's module graph, at the level of its top modules (src/X.rs or src/X/), must be acyclic.

The direction is the data's: the command line and startup on top, then the server, routes and
operations commands, the counting store, and configuration and telemetry at the bottom. An edge
A -> B is any `crate::B` path written in A (a `use`, or a path in code); a cycle means two modules
each need the other, which this check reports with the names that tie them.

    module_graph.py [SRC_DIR]      print the graph from the top down; exit 1 on a cycle
"""
import pathlib
import re
import sys

PATH = re.compile(r"\bcrate::(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)(?:::(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*))?")
COMMENT = re.compile(r"//.*")


def top_modules(src):
    modules = {}
    for path in sorted(src.rglob("*.rs")):
        relative = path.relative_to(src)
        if relative.parts[0] in ("lib.rs", "main.rs"):
            continue
        modules.setdefault(relative.parts[0].removesuffix(".rs"), []).append(path)
    return modules


def edges(src):
    """{module: {imported module: {names}}}"""
    modules = top_modules(src)
    graph = {name: {} for name in modules}
    for name, files in modules.items():
        for path in files:
            code = "\n".join(COMMENT.sub("", line) for line in path.read_text().splitlines())
            for match in PATH.finditer(code):
                head, items = match.group(1), match.group(2) or ""
                targets = [t.strip().split("::")[0] for t in head.strip("{}").split(",")] if head.startswith("{") else [head]
                names = [i.strip().split("::")[0] for i in items.strip("{}").split(",") if i.strip()] if items else []
                for target in targets:
                    if target in modules and target != name:
                        graph[name].setdefault(target, set()).update(names or [target])
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def floors(graph):
    """Each module's height above the modules it uses (only meaningful without cycles)."""
    height = {}

    def of(node, seen=()):
        if node not in height:
            height[node] = 1 + max((of(t, seen + (node,)) for t in graph[node] if t not in seen), default=0)
        return height[node]

    for node in graph:
        of(node)
    return height


def main():
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    graph = edges(src)
    found = cycles(graph)
    if found:
        for component in found:
            print(f"FAIL: module cycle: {' <-> '.join(component)}")
            for a in component:
                for b in component:
                    if b in graph[a]:
                        print(f"    {a} -> {b}: {', '.join(sorted(graph[a][b]))}")
        return 1
    height = floors(graph)
    for node in sorted(graph, key=lambda n: (-height[n], n)):
        print(f"  {height[node]}  {node:<10} -> {', '.join(sorted(graph[node])) or '(nothing)'}")
    print(f"module graph: {len(graph)} modules, acyclic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
