"""Static checks of the code's shape, one line per violation (``path:line: what``).

    python -m tools.code_shape [--root PATH]

Over the packages in ``PACKAGES`` (everything but the tests) it reports:

- import cycles among the project's modules: imports inside function bodies count, those under
  ``if TYPE_CHECKING:`` do not; an import names the deepest project module it reaches
  (``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``);
- imports of a stage module (``orchestration.stages.<stage>``) from anywhere but
  ``orchestration/stages/__init__.py``, ``orchestration/pipeline.py`` and ``orchestration/cli.py``;
- ``sys.path`` edits (assignments, item assignments, ``del``, ``+=``, mutating method calls);
- functions over ``MAX_FUNCTION_LINES`` lines (``def`` to last line) and files over
  ``MAX_FILE_LINES`` lines.

Exits 1 when it found any violation, else 0.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("generalist", "clustering", "specialists", "distill", "orchestration", "benchmarks")
STAGES_PACKAGE = "orchestration.stages"
STAGE_IMPORTERS = ("orchestration.stages", "orchestration.pipeline", "orchestration.cli")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500
PATH_MUTATORS = ("append", "extend", "insert", "remove", "pop", "clear", "reverse", "sort",
                 "__setitem__", "__delitem__", "__iadd__")


@dataclass(frozen=True, order=True)
class Violation:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "orchestration.stages" for orchestration/stages/__init__.py
    path: str  # relative to the root, e.g. "orchestration/stages/__init__.py"
    tree: ast.Module
    lines: int

    @property
    def package(self) -> str:
        """The package relative imports start from."""
        return self.name if self.path.endswith("__init__.py") else self.name.rpartition(".")[0]


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int


# ------------------------------------------------------------------------------ reading
def load_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Module]:
    """Every ``.py`` file under ``root/<package>``, parsed, by dotted module name."""
    modules = {}
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            relative = file.relative_to(root)
            parts = list(relative.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            text = file.read_text(encoding="utf-8")
            tree = ast.parse(text, filename=str(relative))
            name = ".".join(parts)
            modules[name] = Module(name, relative.as_posix(), tree, len(text.splitlines()))
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import under ``node`` (function bodies included), skipping ``if TYPE_CHECKING:``."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: list[ast.AST] = list(node.orelse)
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        yield from _import_nodes(child)


def _deepest(name: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of ``name`` that is a project module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: Module, node: ast.Import | ast.ImportFrom, modules: dict[str, Module]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        source = _absolute(module, node)
        names = [f"{source}.{alias.name}" for alias in node.names]
    return {t for t in (_deepest(n, modules) for n in names) if t is not None}


def import_edges(modules: dict[str, Module]) -> list[Edge]:
    """Project-internal imports, one edge per (importer, imported module, line)."""
    edges = set()
    for module in modules.values():
        for node in _import_nodes(module.tree):
            for target in _targets(module, node, modules):
                if target != module.name:
                    edges.add(Edge(module.name, target, node.lineno))
    return sorted(edges, key=lambda e: (e.source, e.line, e.target))


# ------------------------------------------------------------------------------ cycles
def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module, each sorted, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = _pop_component(stack, on_stack, node)
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(found)


def _pop_component(stack: list[str], on_stack: set[str], root: str) -> list[str]:
    component = []
    while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == root:
            return component


def _shortest_cycle(start: str, graph: dict[str, list[str]], members: set[str]) -> list[str]:
    """The shortest path ``start -> ... -> start`` inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in graph[node]:
                if child not in members or child in previous:
                    continue
                previous[child] = node
                if child == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(previous[path[-1]])
                    return path[::-1]
                following.append(child)
        frontier = following
    raise ValueError(f"{start} is on no cycle")


def cycle_violations(modules: dict[str, Module], edges: list[Edge]) -> list[Violation]:
    """One line per group of modules that import each other, with one cycle through it."""
    graph: dict[str, list[str]] = {name: [] for name in modules}
    first_line: dict[tuple[str, str], int] = {}
    for edge in edges:
        if (edge.source, edge.target) not in first_line:
            graph[edge.source].append(edge.target)
            first_line[(edge.source, edge.target)] = edge.line
    found = []
    for component in _strongly_connected(graph):
        cycle = _shortest_cycle(component[0], graph, set(component))
        hops = [f"{b} ({modules[a].path}:{first_line[(a, b)]})"
                for a, b in itertools.pairwise(cycle)]
        rest = sorted(set(component) - set(cycle))
        also = f"; the same cycle group also holds {', '.join(rest)}" if rest else ""
        start = modules[cycle[0]]
        found.append(Violation(start.path, first_line[(cycle[0], cycle[1])],
                               f"import cycle: {cycle[0]} -> {' -> '.join(hops)}{also}"))
    return found


# ------------------------------------------------------------------------------ the other rules
def stage_import_violations(modules: dict[str, Module], edges: list[Edge]) -> list[Violation]:
    allowed = ", ".join(modules[m].path if m in modules else m for m in STAGE_IMPORTERS)
    return [Violation(modules[e.source].path, e.line,
                      f"imports stage module {e.target} (only {allowed} may)")
            for e in edges
            if e.target.startswith(STAGES_PACKAGE + ".") and e.source not in STAGE_IMPORTERS]


def _sys_aliases(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound to the ``sys`` module, and names bound to ``sys.path`` itself."""
    modules, paths = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "sys"}
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and not node.level:
            paths |= {a.asname or a.name for a in node.names if a.name == "path"}
    return modules, paths


def _is_sys_path(node: ast.AST, modules: set[str], paths: set[str]) -> bool:
    if isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return node.id in paths
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id in modules)


def _edited(node: ast.AST) -> list[ast.AST]:
    """What ``node`` writes to: assignment targets, deleted items, a mutating call's object."""
    if isinstance(node, ast.Assign):
        return list(node.targets)
    if isinstance(node, ast.AugAssign | ast.AnnAssign):
        return [node.target]
    if isinstance(node, ast.Delete):
        return list(node.targets)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in PATH_MUTATORS):
        return [node.func.value]
    return []


def sys_path_violations(module: Module) -> list[Violation]:
    modules, paths = _sys_aliases(module.tree)
    return [Violation(module.path, node.lineno, "edits sys.path (install the package, or run "
                                                "`python -m` from the repository root)")
            for node in ast.walk(module.tree)
            if any(_is_sys_path(t, modules, paths) for t in _edited(node))]


def size_violations(module: Module) -> list[Violation]:
    found = []
    if module.lines > MAX_FILE_LINES:
        found.append(Violation(module.path, 1, f"file is {module.lines} lines (limit {MAX_FILE_LINES})"))
    for qualname, node in _functions(module.tree, ""):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
            found.append(Violation(module.path, node.lineno,
                                   f"function {qualname} is {length} lines (limit {MAX_FUNCTION_LINES})"))
    return found


def _functions(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method with its qualified name (``Class.method``, ``outer.inner``)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from _functions(child, name + ".")
        else:
            yield from _functions(child, prefix)


# ------------------------------------------------------------------------------ entry point
def check(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[Violation]:
    """Every violation under ``root``, sorted by file and line."""
    modules = load_modules(root, packages)
    edges = import_edges(modules)
    found = cycle_violations(modules, edges) + stage_import_violations(modules, edges)
    for module in modules.values():
        found += sys_path_violations(module) + size_violations(module)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the repository root (default: the one holding this file)")
    args = parser.parse_args(argv)
    violations = check(args.root)
    for violation in violations:
        print(violation)
    print(f"{len(violations)} violation(s) in {', '.join(PACKAGES)}", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
