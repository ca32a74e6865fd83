"""The rank rules of ``lorank compress``: a :class:`~lorank.core.rank.RankRule`, or
``loss-tolerance=ε``, seed 003's loss-bounded δ search (:mod:`lorank.core.search`)."""

from __future__ import annotations

from dataclasses import dataclass

from lorank.core.rank import RULE_FORMS, RankRule
from lorank.errors import LorankError

LOSS_TOLERANCE_KEY = "loss-tolerance"

__all__ = ["LOSS_TOLERANCE_KEY", "CompressionRule", "rule_help"]


@dataclass
class CompressionRule:
    """A rank rule, or the loss-bounded search with tolerance ``epsilon``."""

    rule: RankRule | None = None
    epsilon: float | None = None

    @classmethod
    def parse(cls, text: str) -> CompressionRule:
        key, sep, value = text.strip().partition("=")
        if key.strip().lower().replace("_", "-") == LOSS_TOLERANCE_KEY:
            try:
                epsilon = float(value)
            except ValueError:
                epsilon = float("nan")
            if not sep or not epsilon > 0 or epsilon == float("inf"):
                raise LorankError(
                    f"rank rule {text!r}: loss-tolerance needs a number > 0, "
                    "e.g. loss-tolerance=0.01"
                )
            return cls(epsilon=epsilon)
        try:
            return cls(rule=RankRule.parse(text))
        except LorankError as e:
            raise LorankError(str(e).replace(RULE_FORMS, rule_help())) from None

    def __str__(self) -> str:
        return f"{LOSS_TOLERANCE_KEY}={self.epsilon!r}" if self.rule is None else str(self.rule)


def rule_help() -> str:
    return f"{RULE_FORMS} | loss-tolerance=EPS"
