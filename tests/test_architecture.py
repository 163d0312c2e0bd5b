"""The shape of the code: no import cycles in gcr/, and the loop depends only on records and Protocols.

Every import counts, the ones inside functions too: a cycle hidden in a function is still a cycle of
concepts, and it is how `critic.py` and `generate.py` once came to need each other.
"""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gcr"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path, modules: set) -> set:
    """Modules of gcr that `path` imports anywhere in its body (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from gcr.x import y`: y is a module when gcr/x/y.py exists, else a name in gcr.x.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): internal_imports(f, modules) for f in files}


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "gcr.critics.fastdecode" in graph["gcr.critics.inprocess"]  # imported inside __init__
    assert "gcr.records" in graph["gcr.loop"]


def test_there_is_no_import_cycle_in_gcr():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_the_cli():
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if not m.startswith("gcr.cli")
                   and any(d.startswith("gcr.cli") for d in deps))
    assert users == []


def test_the_loop_imports_only_records_decisions_and_protocols():
    assert import_graph()["gcr.loop"] <= {"gcr.records", "gcr.decide", "gcr.parse", "gcr.rewrite",
                                          "gcr.errors", "gcr.critics.base"}
    code = ("import sys, gcr.loop; "
            "loaded = sorted(m for m in sys.modules if m.startswith(('gcr.critics.', 'gcr.generate', 'torch', "
            "'transformers', 'diffusers', 'openai')) and m != 'gcr.critics.base'); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
