#!/usr/bin/env python3
"""The flexnpu package's import graph: cycles between modules, and arrows from a lower layer to a
higher one (docs/architecture.md, "Module layers"). Imports under TYPE_CHECKING count too: a
type-only cycle is still a cycle for a reader. Prints one summary line; exit 1 if any.

usage: python3 scripts/layers.py [REPO_ROOT]
"""

from __future__ import annotations

import ast
import os
import sys
from collections import defaultdict

# layer of a module by its first component under flexnpu; a module may import its own layer
# and lower ones, and daemon/ and hook/ (same layer) never import each other
LAYERS = {
    **dict.fromkeys(
        (
            "ring",
            "errors",
            "units",
            "paths",
            "logging_setup",
            "protocol",
            "control",
            "ops",
        ),
        0,
    ),
    "sched": 1,
    "client": 2,
    "daemon": 3,
    "hook": 3,
}
TOP = 4  # cli, cmd_*, bench, __main__: may import anything
SIBLINGS_APART = ({"daemon", "hook"},)


def modules(root: str) -> dict[str, str]:
    mods = {}
    for d, _, fs in os.walk(os.path.join(root, "flexnpu")):
        for f in fs:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                rel = os.path.relpath(p, root)[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = p
    return mods


def graph(mods: dict[str, str]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    g: dict[str, set[str]] = defaultdict(set)
    for m, p in mods.items():
        with open(p, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        is_pkg = p.endswith("__init__.py")
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - (n.level - 1)]
                    b = ".".join(base + ([n.module] if n.module else []))
                else:
                    b = n.module or ""
                targets = [b] + [f"{b}.{a.name}" for a in n.names]
            else:
                continue
            for t in targets:
                if t.startswith("flexnpu"):
                    r = resolve(t)
                    if r and r != m and not m.startswith(r + "."):
                        g[m].add(r)
    return g


def top(m: str) -> str:
    parts = m.split(".")
    return parts[1] if len(parts) > 1 else ""


def back_edges(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, bs in g.items():
        for b in bs:
            ta, tb = top(a), top(b)
            if LAYERS.get(tb, TOP) > LAYERS.get(ta, TOP) or any(
                ta != tb and {ta, tb} <= apart for apart in SIBLINGS_APART
            ):
                bad.append(f"{a}->{b}")
    return sorted(bad)


def cycles(g: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(g.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def main(argv: list[str]) -> int:
    root = argv[1] if len(argv) > 1 else "."
    mods = modules(root)
    g = graph(mods)
    cyc, bad = cycles(g, sorted(mods)), back_edges(g)
    print(f"{len(mods)} modules; cycles: {len(cyc)} {cyc[:3]}; back-edges: {len(bad)} {bad[:6]}")
    return 1 if cyc or bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
