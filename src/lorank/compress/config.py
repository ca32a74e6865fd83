r"""``CompressConfig``: every option of a post-training compression, validated in one place.

The config is what :func:`lorank.compress.compress_model` takes (and what ``lorank compress``
builds from its flags)::

    CompressConfig(
        svd="activation",                      # "plain" | "activation"
        ranks=BudgetRanks(budget=0.5),         # how ranks are chosen: a tagged union
        error_propagation=True, refit=True,    # closed-form corrections (compress/propagation.py)
        finetune=DistillFinetune(steps=200),   # optional distillation on the calibration data
        objective="latency",                   # optional: factorize only where measured faster
    )

**Rank choice** is one of three shapes (``kind`` is the tag), so impossible combinations (a
budget *and* a loss tolerance, a tolerance with a rule) cannot be written:

* ``RuleRanks(rule="tolerance=0.1")``: a rank rule on each layer's (plain or
  activation-weighted) singular values, or ``loss-tolerance=ε``, seed 003's per-layer δ search;
* ``BudgetRanks(budget=b, allocation=...)``: keep b of the compressed layers' weights, ranks by
  ``uniform``, ``greedy`` (each layer's own output error) or ``measured`` (the end-to-end
  effect of each layer's truncation, :mod:`lorank.compress.allocation`);
* ``ToleranceRanks(loss_tolerance=ε, allocation=...)``: the smallest budget whose allocation
  changes the loss on the calibration data by less than ε.

**Objective.** ``objective="latency"`` (default ``"params"``) keeps a layer dense where its
low-rank form does not measure faster at the rank it would get, spends a budget on the layers
where low rank buys time and rounds ranks to faster sizes only when measured faster
(:mod:`lorank.compress.latency`); it needs a calibration or loss batch for the input shapes.

Errors name the config fields (``ranks.budget``, ``finetune.steps``) in backquotes; the CLI
rewrites them to its flags (``--budget``, ``--distill-steps``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorank.errors import LorankError

__all__ = [
    "BudgetRanks",
    "CompressConfig",
    "DistillFinetune",
    "EpochFinetune",
    "RuleRanks",
    "ToleranceRanks",
    "compress_config",
]

DEFAULT_DAMPING = 1e-4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleRanks(_Strict):
    """Ranks from a rank rule on each layer's spectrum, or ``loss-tolerance=ε`` (δ search)."""

    kind: Literal["rule"] = "rule"
    rule: str = "tolerance=0.1"
    precision: float = Field(0.01, gt=0, lt=1)

    @field_validator("rule")
    @classmethod
    def _parses(cls, rule: str) -> str:
        from lorank.compress.rules import CompressionRule

        return str(CompressionRule.parse(rule))


class BudgetRanks(_Strict):
    """Keep ``budget`` of the compressed layers' weights, ranks chosen by ``allocation``."""

    kind: Literal["budget"] = "budget"
    budget: float = Field(gt=0, le=1)
    allocation: Literal["uniform", "greedy", "measured"] = "greedy"


class ToleranceRanks(_Strict):
    """The smallest budget whose allocation changes the calibration loss by < ``loss_tolerance``."""

    kind: Literal["loss_tolerance"] = "loss_tolerance"
    loss_tolerance: float = Field(gt=0, allow_inf_nan=False)
    allocation: Literal["uniform", "greedy"] = "greedy"
    precision: float = Field(0.01, gt=0, lt=1)


class DistillFinetune(_Strict):
    """Train only the low-rank factors, norms and biases to match the uncompressed model's
    outputs on the calibration data (no labels); see :mod:`lorank.compress.distill`."""

    kind: Literal["distill"] = "distill"
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-4, gt=0)
    holdout: float = Field(0.1, gt=0, lt=1)
    eval_every: int = Field(25, ge=1)
    patience: int = Field(4, ge=1)
    loss: Literal["auto", "kl", "cosine", "mse"] = "auto"
    train_norms: bool = True


class EpochFinetune(_Strict):
    """Fine-tune with the source's own training data and trainer (lorank sources only)."""

    kind: Literal["epochs"] = "epochs"
    epochs: int = Field(ge=1)


Ranks = Annotated[RuleRanks | BudgetRanks | ToleranceRanks, Field(discriminator="kind")]
Finetune = Annotated[DistillFinetune | EpochFinetune, Field(discriminator="kind")]


