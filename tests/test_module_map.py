"""The shape of the code: the job contract is one package that both processes share, and nothing imports in a circle.

The graph is read from the source (every import, at the top of a module or inside a function; only the imports under
`if TYPE_CHECKING:`, which never run, are left out), so a cycle hidden in a function is found too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("api", "worker")
CONTRACT = "worker.contract"
# Tools beside the API process that may import the worker itself: `blipq worker` and `blipq up` start workers (with
# their settings), and the docs' generated configuration page reads the worker's settings model.
TOOLS = ("api.cli", "api.up", "api.reference")


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _runs(node: ast.AST) -> bool:
    """False for the body of `if TYPE_CHECKING:`."""
    return not (isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")


def imported(tree: ast.AST, known: set[str]) -> set[str]:
    """The project modules a module's code imports (a `from package import module` names the module)."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {name for name in names if name in known} or ({node.module} & known)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        stack.extend(child for child in ast.iter_child_nodes(node) if _runs(child))
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def test_the_api_imports_the_worker_package_only_through_the_contract() -> None:
    outside = {
        (module, target)
        for module, targets in import_graph().items()
        if module.startswith("api") and module not in TOOLS
        for target in targets
        if target.startswith("worker") and not target.startswith(CONTRACT)
    }
    assert outside == set()


def test_the_contract_imports_nothing_of_the_worker_outside_it() -> None:
    graph = import_graph()
    outside = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith(CONTRACT)
        for target in targets
        if not target.startswith(CONTRACT)
    }
    assert outside == set()


def test_the_contract_loads_neither_flask_nor_torch() -> None:
    contract = sorted(name for name in module_files() if name.startswith(CONTRACT))
    assert len(contract) > 5
    probe = "import sys\nfor name in {!r}: __import__(name)\nprint(sorted({{'flask', 'torch'}} & set(sys.modules)))"
    probe = probe.format(contract)
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_no_module_imports_itself_back() -> None:
    graph = import_graph()
    cycles = []
    for start in graph:
        reached, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in reached:
                reached.add(module)
                todo.extend(graph[module])
        if start in reached:
            cycles.append(start)
    assert cycles == []


def test_the_graph_sees_a_cycle_hidden_in_a_function() -> None:
    # The check above reaches what it names: an import inside a function counts, one under TYPE_CHECKING does not
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import api.views\ndef f():\n    import api.app\n"
    assert imported(ast.parse(source), {"api.views", "api.app"}) == {"api.app"}
