"""The shape of the code: four packages, and who may import whom.

- `contract`: what both processes must agree on (states, jobs, batches, keys, scripts, images, errors, settings). It
  imports none of the others.
- `api` (the HTTP process) and `worker` (the Celery process) each import `contract`, and never each other.
- `blipq` (the command line, the client, `blipq up`, the docs generator) runs beside them: it may import all three, and
  none of them imports it.

The graph is read from the source (every import, at the top of a module or inside a function, and those under
`if TYPE_CHECKING:` too), so a cycle hidden in a function or in a type annotation is found as well.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.environment import ROOT

PACKAGES = ("api", "blipq", "contract", "worker")
# Which package each package may import, besides itself.
MAY_IMPORT = {
    "contract": set(),
    "api": {"contract"},
    "worker": {"contract"},
    "blipq": {"api", "contract", "worker"},
}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


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
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def package_of(module: str) -> str:
    return module.split(".", 1)[0]


def test_each_package_imports_only_what_it_may() -> None:
    graph = import_graph()
    assert {package_of(module) for module in graph} == set(PACKAGES)
    outside = {
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if package_of(target) != package_of(module) and package_of(target) not in MAY_IMPORT[package_of(module)]
    }
    assert outside == set()


def test_the_contract_loads_neither_flask_nor_torch() -> None:
    contract = sorted(name for name in module_files() if name.startswith("contract."))
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


def test_the_graph_sees_a_cycle_hidden_in_a_function_or_a_type_annotation() -> None:
    # The checks above reach what they name: an import inside a function counts, and so does one under TYPE_CHECKING.
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import api.views\ndef f():\n    import api.app\n"
    assert imported(ast.parse(source), {"api.views", "api.app"}) == {"api.views", "api.app"}


MAX_MODULE_LINES = 400


def test_no_module_is_over_400_lines() -> None:
    long = {
        name: lines
        for name, path in module_files().items()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_test_module_imports_another_or_the_conftest() -> None:
    # What tests share lives in tests/support/ (helpers) and tests/conftest.py (fixtures, which pytest hands over).
    tests = sorted((ROOT / "tests").rglob("test_*.py"))
    assert len(tests) > 40
    imports = {
        (path.name, node.module)
        for path in tests
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests.")
    }
    assert {(name, module) for name, module in imports if module.split(".")[:2] != ["tests", "support"]} == set()
