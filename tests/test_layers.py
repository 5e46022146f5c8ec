"""The house's layers hold: the library below the applications, no import circles, the kernels
on jax alone, and argparse only in command-line modules. Read from the source (every import
statement in a file, at any depth: an import inside a function still ties the modules), so a
change that breaks a rule fails here, not in a later review."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Lower layers never import higher ones; convert and train sit side by side.
LAYERS = {"cca_kernels": 0, "cca_jax": 1, "convert": 2, "train": 2, "benchmarks": 3}
LIBRARY = ("cca_kernels", "cca_jax")
# Command-line modules of the library (argparse allowed): the shared pieces and each CLI.
COMMAND_LINE = ("cca_jax.command_line",)


def _module_files(root: Path) -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name an import statement in the file names (relative ones resolved)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else \
                    module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the repository modules it imports (the longest prefix that is a module)."""
    modules = _module_files(root)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imported_names(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    order, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:     # recursion depth <= the number of modules (~80)
        if node not in order:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    layer = lambda module: LAYERS[module.split(".")[0]]   # noqa: E731
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if layer(b) > layer(a))


def test_no_import_circle_and_nothing_runs_up():
    graph = import_graph(REPO)
    assert {"cca_jax.llama", "cca_kernels", "train.step"} <= set(graph)   # the walk found the tree
    assert "cca_jax.layer" in graph["cca_jax.llama"]
    assert circles(graph) == []
    assert upward_imports(graph) == []


def test_the_kernels_import_jax_numpy_and_the_standard_library_only():
    third_party = set()
    for module, path in _module_files(REPO).items():
        if module.split(".")[0] != "cca_kernels":
            continue
        for name in _imported_names(module, path):
            top = name.split(".")[0]
            if top and top not in sys.stdlib_module_names and top != "cca_kernels":
                third_party.add(top)
    assert third_party <= {"jax", "numpy"}, sorted(third_party)


def test_argparse_only_in_command_line_modules():
    offenders = []
    for module, path in _module_files(REPO).items():
        if module.split(".")[0] not in LIBRARY:
            continue
        if module in COMMAND_LINE or module.endswith((".cli", ".__main__")):
            continue
        if "argparse" in _imported_names(module, path):
            offenders.append(module)
    assert offenders == []


@pytest.mark.parametrize("source, problem", [
    ({"cca_jax/a.py": "import cca_jax.b\n", "cca_jax/b.py": "from . import a\n"},
     "circle"),
    ({"cca_jax/a.py": "def f():\n    from train import step\n", "train/step.py": ""},
     "upward"),
    ({"cca_kernels/k.py": "from cca_jax.reference import cca\n",
      "cca_jax/reference.py": ""}, "upward"),
])
def test_the_checks_see_a_broken_tree(tmp_path, source, problem):
    for name, text in source.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    if problem == "circle":
        assert circles(graph) == [["cca_jax.a", "cca_jax.b"]]
    else:
        assert len(upward_imports(graph)) == 1
