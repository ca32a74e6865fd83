"""Training methods, one file each, all behind the protocol in :mod:`lorank.methods.base`.

To add a method, write ``methods/<name>.py`` with a ``MethodConfig`` subclass (``name:
Literal["<name>"]``) and a ``@register``-ed ``Method`` subclass; every module in this package
is imported here, so the method is then available to configs and the CLI.
"""

import importlib
import pkgutil
from typing import Annotated, Union

from pydantic import Field

from lorank.methods.base import Method, MethodConfig
from lorank.methods.registry import METHODS, build, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_info.name}")

# A discriminated union over every registered method's config, dispatched on ``name``.
AnyMethodConfig = Annotated[
    Union[tuple(cls.config_class for cls in METHODS.values())],  # noqa: UP007
    Field(discriminator="name"),
]

__all__ = ["METHODS", "AnyMethodConfig", "Method", "MethodConfig", "build", "register"]
