r"""Rank-selection rules: the single place every method turns a spectrum into a rank.

Every rule receives the singular values :math:`\sigma_1 \ge \dots \ge \sigma_k \ge 0` of a
layer (or of its small core) and the layer's full rank :math:`p = \min(m, n)` and returns an
integer rank. The rules are

==============  =====================================================================
``fixed``        :math:`r`
``fraction``     :math:`\lceil \rho\, p \rceil`, :math:`\rho \in (0, 1]`
``tolerance``    smallest :math:`r` with :math:`\|\sigma_{r+1:}\|_2 \le \tau \|\sigma\|_2`
                 (relative, DLRT) or :math:`\le \tau` (absolute)
``cutoff``       :math:`\#\{i : \sigma_i \ge \beta \sigma_1\}` (OIALR)
``energy``       smallest :math:`r` with
                 :math:`\sum_{i \le r} \sigma_i^2 \ge (1 - e) \sum_i \sigma_i^2`
``stable_rank``  :math:`\lceil c\, \|\sigma\|_2^2 / \sigma_1^2 \rceil` (Cuttlefish)
``delta``        :math:`\#\{i : \sigma_i / \sigma_1 \ge \delta\}`
==============  =====================================================================

and the result is always clamped to :math:`[r_{\min}, \min(r_{\max}, p)]`.

On the command line and in configs a rule is spelled ``rank=16``, ``fraction=0.25``,
``tolerance=0.1``, ``abs-tolerance=0.5``, ``cutoff=0.1``, ``energy=0.01``, ``stable-rank``
(or ``stable-rank=1.5``) or ``delta=0.05``; :meth:`RankRule.parse` reads that spelling and
``str(rule)`` writes it back.

Long because it holds every rank rule, each a few lines with its docstring.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import torch
from pydantic import AfterValidator, PlainSerializer, PlainValidator, WithJsonSchema
from torch import Tensor

from lorank.errors import LorankError

__all__ = [
    "RULE_FORMS",
    "RankKind",
    "RankRule",
    "RankRuleField",
    "cutoff",
    "delta",
    "energy",
    "fixed",
    "fraction",
    "parse_rule_field",
    "resolve_rank",
    "stable_rank",
    "tolerance",
]

RankKind = Literal["fixed", "fraction", "tolerance", "cutoff", "energy", "stable_rank", "delta"]

#: The accepted spellings, quoted in every parse error so the user sees the fix.
RULE_FORMS = (
    "rank=N | fraction=F | tolerance=T | abs-tolerance=T | cutoff=B | energy=E | "
    "stable-rank | stable-rank=C | delta=D"
)

# CLI key -> (kind, absolute). Underscore spellings are accepted too because YAML/JSON users
# naturally write ``stable_rank``; ``str()`` always writes the canonical hyphenated key.
_KEYS: dict[str, tuple[RankKind, bool]] = {
    "rank": ("fixed", False),
    "fraction": ("fraction", False),
    "tolerance": ("tolerance", False),
    "abs-tolerance": ("tolerance", True),
    "cutoff": ("cutoff", False),
    "energy": ("energy", False),
    "stable-rank": ("stable_rank", False),
    "delta": ("delta", False),
}

# Relative slack for ceil(): ``0.1 * 30`` is ``3.0000000000000004`` in binary floating point
# and a naive ceil would turn a requested 10% of 30 into rank 4 instead of 3.
_CEIL_SLACK = 1e-9


def _ceil(x: float) -> int:
    """``ceil(x)`` that ignores floating-point noise just above an integer (monotone in x)."""
    return math.ceil(x - _CEIL_SLACK * max(1.0, abs(x)))


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class RankRule:
    """A rank-selection rule; build one with :func:`fixed`, :func:`tolerance`, ... or :meth:`parse`.

    Attributes:
        kind: which rule (see the module docstring for the formula of each).
        value: the rule's parameter — ``r`` (int) for ``fixed``; ``rho``, ``tau``, ``beta``,
            ``e``, the scale ``c`` or ``delta`` (float) otherwise. ``None`` for ``stable_rank``
            means ``c = 1``.
        absolute: only for ``tolerance``: compare the discarded tail with ``tau`` itself instead
            of ``tau * ||sigma||``.

    Invalid parameters raise :class:`~lorank.errors.LorankError` at construction, so a bad
    config fails before training starts rather than at the first truncation.
    """

    kind: RankKind
    value: float | int | None
    absolute: bool = False

    def __post_init__(self) -> None:
        kinds = get_args(RankKind)
        if self.kind not in kinds:
            raise LorankError(f"unknown rank rule kind {self.kind!r}; use one of {kinds}")
        if self.absolute and self.kind != "tolerance":
            raise LorankError(
                f"absolute=True only applies to the tolerance rule, not {self.kind!r}; "
                "drop it or use abs-tolerance=T"
            )
        # Normalise the stored value (int for fixed, float otherwise) so that equal rules compare
        # equal and ``parse(str(rule)) == rule`` holds.
        object.__setattr__(self, "value", self._checked_value())

    def _checked_value(self) -> float | int:
        kind, v = self.kind, self.value
        name = _canonical_key(kind, self.absolute)
        if kind == "stable_rank" and v is None:
            return 1.0
        if kind == "fixed":
            if not _is_int(v) or int(v) < 1:  # type: ignore[arg-type]
                raise LorankError(
                    f"rank={v!r} must be a whole number >= 1, e.g. rank=16 "
                    f"(allowed forms: {RULE_FORMS})"
                )
            return int(v)  # type: ignore[arg-type]
        if not _is_real(v) or not math.isfinite(float(v)):  # type: ignore[arg-type]
            raise LorankError(f"{name}={v!r} is not a finite number; allowed forms: {RULE_FORMS}")
        x = float(v)  # type: ignore[arg-type]
        ok, allowed = {
            "fraction": (0.0 < x <= 1.0, "in (0, 1]"),
            "tolerance": (x >= 0.0, ">= 0"),
            "cutoff": (0.0 <= x <= 1.0, "in [0, 1]"),
            "energy": (0.0 <= x < 1.0, "in [0, 1)"),
            "stable_rank": (x > 0.0, "> 0"),
            "delta": (0.0 <= x <= 1.0, "in [0, 1]"),
        }[kind]
        if not ok:
            raise LorankError(
                f"{name}={v!r} is out of range; it must be {allowed} (allowed forms: {RULE_FORMS})"
            )
        return x

    # ------------------------------------------------------------------ spelling

    @classmethod
    def parse(cls, text: str) -> RankRule:
        """Read the CLI spelling, e.g. ``"tolerance=0.1"``, ``"rank=16"``, ``"stable-rank"``.

        Keys are case-insensitive and may use ``_`` instead of ``-``; spaces around ``=`` are
        ignored. Raises :class:`~lorank.errors.LorankError` listing the allowed forms.
        """
        if not isinstance(text, str):
            raise LorankError(f"rank rule must be a string like 'energy=0.01', got {text!r}")
        key, sep, raw = text.strip().partition("=")
        key = key.strip().lower().replace("_", "-")
        raw = raw.strip()
        if key not in _KEYS:
            raise LorankError(f"unknown rank rule {text!r}; allowed forms: {RULE_FORMS}")
        kind, absolute = _KEYS[key]
        if not sep:
            if kind == "stable_rank":
                return cls("stable_rank", None)
            raise LorankError(
                f"rank rule {text!r} needs a value, e.g. '{key}=...'; allowed forms: {RULE_FORMS}"
            )
        value: float | int
        try:
            value = int(raw) if kind == "fixed" else float(raw)
        except ValueError:
            what = "a whole number" if kind == "fixed" else "a number"
            raise LorankError(
                f"rank rule {text!r}: {raw!r} is not {what}; allowed forms: {RULE_FORMS}"
            ) from None
        return cls(kind, value, absolute)

    def __str__(self) -> str:
        key = _canonical_key(self.kind, self.absolute)
        if self.kind == "stable_rank" and self.value == 1.0:
            return key
        # repr() of a float is the shortest string that reads back to the same float, which is
        # what makes parse(str(rule)) == rule exact.
        return f"{key}={self.value!r}"

    # ------------------------------------------------------------------ selection

    def select(
        self,
        sigma: Tensor,
        r_min: int = 1,
        r_max: int | None = None,
        *,
        full_rank: int | None = None,
    ) -> int:
        """Pick a rank from the singular values ``sigma``, clamped to ``[r_min, min(r_max, p)]``.

        Args:
            sigma: 1-D tensor of singular values (any float dtype/device; no gradient is taken).
                Magnitudes are used and re-sorted descending, so a trained diagonal that went
                negative or out of order is still handled. An all-zero spectrum gives ``r_min``.
            r_min: smallest rank to return (>= 1).
            r_max: largest rank to return; ``None`` means ``p``. Values above ``p`` are lowered
                to ``p``, and if then ``r_min > r_max`` the result is ``r_max``.
            full_rank: the layer's full rank ``p = min(m, n)`` when ``sigma`` holds fewer values
                (e.g. the spectrum of an r x r core); defaults to ``len(sigma)``. It sets the
                base of ``fraction`` and the upper clamp; spectrum rules only count the given
                values (the missing ones are treated as zeros, which those rules never keep).

        Returns:
            The selected rank as a Python ``int``.
        """
        s = _spectrum(sigma)
        k = s.numel()
        p = k if full_rank is None else full_rank
        if not _is_int(p) or p < k:
            raise ValueError(f"full_rank={full_rank!r} must be an int >= len(sigma)={k}")
        lo, hi = _bounds(r_min, r_max, int(p))
        r = self._raw_rank(s, int(p))
        return max(lo, min(r, hi))

    def _raw_rank(self, s: Tensor, p: int) -> int:
        """The unclamped rank; ``s`` is float64, non-negative, descending, non-empty."""
        v = self.value
        if self.kind == "fixed":
            return int(v)  # type: ignore[arg-type]
        if self.kind == "fraction":
            return _ceil(float(v) * p)  # type: ignore[arg-type]
        x = float(v)  # type: ignore[arg-type]
        s1 = s[0]
        if s1 <= 0:
            # Nothing carries any energy: every spectral rule keeps nothing and the clamp
            # raises the result to r_min. (Without this, cutoff/delta would count 0 >= 0.)
            return 0
        if self.kind == "tolerance":
            # tail_sq[r] = sum_{i > r} sigma_i^2 for r = 0..k. A reversed cumsum of non-negative
            # numbers is monotone even in floating point, so counting the entries above the
            # threshold is exactly "the smallest r whose tail is within the threshold".
            sq = s * s
            suffix = sq.flip(0).cumsum(0).flip(0)
            tail = torch.cat([suffix, suffix.new_zeros(1)]).sqrt()
            threshold = x if self.absolute else x * tail[0]
            return int((tail > threshold).sum())
        if self.kind == "energy":
            # kept[r] = sum_{i <= r} sigma_i^2 for r = 0..k; smallest r with kept[r] >= target.
            sq = s * s
            kept = torch.cat([sq.new_zeros(1), sq.cumsum(0)])
            target = (1.0 - x) * kept[-1]
            return int((kept < target).sum())
        if self.kind == "cutoff":
            return int((s >= x * s1).sum())
        if self.kind == "delta":
            # Literally sigma_i / sigma_1 >= delta, as in the reference truncation code.
            return int((s / s1 >= x).sum())
        if self.kind == "stable_rank":
            return _ceil(x * float((s * s).sum() / (s1 * s1)))
        raise AssertionError(f"unhandled rank rule kind {self.kind!r}")  # pragma: no cover


def _canonical_key(kind: RankKind, absolute: bool) -> str:
    if kind == "tolerance" and absolute:
        return "abs-tolerance"
    return {"fixed": "rank", "stable_rank": "stable-rank"}.get(kind, kind)


def _spectrum(sigma: Tensor) -> Tensor:
    """Detached float64 magnitudes sorted descending; float64 keeps the tail sums exact enough."""
    s = torch.as_tensor(sigma).detach()
    if s.dim() != 1:
        raise ValueError(
            f"sigma must be a 1-D tensor of singular values, got shape {tuple(s.shape)}"
        )
    if s.numel() == 0:
        raise ValueError("sigma is empty; a layer has at least one singular value")
    s = s.to(device="cpu", dtype=torch.float64).abs()
    if not torch.isfinite(s).all():
        raise LorankError(
            "singular values contain NaN or inf (training diverged); lower the learning rate "
            "or resume from an earlier checkpoint"
        )
    return s.sort(descending=True).values


def _bounds(r_min: int, r_max: int | None, p: int) -> tuple[int, int]:
    if not _is_int(r_min) or r_min < 1:
        raise LorankError(f"minimum rank {r_min!r} must be a whole number >= 1; use e.g. 1")
    if r_max is not None and (not _is_int(r_max) or r_max < 1):
        raise LorankError(f"maximum rank {r_max!r} must be a whole number >= 1 (or unset)")
    hi = p if r_max is None else min(int(r_max), p)
    lo = min(int(r_min), hi)
    return lo, hi


# ---------------------------------------------------------------------- constructors


def fixed(r: int) -> RankRule:
    """Always rank ``r`` (then clamped)."""
    return RankRule("fixed", r)


def fraction(rho: float) -> RankRule:
    r"""Rank :math:`\lceil \rho p \rceil` for :math:`\rho \in (0, 1]`."""
    return RankRule("fraction", rho)


def tolerance(tau: float, absolute: bool = False) -> RankRule:
    r"""DLRT truncation: smallest :math:`r` with :math:`\|\sigma_{r+1:}\|_2 \le \tau\|\sigma\|_2`.

    With ``absolute=True`` the bound is :math:`\|\sigma_{r+1:}\|_2 \le \tau`.
    """
    return RankRule("tolerance", tau, absolute)


def cutoff(beta: float) -> RankRule:
    r"""OIALR: keep the :math:`\sigma_i \ge \beta \sigma_1`, :math:`\beta \in [0, 1]`."""
    return RankRule("cutoff", beta)


def energy(e: float) -> RankRule:
    r"""Smallest :math:`r` keeping a :math:`1 - e` share of :math:`\sum \sigma_i^2`."""
    return RankRule("energy", e)


def stable_rank(scale: float = 1.0) -> RankRule:
    r"""Cuttlefish: :math:`\lceil c \|\sigma\|_2^2 / \sigma_1^2 \rceil` with scale :math:`c > 0`."""
    return RankRule("stable_rank", scale)


def delta(d: float) -> RankRule:
    r"""Keep the :math:`\sigma_i` with :math:`\sigma_i / \sigma_1 \ge \delta` ; 0 keeps all."""
    return RankRule("delta", d)


# ---------------------------------------------------------------------- layer constructors


def resolve_rank(rank: int | float, full_rank: int) -> int:
    r"""Turn a layer constructor's ``rank`` argument into an int.

    An ``int`` is an absolute rank in ``[1, full_rank]``; a ``float`` is a fraction
    :math:`\rho \in (0, 1]` of the full rank and gives :math:`\lceil \rho p \rceil` (so ``1.0`` is
    full rank). ``bool`` is rejected because ``True`` would silently mean rank 1.
    """
    if not _is_int(full_rank) or full_rank < 1:
        raise ValueError(f"full_rank={full_rank!r} must be an int >= 1")
    p = int(full_rank)
    if _is_int(rank):
        r = int(rank)  # type: ignore[arg-type]
        if r < 1:
            raise LorankError(
                f"rank {r} must be >= 1; use a rank in 1..{p} or a fraction in (0, 1]"
            )
        if r > p:
            raise LorankError(
                f"rank {r} exceeds the layer's full rank {p}; use rank <= {p} or a fraction "
                "like 0.5"
            )
        return r
    if _is_real(rank):
        rho = float(rank)
        if not (math.isfinite(rho) and 0.0 < rho <= 1.0):
            raise LorankError(
                f"rank fraction {rank!r} must be in (0, 1]; for an absolute rank pass an int "
                f"in 1..{p}"
            )
        return max(1, min(p, _ceil(rho * p)))
    raise LorankError(
        f"rank {rank!r} must be an int in 1..{p} or a fraction in (0, 1], not {type(rank).__name__}"
    )


# ---------------------------------------------------------------------- pydantic support


def parse_rule_field(v: Any) -> RankRule:
    """Coerce a config value into a :class:`RankRule`, for pydantic validators.

    Accepts a :class:`RankRule`, its string spelling (``"energy=0.01"``), an ``int`` (a fixed
    rank) or a ``float`` (a fraction of full rank). Use it as
    ``field_validator("rule", mode="before")(...)`` or via the :data:`RankRuleField` alias.
    Raises ``ValueError`` with the one-line message, so pydantic reports it under the
    config key that held the bad rule.
    """
    try:
        return _coerce_rule(v)
    except LorankError as e:
        raise ValueError(str(e)) from None


def _coerce_rule(v: Any) -> RankRule:
    if isinstance(v, RankRule):
        return v
    if isinstance(v, str):
        return RankRule.parse(v)
    if _is_int(v):
        return fixed(int(v))
    if _is_real(v):
        return fraction(float(v))
    raise LorankError(
        f"rank rule must be a string like 'energy=0.01', got {v!r}; allowed forms: {RULE_FORMS}"
    )


#: Annotated type for pydantic models: validates from the string spelling (or a RankRule /
#: int / float, see :func:`parse_rule_field`) and serialises back to the string.
RankRuleField = Annotated[
    RankRule,
    PlainValidator(parse_rule_field),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": RULE_FORMS}),
]


def _check_rank_spec(v: int | float) -> int | float:
    if isinstance(v, bool):
        raise ValueError("rank must be an int >= 1 or a fraction in (0, 1], not a boolean")
    if isinstance(v, int) and v < 1:
        raise ValueError(f"rank {v} must be >= 1 (or a fraction in (0, 1])")
    if isinstance(v, float) and not 0.0 < v <= 1.0:
        raise ValueError(f"rank fraction {v} must be in (0, 1] (or an int rank >= 1)")
    return v


#: A config field holding a rank: an int >= 1, or a fraction of each layer's full rank in
#: (0, 1]. Whether an int fits a layer is checked when the layer is built.
RankSpec = Annotated[int | float, AfterValidator(_check_rank_spec)]
