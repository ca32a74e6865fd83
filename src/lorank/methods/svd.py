r"""``svd``: SVD training with orthogonality and singular-value sparsity (Yang et al., 2020).

Each targeted layer is stored in SVD form :math:`W = U\,\mathrm{diag}(s)\,V^\top` and all three
factors are trained on

.. math:: \mathcal{L} = \mathcal{L}_\text{task}
          + \lambda_o \sum_l \tfrac{1}{r_l^2}\big(\|U_l^\top U_l - I\|_F^2
                                             + \|V_l^\top V_l - I\|_F^2\big)
          + \lambda_s \sum_l R(s_l),

with :math:`R` one of none, L1 :math:`\|s\|_1`, Hoyer :math:`\|s\|_1/\|s\|_2` or Hoyer-square
:math:`\|s\|_1^2/\|s\|_2^2`. The two terms are logged as ``loss_orth`` and ``loss_sparsity``.
The orthogonality term keeps ``U`` and ``V`` close to orthonormal, so ``|s|`` are (close to)
the layer's singular values and the sparsity term drives most of them towards zero.

**Pruning** picks each layer's rank with a rank rule (default ``energy=0.01``: keep the
smallest set of ``|s_i|`` holding 99% of :math:`\sum s_i^2`) applied to ``|s|``, and physically
slices the kept columns of ``U``, ``V`` and entries of ``s``. The optimizer's state is sliced the
same way (:func:`lorank.core.optim.swap_parameters` with a slicing transform), so Adam's moments of
the surviving directions continue.

**When things happen.** All rank changes happen in :meth:`SVD.on_epoch_end`, after an epoch's
training and before that epoch's evaluation, so the epoch's metrics record (ranks, params,
test accuracy) already shows the pruned model. At the end of epoch ``e``, in this order:

1. with ``loss_tolerance`` set, seed 003's Algorithm 3: the loss-bounded search
   (:mod:`lorank.core.search`) picks δ on ``search_samples`` fixed training samples and every layer
   is truncated to its exact rank-k SVD (U, V re-orthonormalised; the optimizer state of a
   truncated layer is reset because its basis changed);
2. a prune by ``rule`` if ``e`` is in ``prune_epochs``, or ``e = E − finetune_epochs`` (the
   start of the fine-tune phase, E the run's epochs), or ``e = E`` with ``prune_at_end``;
3. from ``e = E − finetune_epochs`` on, the fine-tune phase: the remaining epochs train with
   :math:`\lambda_s = 0` (the orthogonality term stays), as Yang et al. fine-tune after pruning.

The factors start from the SVD of the dense layer's random init (``init = "svd"``): its
singular values are spread out, whereas the random low-rank init has all ``s_i`` equal, which
is the maximum of the Hoyer measure, where its gradient vanishes and sparsity cannot start.

Authors' values: λ_o = 1; Hoyer λ_s 0.001–0.1; L1 λ_s 0.1–0.3; energy e 1e-3–0.1. The layers
start at full rank by default (``rank = 1.0``), so training costs more parameters than dense
until the first prune.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lorank.core.convert import ConversionReport, convert, low_rank_layers
from lorank.core.layers import LowRankLayer
from lorank.core.optim import swap_parameters
from lorank.core.rank import RankRule, RankRuleField, RankSpec, energy
from lorank.core.regularizers import SparsityKind, orthogonality, sparsity
from lorank.core.search import layer_spectra, loss_bounded_search
from lorank.errors import LorankError
from lorank.methods.base import Method, MethodConfig, MethodConversion
from lorank.methods.registry import register


class SVDConfig(MethodConfig, MethodConversion):
    """Yang et al.'s SVD training: U diag(s) Vᵀ + orthogonality + sparsity, then pruning."""

    name: Literal["svd"] = "svd"
    rank: RankSpec = Field(1.0, description="starting rank (int or fraction; default full)")
    init: Literal["svd", "random"] = Field(
        "svd", description="SVD of the dense init (a spread spectrum), or random (flat s)"
    )
    skip_if_no_savings: bool = Field(
        False, description="leave layers dense when the starting rank saves nothing"
    )
    lambda_orth: float = Field(1.0, ge=0, description="weight λ_o of the orthogonality term")
    lambda_sparsity: float = Field(0.01, ge=0, description="weight λ_s of the sparsity term")
    sparsity: SparsityKind = Field("hoyer", description="none | l1 | hoyer | hoyer_square")
    rule: RankRuleField = Field(energy(0.01), description="rank rule for pruning, on |s|")
    r_min: int = Field(1, ge=1, description="no layer is pruned below this rank")
    prune_epochs: list[int] = Field(
        default_factory=list, description="prune at the end of these epochs (1-based)"
    )
    prune_at_end: bool = Field(True, description="prune at the end of the last epoch")
    finetune_epochs: int = Field(
        0, ge=0, description="the last N epochs train with λ_s = 0, after a prune"
    )
    loss_tolerance: float | None = Field(
        None, gt=0, description="ε of the per-epoch loss-bounded rank search (off if unset)"
    )
    search_precision: float = Field(0.01, gt=0, lt=1, description="Δδ of the search")
    search_samples: int = Field(2048, ge=1, description="training samples the search uses")

    @model_validator(mode="after")
    def _positive_epochs(self) -> SVDConfig:
        if any(e < 1 for e in self.prune_epochs):
            raise ValueError(f"prune_epochs {self.prune_epochs} must be epoch numbers >= 1")
        return self


