"""The layering of r1jax (docs/ARCHITECTURE.md), checked from the source with `ast`.

Every module under r1jax/ has one layer from LAYERS; a module imports only modules of its own layer or
below; no group of modules imports itself around a cycle; no file is over MAX_LINES lines; and
`import r1jax.config` loads nothing above the config.

What counts as an import: every `import` and `from ... import` statement anywhere in a module (at module
level, inside functions, under `if TYPE_CHECKING:`), since a late import still ties the two modules
together. A package's `__init__.py` is a module of its own (r1jax.model). `import a.b.c` is an edge to
a.b.c. `from a.b import c` is an edge to a.b (its __init__ runs and c is looked up there) and, when c
is a module, to a.b.c as well; relative imports are resolved against the importing module. So a module
of a package that takes its siblings from the package (`from r1jax.model import moe`) closes a cycle
with a package __init__ that imports that module, even lazily. The one exception is the top-level
facade `r1jax`: it imports what it re-exports lazily and stands above everything, so
`from r1jax import config` is an edge to r1jax.config alone, while `import r1jax` or
`from r1jax import forward` is an edge to the facade (an import of the top layer). Parent packages that
Python runs implicitly for `import a.b.c` are not edges.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "r1jax"
MAX_LINES = 600

# The one table of layers. "x.*" places the package x (its __init__) and every module under it; a name
# without ".*" places exactly that module. A module may import its own layer or lower ones.
LAYERS = {
    "r1jax.errors": 0,
    "r1jax.plugins": 0,
    "r1jax.paths": 0,
    "r1jax.config.*": 1,
    # parallel/ is the mesh, the sharding rules and the TPU slices a mesh is laid on, nothing else
    # (expert dispatch is the model's).
    "r1jax.parallel": 2,
    "r1jax.parallel.mesh": 2,
    "r1jax.parallel.rules": 2,
    "r1jax.parallel.topology": 2,
    "r1jax.model.*": 3,
    "r1jax.data.*": 4,
    "r1jax.checkpoint.*": 4,
    "r1jax.infer.*": 5,
    "r1jax.convert.*": 6,
    "r1jax.api": 7,
    "r1jax.train.*": 8,
    "r1jax.eval.*": 8,
    "r1jax.rl.*": 9,
    "r1jax.pipeline": 10,
    "r1jax.demo": 10,
    "r1jax.curves": 10,  # the pipeline's RL learning curves (reads train metrics)
    "r1jax.plan": 10,
    "r1jax.plan_sampler": 10,
    "r1jax.sample": 10,
    "r1jax.cli": 10,
    # The public facade imports lazily whatever it re-exports; nothing imports it.
    "r1jax": 11,
}

# What `import r1jax.config` may load (besides r1jax.config.* itself).
CONFIG_MAY_LOAD = {"r1jax", "r1jax.errors", "r1jax.plugins"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under r1jax/."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> int | None:
    """The layer of `module` from LAYERS (the most specific entry), or None when the table does not place it."""
    best, best_len = None, -1
    for key, rank in LAYERS.items():
        prefix = key.removesuffix(".*")
        placed = module == prefix or (key.endswith(".*") and module.startswith(prefix + "."))
        if placed and len(prefix) > best_len:
            best, best_len = rank, len(prefix)
    return best


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that `name` denotes: itself, or its longest known parent; None if not ours."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement in the file, in source order."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `from . import x` in a.b.c means a.b; in the package a.b's __init__ it means a.b too.
                base_parts = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from pkg import sub` runs pkg's __init__ and looks sub up there, then imports pkg.sub;
            # only the lazy facade is no edge when what is taken from it is a module.
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            facade_only_for_modules = base == PACKAGE and len(subs) == len(node.names)
            names = subs if facade_only_for_modules else [base, *subs]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.append((target, node.lineno))
    return sorted(set(found), key=lambda t: (t[1], t[0]))


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = module_files()
    return modules, {m: imports_of(m, p, modules) for m, p in modules.items()}


def strongly_connected_components(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); components in no particular order."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def shortest_cycle(start: str, graph: dict[str, list[str]], within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside `within` (breadth-first)."""
    came_from = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in graph[node]:
            if child not in within:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            if child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start}")


def test_every_module_is_placed_in_a_layer():
    unplaced = [f"  {m}  ({p.relative_to(ROOT)})" for m, p in module_files().items() if layer_of(m) is None]
    assert not unplaced, ("modules the LAYERS table in tests/test_architecture.py does not place "
                          "(add each deliberately, at the layer it belongs to):\n" + "\n".join(unplaced))


def test_no_module_imports_a_higher_layer():
    modules, graph = import_graph()
    bad = []
    for module, imports in graph.items():
        rank = layer_of(module)
        for target, line in imports:
            target_rank = layer_of(target)
            if rank is not None and target_rank is not None and target_rank > rank:
                bad.append(f"  {modules[module].relative_to(ROOT)}:{line}  {module} (layer {rank}) "
                           f"imports {target} (layer {target_rank})")
    assert not bad, f"{len(bad)} imports of a higher layer:\n" + "\n".join(bad)


def test_no_import_cycles():
    modules, graph = import_graph()
    edges = {m: [t for t, _ in imports] for m, imports in graph.items()}
    line_of = {(m, t): line for m, imports in graph.items() for t, line in reversed(imports)}
    reports = []
    for component in strongly_connected_components(edges):
        if len(component) < 2:
            continue  # self-imports are dropped in imports_of
        members, uncovered = set(component), set(component)
        reports.append(f"  {len(component)} modules import each other: {', '.join(sorted(component))}\n"
                       f"    shortest cycles through them (module, line of its import ->):")
        for start in sorted(component):  # shortest cycles until every member is on one
            if start not in uncovered:
                continue
            cycle = shortest_cycle(start, edges, members)
            uncovered -= set(cycle)
            steps = " -> ".join(f"{a}:{line_of[a, b]}" for a, b in zip(cycle, cycle[1:]))
            reports.append(f"    {steps} -> {cycle[-1]}")
    assert not reports, "import cycles:\n" + "\n".join(reports)


def test_no_file_is_over_the_line_limit():
    long = [(len(p.read_text().splitlines()), p.relative_to(ROOT)) for p in module_files().values()]
    long = [f"  {path}: {n} lines" for n, path in sorted(long, reverse=True) if n > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines (split them by responsibility):\n" + "\n".join(long)


def test_importing_the_config_loads_nothing_above_it():
    code = "import sys, r1jax.config; print('\\n'.join(sorted(m for m in sys.modules if m.startswith('r1jax'))))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    extra = [m for m in loaded if m not in CONFIG_MAY_LOAD and m != "r1jax.config"
             and not m.startswith("r1jax.config.")]
    assert not extra, (f"`import r1jax.config` also loaded {len(extra)} modules above the config: "
                       + ", ".join(extra))