class CompressConfig(_Strict):
    """All options of one compression (see the module doc)."""

    svd: Literal["plain", "activation"] = "plain"
    ranks: Ranks = Field(default_factory=RuleRanks)
    error_propagation: bool = False
    refit: bool = False
    calibration: int | None = Field(None, ge=1)
    """Calibration samples (default: all the calibration batches given)."""
    samples: int = Field(2048, ge=1)
    """Samples the loss is measured on (searches, summaries) when a loss function is given."""
    measure_samples: int = Field(64, ge=1)
    """Samples of the calibration data the ``measured`` allocation probes each layer on."""
    damping: float = Field(DEFAULT_DAMPING, ge=0, allow_inf_nan=False)
    finetune: Finetune | None = None
    objective: Literal["params", "latency"] = "params"
    """``params``: factorize every layer the ranks make smaller; ``latency``: only where the
    low-rank form measures faster on this device, with budgets spent on those layers and ranks
    rounded to faster sizes when measured faster (:mod:`lorank.compress.latency`)."""
    latency_mode: Literal["forward", "train"] = "forward"
    """``objective = "latency"``: time inference (forward) or forward+backward."""
    latency_margin: float = Field(0.05, ge=0, lt=1)
    """``objective = "latency"``: a layer counts as faster low-rank only when it measures at
    least this fraction below its dense time (timings vary by a few percent)."""

    @model_validator(mode="after")
    def _consistent(self) -> CompressConfig:
        if self.error_propagation and self.svd != "activation":
            raise ValueError(
                "`error_propagation` compensates each layer's input error in the activation "
                "metric: it needs `svd` = 'activation'"
            )
        return self

    @property
    def needs_calibration(self) -> bool:
        return (
            self.svd == "activation"
            or self.error_propagation
            or self.refit
            or self.calibration is not None
            or (isinstance(self.ranks, BudgetRanks) and self.ranks.allocation == "measured")
            or isinstance(self.finetune, DistillFinetune)
        )

    @property
    def needs_loss(self) -> bool:
        rule = isinstance(self.ranks, RuleRanks) and self.ranks.rule.startswith("loss-tolerance")
        return rule or isinstance(self.ranks, ToleranceRanks)

    def label(self) -> str:
        """A short description of the rank choice, for summaries."""
        r = self.ranks
        if isinstance(r, BudgetRanks):
            text = f"budget={r.budget} ({r.allocation})"
        elif isinstance(r, ToleranceRanks):
            text = f"loss-tolerance={r.loss_tolerance} (budget search, {r.allocation})"
        else:
            text = r.rule
        if self.objective == "latency":
            text += f", latency ({self.latency_mode})"
        return text


_TAGS = {"rule", "budget", "loss_tolerance", "distill", "epochs"}


def compress_config(
    raw: CompressConfig | dict[str, Any] | None = None, **fields: Any
) -> CompressConfig:
    """A validated :class:`CompressConfig` from a config, a dict or keyword fields; a bad one
    is a one-line :class:`~lorank.errors.LorankError` naming the field in backquotes."""
    if isinstance(raw, CompressConfig) and not fields:
        return raw
    data = raw.model_dump() if isinstance(raw, CompressConfig) else dict(raw or {})
    data.update(fields)
    try:
        return CompressConfig.model_validate(data)
    except ValidationError as e:
        raise LorankError(describe(e)) from None
    except LorankError as e:  # a rank rule that does not parse
        raise LorankError(f"`ranks.rule`: {e}") from None


def describe(error: ValidationError) -> str:
    """One line for the first problem of a config: the field, what is wrong, the value."""
    err = error.errors()[0]
    loc = err["loc"]
    # pydantic puts the union tag after the union field: ("ranks", "budget", "budget")
    key = ".".join(
        str(p)
        for i, p in enumerate(loc)
        if not (i > 0 and loc[i - 1] in ("ranks", "finetune") and p in _TAGS)
    )
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, dict) or not key else f" (got {value!r})"
    where = f"`{key}`: " if key else ""
    if err["type"] == "extra_forbidden":
        return f"compress config: unknown field `{key}`"
    return f"compress config: {where}{message}{shown}"
