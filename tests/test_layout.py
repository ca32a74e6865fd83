"""The package's import direction, as written in ``lorank/__init__.py``, kept by parsing imports.

Each top-level part of lorank may import only the parts listed for it (and itself). An import
inside a function counts like any other: a lazy import still couples the two parts.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorank"

BASE = {"errors"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "core": BASE,
    "data": BASE,
    "models": BASE | {"core", "data"},
    "methods": BASE | {"core", "data", "models"},
    "training": BASE | {"core", "data", "models", "methods"},
    "compress": BASE | {"core", "data", "models", "methods", "training"},
    "experiments": BASE | {"core", "data", "models", "methods", "training", "compress"},
    "integrations": BASE | {"core", "data", "models", "methods", "training"},
    "cli": BASE | {"core", "data", "models", "methods", "training", "compress", "experiments"},
}


def part_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return rel.parts[0].removesuffix(".py")


def imported_parts(path: Path) -> set[str]:
    """The lorank parts that ``path`` imports (``from lorank.X ...`` / ``import lorank.X``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "lorank":
                names = [f"lorank.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lorank" and len(parts) > 1:
                found.add(parts[1])
    return found


def violations(root: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        part = part_of(path, root)
        if part in ("__init__", "__main__", "_compat"):
            continue  # the package entry points (and the old-path aliases) re-export the API
        allowed = ALLOWED.get(part)
        if allowed is None:
            bad.append(f"{path.relative_to(root)}: part {part!r} is not in the layout")
            continue
        for other in imported_parts(path) - allowed - {part, "__version__"}:
            bad.append(f"{path.relative_to(root)} imports lorank.{other}")
    return bad


def test_imports_follow_the_layout():
    assert violations() == []


def test_the_layout_test_catches_a_forbidden_import(tmp_path):
    # The core must never depend on the trainer: add such an import to a copy and see it fail.
    copy = tmp_path / "lorank"
    shutil.copytree(SRC, copy)
    layers = copy / "core" / "layers.py"
    layers.write_text(layers.read_text() + "\nfrom lorank.training.trainer import train\n")
    assert violations(copy) == ["core/layers.py imports lorank.training"]


def test_the_docstring_states_the_layout():
    import lorank

    for part in ALLOWED:
        if part not in ("errors", "cli"):
            assert f"lorank.{part}" in (lorank.__doc__ or ""), part


def test_old_module_paths_keep_working_with_a_warning():
    import importlib
    import sys

    import lorank
    from lorank._compat import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=new):
            module = importlib.import_module(old)
        public = [n for n in dir(importlib.import_module(new)) if not n.startswith("_")]
        assert all(getattr(module, n) is getattr(importlib.import_module(new), n) for n in public)
    from lorank.compress import compress  # the package keeps the old module's names
    from lorank.integrations import LowRankHook  # noqa: F401

    assert callable(compress) and callable(lorank.convert)  # not shadowed by a module
