"""A lorank method inside the Hugging Face ``transformers.Trainer``.

A ``TrainerCallback`` cannot replace the Trainer's optimizer, so the model is converted
*before* the Trainer is built (the Trainer then builds its optimizer over the low-rank
factors), and every later rank or basis change updates the Trainer's optimizer in place:
:func:`lorank.core.optim.swap_parameters` rewrites ``param_groups`` and moves or resets the
per-parameter state; the learning-rate scheduler keeps working because it only reads
``param_groups``::

    callback = LowRankTrainerCallback({"name": "oialr", "delay": 500, "frequency": 250}, model)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()

Events used: ``on_optimizer_step`` (after every ``optimizer.step()``: the method's
``after_step``, e.g. OIALR's switch and basis updates, svd's orthonormality upkeep) and
``on_epoch_end`` (pruning, phase switches); ``on_log`` adds ``lorank_params`` (parameters at
evaluation), ``lorank_params_train`` and each layer's rank (``lorank_rank/<layer>``) to the
Trainer's logs.

**Loss terms.** A callback cannot change the loss, so methods with regularization (svd's
orthogonality and sparsity terms, nnsvd's penalty) need :class:`LowRankTrainer`, a
``Trainer`` whose ``compute_loss`` adds ``method.regularization(model)``; methods without
terms (factorized, oialr, dense) work with the callback on a plain ``Trainer``.
**Not supported:** methods that own their optimisation step (DLRT: several passes or a basis
augmentation around ``optimizer.step()``); use ``method.train_step`` in a plain loop.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorank.core.metrics import low_rank_scalars, parameter_counts
from lorank.errors import LorankError
from lorank.integrations.torch_hook import LowRankHook
from lorank.methods import Method

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise LorankError(
        "lorank.integrations.huggingface needs transformers; pip install transformers accelerate"
    ) from e


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (if any)."""
    return getattr(optimizer, "optimizer", optimizer)


def _unwrap_model(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class LowRankTrainerCallback(TrainerCallback):
    """Run a lorank method's post-step and end-of-epoch hooks inside ``Trainer.train()``.

    ``method``: a :class:`~lorank.methods.Method` or a config dict. ``model``: converted here
    (``method.prepare``) when given; otherwise call :meth:`prepare` before building the
    Trainer, so that the Trainer's optimizer holds the low-rank parameters.
    """

    def __init__(self, method: Method | dict[str, Any], model: nn.Module | None = None) -> None:
        self.hook = LowRankHook(method)
        self.method = self.hook.method
        self.prepared = False
        if model is not None:
            self.prepare(model)

    def prepare(self, model: nn.Module) -> None:
        self.hook.prepare(model)
        self.prepared = True

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.prepared:
            raise LorankError(
                "LowRankTrainerCallback: the model was not converted before the Trainer built "
                "its optimizer; pass the model to LowRankTrainerCallback(method, model) before "
                "creating the Trainer"
            )

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        optimizer = _unwrap_optimizer(kwargs.get("optimizer"))
        if model is None or optimizer is None:
            raise LorankError("LowRankTrainerCallback needs the Trainer's model and optimizer")
        self.hook.after_optimizer_step(_unwrap_model(model), optimizer)

    def on_epoch_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        optimizer = _unwrap_optimizer(kwargs.get("optimizer"))
        epoch = round(state.epoch or 0)
        if model is not None and optimizer is not None:
            self.hook.epoch_end(_unwrap_model(model), optimizer, epoch, {})

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, Any] | None = None,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is not None and model is not None:
            unwrapped = _unwrap_model(model)
            logs["lorank_params"] = parameter_counts(unwrapped)["params_eval"]
            logs.update(low_rank_scalars(unwrapped, prefix="lorank_"))


class LowRankTrainer(Trainer):
    """A ``Trainer`` that adds the method's regularization terms to the loss.

    ``LowRankTrainer(lowrank=callback, model=..., args=..., ...)``; the callback is added to
    the Trainer's callbacks.
    """

    def __init__(self, *args: Any, lowrank: LowRankTrainerCallback, **kwargs: Any) -> None:
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), lowrank]
        super().__init__(*args, **kwargs)
        self.lowrank = lowrank

    def compute_loss(self, model: nn.Module, inputs: Any, return_outputs: bool = False, **kw: Any):  # noqa: ANN201
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
        loss, outputs = result if return_outputs else (result, None)
        loss = self.lowrank.hook.loss(_unwrap_model(model), loss)
        return (loss, outputs) if return_outputs else loss
