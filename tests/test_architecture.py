"""docs/architecture.md stays the truth: every module of the four packages is in its table, and the
imports keep the shape it draws (server -> engine -> workers, configs under all; rooms in layers)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("configs", "engine", "server", "workers")
LAYER = {"server": 3, "engine": 2, "workers": 1, "configs": 0}


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the four packages (packages as their __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports, anywhere in it (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in modules}


def _unit(module: str) -> str:
    """A room (a sub-package such as engine.models) is one unit; a top-level module is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_every_module_is_listed_in_the_architecture():
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = [path.relative_to(ROOT).as_posix() for path in _modules().values() if path.name != "__init__.py"]
    missing = [module for module in modules if f"`{module}`" not in text]
    assert not missing, f"modules missing from docs/architecture.md: {missing}"


def test_imports_point_down_the_layers_and_rooms_form_no_cycle():
    modules = _modules()
    upward, graph = [], {}
    for module, path in modules.items():
        for imported in _imports(path, modules):
            if LAYER[imported.split(".")[0]] > LAYER[module.split(".")[0]]:
                upward.append(f"{module} -> {imported}")
            if path.name != "__init__.py" and modules[imported].name != "__init__.py" \
                    and _unit(imported) != _unit(module):
                graph.setdefault(_unit(module), set()).add(_unit(imported))
    assert not upward, f"imports pointing up a layer: {upward}"
    try:
        TopologicalSorter(graph).static_order()
    except CycleError as cycle:
        raise AssertionError(f"rooms or modules importing each other in a circle: {cycle.args[1]}") from None


def test_no_folder_holds_more_than_a_room_should():
    crowded = {folder.relative_to(ROOT).as_posix(): count for package in PACKAGES
               for folder in [ROOT / package, *(p for p in (ROOT / package).rglob("*") if p.is_dir())]
               if (count := len([f for f in folder.glob("*.py") if f.name != "__init__.py"])) > 12}
    assert not crowded, f"folders over 12 modules: {crowded}"
