"""The plan of the house: imports run one way, downward (``train/`` → ``algorithms/``, ``datasets/``, ``models/`` →
``engine/``), and no two modules import each other, directly or round a longer loop.

Every import counts: at the top, inside a function, under ``TYPE_CHECKING``, and a module named by a string
(``importlib.import_module("cadenza.models")``).
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

#: installed name → source folder (pyproject.toml's package-dir)
FOLDERS = {"engine": "engine", "train": "train", "algorithms": "algorithms", "datasets": "datasets", "models": "models"}
ABOVE_THE_KERNEL = ("cadenza.models", "cadenza.datasets", "cadenza.algorithms", "cadenza.train")


def modules() -> dict[str, Path]:
    """``cadenza.engine.state`` → its file, for every module of the package (``__init__`` as the package's name)."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join(("cadenza", package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def named_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of everything a file imports, including names of modules given as strings."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # "from a.b import c": the module a.b.c if there is one, else a.b (imported_modules walks up)
            names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("cadenza."):
            names.append((node.lineno, node.value))  # import_module("cadenza.x"), entry-point strings, ...
    return names


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules a file imports (``from cadenza.engine import dist`` → ``cadenza.engine.dist``)."""
    found = set()
    for _, name in named_imports(path):
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def test_the_kernel_imports_nothing_above_it():
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / "engine").rglob("*.py"))
        for line, name in named_imports(path)
        if name.startswith(ABOVE_THE_KERNEL)
    ]
    assert not offending, "\n".join(offending)


def test_the_check_sees_every_kind_of_import(tmp_path):
    """A check that cannot fail is no check: each way of importing upward is caught."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "import importlib\n"
        "if TYPE_CHECKING:\n    from cadenza.models import CLIP\n"
        "def f():\n    import cadenza.datasets.csv\n    return importlib.import_module('cadenza.algorithms')\n"
        "from cadenza.train import trainer\n"
    )
    caught = {name for _, name in named_imports(sample) if name.startswith(ABOVE_THE_KERNEL)}
    assert {"cadenza.models.CLIP", "cadenza.datasets.csv", "cadenza.algorithms", "cadenza.train.trainer"} <= caught


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_long_and_short_loops():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_two_modules_import_each_other():
    known = modules()
    assert "cadenza.train.trainer" in known and "cadenza.engine.event" in known
    graph = {name: imported_modules(path, known) - {name} for name, path in known.items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_every_docstring_example_runs():
    import doctest
    import importlib

    with_examples = [name for name, path in modules().items() if ">>> " in path.read_text()]
    assert "cadenza.train.zero_shot" in with_examples
    for name in with_examples:
        result = doctest.testmod(importlib.import_module(name))
        assert result.attempted > 0 and result.failed == 0, name


def test_readme_names_every_module_of_the_kernel_and_the_composition_root():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## The code, folder by folder") :].split("\n## ")[0]
    files = [p.name for folder in ("engine", "train") for p in sorted((ROOT / folder).glob("*.py"))]
    missing = [name for name in files if name != "__init__.py" and f"`{name}`" not in layout]
    assert not missing, f"README's layout table does not name {missing}"


def test_folders_import_downward():
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        folder = name.split(".")[1]
        graph.setdefault(folder, set()).update(target.split(".")[1] for target in imported_modules(path, known))
    graph = {folder: targets - {folder} for folder, targets in graph.items()}
    assert find_cycle(graph) is None, graph
    assert graph["engine"] == set()
    assert "train" not in set().union(*(graph[f] for f in ("engine", "algorithms", "datasets", "models")))
