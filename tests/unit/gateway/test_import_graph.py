"""The gateway's modules import one another one way: no circle, counting the
imports made only for type checking (a circle there is still a knot)."""

from __future__ import annotations

import ast
from pathlib import Path

import cortex_gateway

PACKAGE = Path(cortex_gateway.__file__).resolve().parent


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports (``from .x import``, ``from . import x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found - {"__init__"}


def test_no_module_of_the_gateway_reaches_itself_through_its_imports():
    graph = {path.stem: imports_of(path) for path in PACKAGE.glob("*.py")}
    circles = []
    for start in graph:
        stack = [(start, [start])]
        seen = set()
        while stack:
            module, path = stack.pop()
            for target in graph.get(module, ()):
                if target == start:
                    circles.append(" -> ".join([*path, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    assert circles == []


def test_the_graph_is_read_from_the_real_imports():
    # The check above could pass on an empty graph: these arrows exist.
    graph = {path.stem: imports_of(path) for path in PACKAGE.glob("*.py")}
    assert {"config", "forwarding"} <= graph["app"]
    assert "admin" in graph["workers"]
    assert "policies" in graph["config"]
