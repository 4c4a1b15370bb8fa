"""The house: no import circle between mechlib's modules and no module that has outgrown itself."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mechlib"
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the mechlib modules it imports, anywhere in its code (inside functions too: a
    deferred import is still a dependency). Package ``__init__`` files only re-export and are left
    out, as is a module importing its own package."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        if path.name == "__init__.py":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".")[: -node.level]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                deps.update(t for t in [base] + [f"{base}.{a.name}" for a in node.names] if t in mods)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
        graph[name] = {d for d in deps if d != name and mods[d].name != "__init__.py"}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import circle as a list of modules, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    graph = import_graph()
    assert "mechlib.analyses.overlap" in graph and graph["mechlib.evals.coco"] >= {"mechlib.evals.chair"}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_no_module_has_outgrown_itself():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines (split them by concern): {long}"
