"""Option tables generated from pydantic config schemas, so the reference cannot drift from
the code: ``lorank methods NAME`` prints them and :func:`document_fields` puts them in a config
class's docstring, which is what ``help(lorank.LowRankConfig)`` shows."""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "(required)" if field.default_factory is None else repr(field.default_factory())
    return repr(field.default)


def fields_table(model: type[BaseModel], skip: tuple[str, ...] = ("name",)) -> list[str]:
    """``option  type  default  description`` lines for every field of ``model``."""
    rows = [
        (key, _type_name(f.annotation), _default(f), f.description or "")
        for key, f in model.model_fields.items()
        if key not in skip
    ]
    if not rows:
        return ["(no options)"]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [
        f"{key:<{widths[0]}}  {kind:<{widths[1]}}  {default:<{widths[2]}}  {text}".rstrip()
        for key, kind, default, text in rows
    ]


def document_fields(model: type[BaseModel]) -> None:
    """Append the field table to ``model.__doc__`` so ``help(model)`` shows the options."""
    if model.__doc__ and "Options:" in model.__doc__:
        return
    table = "\n".join("    " + line for line in fields_table(model, skip=()))
    model.__doc__ = f"{inspect.getdoc(model) or ''}\n\nOptions:\n\n{table}\n"
