"""The method reference, generated from the config schemas so it cannot drift from them:
``lorank methods`` and ``lorank methods NAME``, and the field list that ``help()`` shows on
every method config class."""

from __future__ import annotations

import inspect

from lorank.core.reference import fields_table
from lorank.methods.registry import METHODS


def method_summary(name: str) -> str:
    """The first line of the method's config docstring."""
    doc = inspect.getdoc(METHODS[name].config_class) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def method_options(name: str) -> str:
    """The reference of one method: its summary and every option of its ``[method]`` table."""
    cls = METHODS[name]
    lines = [f"method {name!r}: {method_summary(name)}", ""]
    lines += [f'[method]\nname = "{name}"', ""]
    lines += fields_table(cls.config_class)
    if cls.core is not None:
        lines += ["", f"trains layers with core {cls.core!r} (see lorank.LowRankConfig.core)"]
    return "\n".join(lines)
