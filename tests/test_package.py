"""The package's public surface: every lazy export resolves, and type checkers see the same names."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import lavp_core


def _type_checking_imports() -> dict[str, str]:
    """name -> module of the imports inside ``if TYPE_CHECKING:`` in lavp_core/__init__.py."""
    tree = ast.parse(Path(lavp_core.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If)
                 and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
    return {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
            for alias in node.names}


def test_every_export_resolves_to_the_object_of_its_module():
    for name, module in lavp_core._EXPORTS.items():
        obj = getattr(lavp_core, name)
        assert obj is getattr(importlib.import_module(f"lavp_core.{module}"), name), name


def test_type_checkers_see_exactly_the_lazy_exports():
    assert _type_checking_imports() == dict(lavp_core._EXPORTS.items())
    assert lavp_core.__all__ == sorted(lavp_core._EXPORTS)


def test_an_unknown_name_is_an_attribute_error():
    try:
        lavp_core.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("lavp_core.no_such_thing did not raise")


def test_importing_the_package_stays_cheap():
    """``import lavp_core`` loads neither torch nor the study (the app and CLI import what they use)."""
    code = "import sys, lavp_core; print(sorted(m for m in ('torch', 'lavp_core.study', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def _module_level_imports(path: Path, package: str) -> set[str]:
    """lavp_core modules imported at module level (not inside functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("lavp_core"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lavp_core"))
    return found


def test_no_import_cycles_in_the_core():
    """Module-level imports between lavp_core modules form no cycle (the CLI and its commands included)."""
    root = Path(lavp_core.__file__).parent
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in _module_level_imports(path, package) if m in modules and m != name}
    # a package's __init__ importing its own submodules is how packages re-export; leave those edges out
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert "lavp_core.cli" not in {m for n, deps in graph.items() if n.startswith("lavp_core.commands")
                                   for m in deps}
