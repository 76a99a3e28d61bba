"""The library's shape: modules small enough to own one thing, and imports without a cycle.

Fast: reads the source with `ast` (and imports two modules in a subprocess); starts no Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "ray_codistill"
MAX_LINES = 400  # past this a module owns two things (DESIGN.md, "Layout")


def _modules() -> dict[str, Path]:
    return {f"ray_codistill.{p.stem}": p for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def import_graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports, at any level of the file (function-level
    imports included: a cycle through them is still one)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_library_imports_have_no_cycle():
    graph = import_graph()
    assert graph["ray_codistill.launcher"] >= {"ray_codistill.broker", "ray_codistill.ledger"}  # it reads imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_module_is_over_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_the_exchange_and_ledger_processes_load_neither_torch_nor_pandas():
    """The broker, its shards and the ledger are processes of their own: what their modules
    import is memory in each of them (pandas alone is about 40 MB)."""
    code = ("import sys, ray_codistill.broker, ray_codistill.ledger; "
            "print(sorted(m for m in ('torch', 'pandas', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
