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
