"""Training methods, one file each, all behind the protocol in :mod:`lorank.methods.base`.

To add a method, write ``methods/<name>.py`` with a ``MethodConfig`` subclass (``name:
Literal["<name>"]``) and a ``@register``-ed ``Method`` subclass; every module in this package
is imported here, so the method is then available to configs and the CLI.
"""

import importlib
import pkgutil
from typing import Annotated, Union

from pydantic import Field

from lorank.core.reference import document_fields
from lorank.methods.base import Method, MethodConfig
from lorank.methods.registry import METHODS, build, register

# The order here is the order every list of methods shows (registry, reports, compare):
# the baseline, then the training methods roughly by age, then the gradient-free baselines.
# Modules not named here (a new method) are imported after them.
_ORDER = ("dense", "factorized", "svd", "dlrt", "oialr", "nnsvd", "hybrid", "pil", "bipil")
for _name in (*_ORDER, *sorted(i.name for i in pkgutil.iter_modules(__path__))):
    if _name not in ("base", "registry", "reference") and not _name.startswith("_"):
        importlib.import_module(f"{__name__}.{_name}")

# help(FactorizedConfig) etc. list every option with its type, default and description.
for _cls in METHODS.values():
    document_fields(_cls.config_class)

# A discriminated union over every registered method's config, dispatched on ``name``.
AnyMethodConfig = Annotated[
    Union[tuple(cls.config_class for cls in METHODS.values())],  # noqa: UP007
    Field(discriminator="name"),
]

__all__ = ["METHODS", "AnyMethodConfig", "Method", "MethodConfig", "build", "register"]
