"""The package's layering, read from the source: no import cycles (module- and function-level imports
alike), and no upward imports into the flows from the stages, the records, the registry, the OTA repository,
the fleet or the device side (the CLI, in edgeship/cli/, is what wires commands to flows)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgeship"


def import_graph() -> dict[str, set[str]]:
    """edgeship module -> the edgeship modules it imports anywhere in its source."""
    modules = {}
    for source in PACKAGE.rglob("*.py"):
        parts = list(source.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = source

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, source in modules.items():
        here = module.split(".") if source.name == "__init__.py" else module.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            edges.update(target for target in map(resolve, names) if target
                         and target != module and not module.startswith(target + "."))  # a package's own __init__
        graph[module] = {target for target in edges if target.startswith("edgeship")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_upward_imports():
    graph = import_graph()
    upward = {module: sorted(t for t in targets if t.startswith("edgeship.flows"))
              for module, targets in graph.items()
              if module.startswith(("edgeship.tasks", "edgeship.records", "edgeship.device", "edgeship.ota",
                                    "edgeship.fleet", "edgeship.registry"))}
    assert {m: t for m, t in upward.items() if t} == {}
    records = {t for m, targets in graph.items() if m.startswith("edgeship.records") for t in targets}
    assert all(t.startswith("edgeship.records") for t in records), records  # the records stand on pydantic alone


def test_no_module_over_450_lines():
    """Small modules that each do one thing: past 450 lines a module is split by what its parts do."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these modules: {long}"
