"""A lorank method in a plain PyTorch loop, with the user's own model, optimizer and data.

Two ways, depending on who does the backward pass. **Let the method step** (works for every
method, including DLRT whose integrator needs several passes or a basis update around the
optimizer step)::

    method = lorank.methods.build({"name": "dlrt", "adaptive": True, "tolerance": 0.1})
    method.prepare(model)                                # convert layers (before the optimizer)
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-3)
    for epoch in range(epochs):
        for batch in loader:
            stats = method.train_step(model, optimizer, batch, loss_fn)  # loss_fn(model, batch)
        method.on_epoch_end(model, optimizer, epoch, {})

**Keep your own backward** (methods whose step is one forward/backward: dense, factorized,
svd, nnsvd, oialr; :func:`owns_step` tells), with :class:`LowRankHook`::

    hook = LowRankHook(method)
    hook.prepare(model)
    optimizer = torch.optim.AdamW(hook.parameters(model), lr=1e-3)
    for batch in loader:
        optimizer.zero_grad()
        loss = hook.loss(model, criterion(model(x), y))     # + the method's loss terms
        loss.backward()
        optimizer.step()
        hook.after_optimizer_step(model, optimizer)        # rank/basis updates, in place

Rank changes replace parameters; the method moves them and their optimizer state inside
*your* optimizer (:func:`lorank.core.optim.swap_parameters`), so keep using the same optimizer
object, and build any learning-rate scheduler on it as usual (it reads ``param_groups``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lorank.core.convert import ConversionReport
from lorank.errors import LorankError
from lorank.methods import Method, build


def owns_step(method: Method) -> bool:
    """True when the method's step is more than one forward/backward and an optimizer step
    (e.g. DLRT): it must then run through ``method.train_step``."""
    return type(method).train_step is not Method.train_step


class LowRankHook:
    """The calls a hand-written loop makes around its own ``backward``/``optimizer.step``.

    ``method`` is a :class:`~lorank.methods.Method` or a config dict such as
    ``{"name": "svd", "rank": 32}``. The last loss terms are kept in :attr:`terms` for logging.
    """

    def __init__(self, method: Method | dict[str, Any]) -> None:
        self.method = build(method) if isinstance(method, dict) else method
        self.terms: dict[str, float] = {}

    def prepare(self, model: nn.Module) -> ConversionReport:
        """Convert the model; call it before building the optimizer."""
        if owns_step(self.method):
            raise LorankError(
                f"method {self.method.name!r} runs its own step (several passes or a basis "
                "update around optimizer.step()); call method.train_step(model, optimizer, "
                "batch, loss_fn) in your loop instead of LowRankHook"
            )
        return self.method.prepare(model)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters to give your optimizer (frozen bases are left out)."""
        return self.method.parameters(model)

    def loss(self, model: nn.Module, task_loss: Tensor) -> Tensor:
        """``task_loss`` plus the method's weighted regularization terms."""
        terms = self.method.regularization(model)
        self.terms = {k: float(v.detach()) for k, v in terms.items()}
        return task_loss + sum(terms.values()) if terms else task_loss

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Count the step and run the method's post-step work (rank and basis updates)."""
        self.method.step += 1
        self.method.after_step(model, optimizer)

    def epoch_end(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """End-of-epoch work (pruning, phase switches); ``metrics`` e.g. ``{"loss_task": ..}``."""
        self.method.on_epoch_end(model, optimizer, epoch, metrics or {})
