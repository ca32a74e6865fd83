"""The method protocol: how any training method plugs into any training loop.

A method is optimizer-shaped (like ``torch.ao.pruning.BaseSparsifier``): it prepares the
model, may add loss terms, may own the whole step when it needs more than one
forward/backward, and acts after ``optimizer.step()``. The trainer
(:mod:`lorank.training.trainer`) only ever calls these hooks, so adding a method never
touches the trainer::

    method = lorank.methods.build({"name": "svd", "rank": 0.5})
    report = method.prepare(model)
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-3)
    for epoch in range(epochs):
        for batch in loader:
            stats = method.train_step(model, optimizer, batch, loss_fn)
        method.on_epoch_end(model, optimizer, epoch, metrics={})

``loss_fn(model, batch) -> Tensor`` computes the task loss of one batch. Every change of
parameter shapes or identities goes through :func:`lorank.core.optim.swap_parameters`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from lorank.core.convert import ConversionFields, ConversionReport
from lorank.core.layers import CoreKind

LossFn = Callable[[nn.Module, Any], Tensor]


class MethodConfig(BaseModel):
    """Base of every method's config; subclasses add ``name: Literal["..."]`` and options."""

    model_config = ConfigDict(extra="forbid")
    name: str


class MethodConversion(ConversionFields):
    """The conversion fields of a method that factorizes layers in :meth:`Method.prepare`:
    those of :class:`~lorank.core.convert.LowRankConfig` (one schema), with the defaults of
    training from scratch: random orthonormal factors. The output layer stays dense
    (``keep_last_dense``, the default of every conversion)."""

    init: Literal["svd", "random"] = Field(
        "random", description="random orthonormal factors, or the SVD of the dense init"
    )


class Method:
    """Base class and default behaviour of a training method (the ``dense`` baseline).

    Hooks, in the order the trainer calls them:

    * :meth:`prepare` once, before the optimizer exists (convert layers, freeze, ...);
    * :meth:`parameters` to build the optimizer;
    * :meth:`train_step` per batch (default: one forward/backward with
      :meth:`regularization`, clip, ``optimizer.step()``, :meth:`after_step`);
    * :meth:`on_epoch_end` after each epoch's evaluation (pruning, switches);
    * :meth:`epoch_metrics` for method-specific per-epoch logs, :meth:`summary` at the end;
    * :meth:`extra_flops` once per epoch, for the run's FLOP count.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    core: ClassVar[CoreKind | None] = None
    """The parametrization the method trains (``lorank.convert(..., LowRankConfig(method=name))``
    uses it): ``"full"`` U S Vᵀ, ``"diag"`` U diag(s) Vᵀ, ``"none"`` U Vᵀ; None: no layers."""
    gradient_free: ClassVar[bool] = False
    """True for methods trained in closed form by :meth:`fit` instead of the epoch loop."""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.max_grad_norm: float | None = None
        self.loss_fn: LossFn | None = None
        self.calibration: Callable[[int], list[Any]] | None = None
        self.epochs: int | None = None
        self.skip_nonfinite = False
        self.skipped_batches = 0
        self.step = 0

    def attach(
        self,
        *,
        loss_fn: LossFn | None = None,
        calibration: Callable[[int], list[Any]] | None = None,
        max_grad_norm: float | None = None,
        epochs: int | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        """Give the method what some hooks need besides the model: the task loss, a source
        of fixed training batches (``calibration(n)`` returns batches covering the first n
        training samples, for loss-based rank searches), gradient clipping, and the run's
        total number of epochs (for phases defined from the end, e.g. a fine-tune phase), and
        whether a batch with a non-finite loss is skipped instead of applied."""
        self.loss_fn, self.calibration, self.max_grad_norm = loss_fn, calibration, max_grad_norm
        self.epochs, self.skip_nonfinite = epochs, skip_nonfinite

    # -- hooks ------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> ConversionReport:
        """Make the model ready for training (the default keeps it dense)."""
        return ConversionReport()

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the base optimizer trains."""
        return [p for p in model.parameters() if p.requires_grad]

    def regularization(self, model: nn.Module) -> dict[str, Tensor]:
        """Extra loss terms, already weighted, by name (logged as ``loss_<name>``)."""
        return {}

    def train_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, loss_fn: LossFn
    ) -> dict[str, Tensor]:
        """One optimisation step on ``batch``; returns detached loss terms for logging."""
        optimizer.zero_grad(set_to_none=True)
        task = loss_fn(model, batch)
        terms = self.regularization(model)
        loss = task + sum(terms.values()) if terms else task
        if self.skip_nonfinite and not torch.isfinite(loss):
            # A bad batch (or a transient spike): leave the weights as they are.
            self.skipped_batches += 1
            stats = self.loss_stats(loss, task, terms)
            return {k: torch.zeros_like(v) for k, v in stats.items()}
        loss.backward()
        self.clip_gradients(model)
        optimizer.step()
        self.step += 1
        self.after_step(model, optimizer)
        return self.loss_stats(loss, task, terms)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called after every ``optimizer.step()`` (basis updates, rank updates)."""

    def on_epoch_end(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, metrics: dict
    ) -> None:
        """Called after each epoch's evaluation; ``metrics`` is that epoch's record."""

    def epoch_metrics(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific values to add to the epoch's metrics record."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Method-specific values for ``summary.json`` (e.g. when a switch happened)."""
        return {}

    def extra_flops(self) -> float:
        """Estimated FLOPs of work done since the last call that a counted step does not
        show: work done every k steps only (a periodic basis rotation, a one-time switch).
        The trainer counts each step on copies and keeps the cheaper of two consecutive
        ones, then adds this once per epoch (see :mod:`lorank.training.flops`)."""
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        """Everything the method needs to resume exactly (tensors allowed)."""
        return {"step": self.step, "skipped_batches": self.skipped_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.skipped_batches = int(state.get("skipped_batches", 0))

    def fit(self, model: nn.Module, batches: Sequence[Any]) -> dict[str, Any]:
        """Train ``model`` in place without an optimizer (only when ``gradient_free``).

        ``batches`` is the whole training set, in order and without augmentation. Returns the
        fit's training statistics (``loss_task`` is logged as ``train_loss``); a method that
        chooses the architecture itself returns the changed model-config fields under
        ``"model"`` (e.g. ``{"hidden": [...]}``), which the saved checkpoint's config takes.
        """
        raise NotImplementedError(f"method {self.name!r} trains with gradients, not by fit()")

    # -- helpers for subclasses -----------------------------------------------------------
    def clip_gradients(self, model: nn.Module) -> None:
        if self.max_grad_norm is not None:
            params = [p for p in model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    @staticmethod
    def loss_stats(loss: Tensor, task: Tensor, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        stats = {"loss": loss.detach(), "loss_task": task.detach()}
        stats.update({f"loss_{k}": v.detach() for k, v in terms.items()})
        return stats
