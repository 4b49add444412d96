"""The import graph of jetmoe, read from the source (every import, at module level or inside a function).

    python tests/helpers/import_graph.py     prints each package's imports, the layers and any cycle

`from pkg import module` counts as an import of that module, not of the package's __init__.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Lowest first: a module may import its own layer's modules or lower layers', never a higher one.
LAYERS = (("jetmoe.errors", "jetmoe.log", "jetmoe.paths"), ("jetmoe.model", "jetmoe.data"), ("jetmoe.parallel",),
          ("jetmoe.plan",), ("jetmoe.training",), ("jetmoe",))


def modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "jetmoe").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def edges() -> dict[str, set[str]]:
    """module -> the jetmoe modules it imports."""
    mods, out = modules(), defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods] + ([node.module] if any(t not in mods for t in subs) else [])
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("jetmoe"):
                    out[name].add(target)
    return out


def layer_of(module: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for unit in layer:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (i, unit)
    return best[0]


def upward_imports() -> list[tuple[str, str]]:
    return sorted((a, b) for a, bs in edges().items() for b in bs if layer_of(b) > layer_of(a))


def cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    graph, index, low, stack, on, found = edges(), {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in modules():
        if v not in index:
            visit(v)
    return found


def main() -> None:
    packages = defaultdict(set)
    for a, bs in edges().items():
        for b in bs:
            pa, pb = LAYERS[layer_of(a)], LAYERS[layer_of(b)]
            unit_a = next(u for u in pa if a == u or a.startswith(u + "."))
            unit_b = next(u for u in pb if b == u or b.startswith(u + "."))
            if unit_a != unit_b:
                packages[unit_a].add(unit_b)
    for unit in sorted(packages):
        print(f"{unit} -> {', '.join(sorted(packages[unit]))}")
    print("layers, lowest first:", " | ".join(", ".join(layer) for layer in LAYERS))
    print("upward imports:", upward_imports() or "none")
    print("cycles:", cycles() or "none")


if __name__ == "__main__":
    main()
