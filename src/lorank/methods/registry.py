"""Method registry: each method file registers its class; configs dispatch on ``name``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorank.core.convert import register_core_kind
from lorank.errors import LorankError

if TYPE_CHECKING:
    from lorank.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method.name = cls.name`` in configs."""
    METHODS[cls.name] = cls
    register_core_kind(cls.name, cls.core)
    return cls


def build(config: Any) -> Method:
    """The method for a config object or a plain dict like ``{"name": "svd", ...}``."""
    if isinstance(config, dict):
        name = config.get("name", "dense")
        if name not in METHODS:
            raise LorankError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
        config = METHODS[name].config_class.model_validate(config)
    return METHODS[config.name](config)
