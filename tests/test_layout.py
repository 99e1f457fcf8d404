"""The shape of the code: no import loop anywhere (lazy imports included), and imports flow one way:
``app.py`` -> ``cxr_demo``; ``training`` -> ``cxr_demo``; ``bench`` -> both; ``cxr_demo`` imports none of them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cxr_demo", "training", "bench", "tests")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports, at any depth of the file (functions included)."""
    files = [ROOT / "app.py"] + [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from pkg import mod" imports the module pkg.mod when it is one
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a list of modules, first repeated last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_loop_hidden_in_a_function():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_loop_in_the_project():
    assert find_cycle(import_graph()) is None


def test_imports_flow_one_way():
    graph = import_graph()
    for name, targets in graph.items():
        top = {t.split(".")[0] for t in targets}
        if name.startswith("cxr_demo"):
            assert not top & {"training", "bench", "tests"}, f"{name} imports {sorted(targets)}"
        if name.startswith("training"):
            assert not top & {"bench", "tests"}, f"{name} imports {sorted(targets)}"
    assert not {t for t in graph["app"] if not t.startswith("cxr_demo")}


def test_nothing_in_the_product_serves_only_benchmarks_or_tests():
    """Every cxr_demo module is reachable from the product's entry points (app.py, the batch command line), or
    used by the training package."""
    graph = import_graph()
    used = {"cxr_demo.batch"}
    todo = ["app", "cxr_demo.batch"] + [m for m in graph if m.startswith("training")]
    while todo:
        m = todo.pop()
        for t in graph[m]:
            if t not in used:
                used.add(t)
                todo.append(t)
    product = {m for m in graph if m.startswith("cxr_demo.")}
    assert product <= used, f"only benchmarks or tests use {sorted(product - used)}"
