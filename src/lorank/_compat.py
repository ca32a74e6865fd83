"""Old import paths of the modules that moved into subpackages in 0.2 (``lorank.optim`` is
now ``lorank.core.optim``, ``lorank.calibration`` is ``lorank.compress.calibration``, ...).

``import lorank.optim`` and ``from lorank.calibration import ...`` keep working: a meta path
finder answers the old name with a thin module that forwards every attribute to the new one
(the same functions and classes, so ``isinstance`` behaves as before) and warns with the new
name. ``lorank.convert`` is not among them: it is the public function, and a module of that
name would shadow it; the module is ``lorank.core.convert``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED = {
    "lorank.layers": "lorank.core.layers",
    "lorank.attention": "lorank.core.attention",
    "lorank.rank": "lorank.core.rank",
    "lorank.regularizers": "lorank.core.regularizers",
    "lorank.optim": "lorank.core.optim",
    "lorank.io": "lorank.core.io",
    "lorank.metrics": "lorank.core.metrics",
    "lorank.search": "lorank.core.search",
    "lorank.train": "lorank.training.trainer",
    "lorank.checkpoint": "lorank.training.checkpoint",
    "lorank.config": "lorank.training.config",
    "lorank.distributed": "lorank.training.distributed",
    "lorank.evaluate": "lorank.training.evaluate",
    "lorank.calibration": "lorank.compress.calibration",
    "lorank.allocation": "lorank.compress.allocation",
    "lorank.sweep": "lorank.experiments.sweep",
    "lorank.compare": "lorank.experiments.compare",
    "lorank.report": "lorank.experiments.report",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def exec_module(self, module: ModuleType) -> None:
        warnings.warn(
            f"{module.__name__} moved to {self.new}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        new = importlib.import_module(self.new)
        module.__getattr__ = lambda name: getattr(new, name)  # type: ignore[method-assign]
        module.__dir__ = lambda: dir(new)  # type: ignore[method-assign]
        module.__all__ = getattr(new, "__all__", [n for n in dir(new) if not n.startswith("_")])


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(new))


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
