#!/usr/bin/env python3
"""Rooms of the ggufmix package and the imports between them: floors from the bottom, and any cycle.

Usage: python scripts/import_graph.py [ggufmix]
"""
import ast, os, sys, collections
root = sys.argv[1] if len(sys.argv) > 1 else "ggufmix"
def room(mod):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else parts[0]
edges = collections.defaultdict(set)
fileedges = collections.defaultdict(set)
for dp, _, fs in os.walk(root):
    for f in fs:
        if not f.endswith(".py"): continue
        p = os.path.join(dp, f)
        mod = p[:-3].replace("/", ".").replace(".__init__", "")
        pkg = mod if f == "__init__.py" else mod.rsplit(".", 1)[0]
        tree = ast.parse(open(p).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("ggufmix"):
                    if not node.module and node.level:
                        for a in node.names: 
                            fileedges[mod].add(target + "." + a.name)
                    else:
                        fileedges[mod].add(target)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("ggufmix"):
                        fileedges[mod].add(a.name)
for m, ts in fileedges.items():
    for t in ts:
        a, b = room(m), room(t)
        if a != b: edges[a].add(b)
for a in sorted(edges): print(a, "->", sorted(edges[a]))
# floors and cycles
rooms = set(edges) | {b for v in edges.values() for b in v}
floor = {}
def depth(r, stack=()):
    if r in stack: raise SystemExit(f"cycle: {' -> '.join(stack + (r,))}")
    if r not in floor:
        floor[r] = 1 + max((depth(b, stack + (r,)) for b in edges.get(r, ()) if b != "ggufmix"), default=-1)
    return floor[r]
for r in rooms: depth(r)
print("floors:", max(floor.values()) + 1, "rooms:", len(rooms), "cycles: 0")
for f in sorted(set(floor.values())): print(f, sorted(r for r in floor if floor[r] == f))
