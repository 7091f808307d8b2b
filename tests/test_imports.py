"""The import graph of the project's packages has no circles, and importing a module changes
nothing outside it (the CLI sets its libraries' environment when it runs, not when imported)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["ddpo", "cluster", "actors", "learner", "rewards"]


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of project modules: every import statement in it, at the top, in a
    function or under TYPE_CHECKING (an import made late or for types only still ties the two
    modules together). `from a import b` counts `a.b` where b is a module, else `a`."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.update(owner(f"{node.module}.{alias.name}") for alias in node.names)
        graph[name] = found - {None, name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_the_walk_finds_the_project_imports():
    graph = import_graph(project_modules())
    assert "ddpo.config" in graph["cluster.driver"]
    assert "ddpo.errors" in graph["cluster.cli"]
    assert "ddpo.families" in graph["ddpo.families.sd"]


def test_no_import_circles():
    assert circles(import_graph(project_modules())) == []


def _writes_environment(node: ast.AST) -> bool:
    """`os.environ[...] = ...`, `os.environ.setdefault/update/pop(...)`, `os.putenv(...)`."""
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ" for t in targets)
    if isinstance(node, ast.Call):
        return ast.unparse(node.func) in {"os.environ.setdefault", "os.environ.update", "os.environ.pop",
                                          "os.putenv", "os.unsetenv"}
    return False


def test_no_module_writes_the_environment_when_imported():
    """Only statements that run at import count: those outside functions and classes' methods."""
    writers = []
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text(), str(path))
        pending = list(tree.body)
        while pending:
            node = pending.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if _writes_environment(node):
                writers.append(f"{name}:{node.lineno}")
            pending.extend(ast.iter_child_nodes(node))
    assert writers == []


def test_importing_the_cli_leaves_the_environment_as_it_was():
    code = ("import os; before = dict(os.environ); import cluster.cli; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY",
                                                            "TOKENIZERS_PARALLELISM")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
