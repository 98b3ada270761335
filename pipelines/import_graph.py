"""The import graph of the ``ncleaner`` package: modules, levels, cycles, the largest modules.

Every import of one package module by another counts, the ones inside functions too (a lazy
import is still a dependency: it only moves when the cost is paid). A module's level is one
more than the highest level it imports (a module importing nothing of the package is level 1);
a cycle is a set of modules that reach each other (Tarjan's strongly connected components).

    python pipelines/import_graph.py            # this checkout
    python pipelines/import_graph.py --root DIR # another one
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def package_imports(package: Path) -> dict[str, set[str]]:
    """Per module of ``package`` (a directory), the package modules it imports."""
    modules = {p.stem: p for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1:
                found.update([node.module.split(".")[0]] if node.module else (a.name for a in node.names))
            elif node.level == 0 and (node.module or "").startswith(f"{package.name}."):
                found.add(node.module.split(".")[1])
        edges[name] = {m for m in found if m in modules and m != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The sets of two or more modules that import each other, directly or through others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def levels(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each module's level; within a cycle the edges back into the cycle are not followed."""
    level: dict[str, int] = {}

    def depth(v: str, path: tuple[str, ...]) -> int:
        if v in level:
            return level[v]
        below = [depth(w, (*path, v)) for w in edges[v] if w not in path and w != v]
        level[v] = 1 + max(below, default=0)
        return level[v]

    for v in sorted(edges):
        depth(v, ())
    return level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    package = args.root / "ncleaner"
    edges = package_imports(package)
    level = levels(edges)
    print(f"modules {len(edges)}, imports {sum(map(len, edges.values()))}, levels {max(level.values())}")
    print(f"cycles: {'; '.join(' <-> '.join(c) for c in cycles(edges)) or 'none'}")
    print("\n| module | level | lines | imports |\n|---|---|---|---|")
    sizes = {m: len((package / f"{m}.py").read_text().splitlines()) for m in edges}
    for m in sorted(edges, key=lambda m: -sizes[m])[:8]:
        print(f"| {m} | {level[m]} | {sizes[m]} | {len(edges[m])} |")


if __name__ == "__main__":
    main()