@register
class SVD(Method):
    name = "svd"
    core = "diag"
    config_class = SVDConfig
    config: SVDConfig

    def __init__(self, config: SVDConfig) -> None:
        super().__init__(config)
        self.finetuning = False
        self.events: list[dict[str, Any]] = []
        self._epoch_events: dict[str, Any] = {}

    # -- setup ------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> ConversionReport:
        cfg = self.config
        if cfg.finetune_epochs:
            if self.epochs is None:
                raise LorankError(
                    "svd finetune_epochs needs the run's length: call "
                    "method.attach(epochs=...) (the lorank trainer does)"
                )
            if cfg.finetune_epochs >= self.epochs:
                raise LorankError(
                    f"svd finetune_epochs={cfg.finetune_epochs} must be smaller "
                    f"than train.epochs={self.epochs}"
                )
        if cfg.loss_tolerance is not None and self.calibration is None:
            raise LorankError(
                "svd loss_tolerance needs training batches: call "
                "method.attach(calibration=..., loss_fn=...)"
            )
        return convert(model, cfg.low_rank_config(self.core))

    @property
    def finetune_start(self) -> int | None:
        """The epoch at whose end the fine-tune phase starts (None without one)."""
        if not self.config.finetune_epochs or self.epochs is None:
            return None
        return self.epochs - self.config.finetune_epochs

    # -- loss terms -------------------------------------------------------------------
    def regularization(self, model: nn.Module) -> dict[str, Tensor]:
        cfg = self.config
        layers = [layer for layer in low_rank_layers(model).values() if layer.S is not None]
        terms: dict[str, Tensor] = {}
        if not layers:
            return terms
        if cfg.lambda_orth > 0:
            terms["orth"] = cfg.lambda_orth * sum(orthogonality(lr.U, lr.V) for lr in layers)
        if cfg.lambda_sparsity > 0 and cfg.sparsity != "none":
            if self.finetuning:  # λ_s = 0; keep the column in the metrics
                terms["sparsity"] = layers[0].S.new_zeros(())
            else:
                terms["sparsity"] = cfg.lambda_sparsity * sum(
                    sparsity(cfg.sparsity, lr.S) for lr in layers
                )
        return terms

    # -- rank changes -----------------------------------------------------------------
    def on_epoch_end(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, metrics: dict
    ) -> None:
        cfg = self.config
        self._epoch_events = {}
        if cfg.loss_tolerance is not None:
            result = self.loss_bounded_truncation(model, optimizer)
            self._epoch_events["search_delta"] = result["delta"]
            self._epoch_events["search_loss_change"] = result["loss_change"]
        at_end = cfg.prune_at_end and self.epochs is not None and epoch == self.epochs
        if epoch in cfg.prune_epochs or epoch == self.finetune_start or at_end:
            ranks = self.prune(model, optimizer, cfg.rule)
            self.events.append({"epoch": epoch, "event": "prune", "ranks": ranks})
            self._epoch_events["pruned"] = True
        if epoch == self.finetune_start:
            self.finetuning = True
            self.events.append({"epoch": epoch, "event": "finetune_start"})

    @torch.no_grad()
    def prune(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, rule: RankRule
    ) -> dict[str, int]:
        """Keep each layer's largest-``|s|`` entries chosen by ``rule``; slice U, s, V and the
        optimizer state to them. Returns the new ranks."""
        ranks = {}
        for name, layer in low_rank_layers(model).items():
            if layer.core != "diag":
                ranks[name] = layer.rank
                continue
            magnitude = layer.S.detach().abs()
            k = rule.select(magnitude, self.config.r_min, layer.rank, full_rank=layer.full_rank)
            if k < layer.rank:
                keep = magnitude.argsort(descending=True)[:k].sort().values
                slice_layer(layer, keep, optimizer)
            ranks[name] = layer.rank
        return ranks

    def loss_bounded_truncation(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        """Seed 003's Algorithm 3 step: search δ, truncate each layer to its exact SVD."""
        cfg = self.config
        if self.calibration is None or self.loss_fn is None:
            raise LorankError("svd loss_tolerance needs method.attach(calibration=, loss_fn=)")
        layers = low_rank_layers(model)
        spectra = layer_spectra(model, dict(layers))
        result = loss_bounded_search(
            model,
            self.calibration(cfg.search_samples),
            self.loss_fn,
            cfg.loss_tolerance,
            cfg.search_precision,
            spectra,
            r_min=cfg.r_min,
        )
        for name, layer in layers.items():
            k = result.ranks[name]
            if k < layer.rank:
                mapping = layer.truncate(k)
                if optimizer is not None:
                    # The basis was rotated to the exact SVD: old moments do not apply.
                    swap_parameters(optimizer, mapping)
        return result.to_dict()

    # -- logs and state -----------------------------------------------------------------
    def epoch_metrics(self, model: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {"svd_phase": "finetune" if self.finetuning else "train"}
        out.update(self._epoch_events)
        return out

    def summary(self) -> dict[str, Any]:
        return {"svd_events": self.events, "finetune_start_epoch": self.finetune_start}

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"finetuning": self.finetuning, "events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.finetuning = bool(state.get("finetuning", False))
        self.events = list(state.get("events", []))


def slice_layer(
    layer: LowRankLayer, keep: Tensor, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Keep columns ``keep`` of U and V and entries ``keep`` of a diagonal core, and slice the
    optimizer's per-parameter state (Adam moments, momentum) the same way."""
    if layer.core != "diag":
        raise LorankError("slicing singular values needs a diagonal core (method svd)")
    old = {"U": layer.U, "S": layer.S, "V": layer.V}
    mapping = layer.set_factors(layer.U[:, keep], layer.S[keep], layer.V[:, keep])
    if optimizer is None:
        return
    dims = {id(old["U"]): 1, id(old["V"]): 1, id(old["S"]): 0}

    def transform(key: str, value: Tensor, old_param: nn.Parameter, new: nn.Parameter) -> Tensor:
        return value.index_select(dims[id(old_param)], keep.to(value.device))

    swap_parameters(optimizer, mapping, transform)
