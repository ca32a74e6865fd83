"""``dense``: the baseline. Plain ``nn.Linear``/``nn.Conv2d``, one forward/backward per batch."""

from __future__ import annotations

from typing import Literal

from lorank.methods.base import Method, MethodConfig
from lorank.methods.registry import register


class DenseConfig(MethodConfig):
    """The dense baseline has no options."""

    name: Literal["dense"] = "dense"


@register
class Dense(Method):
    name = "dense"
    config_class = DenseConfig
