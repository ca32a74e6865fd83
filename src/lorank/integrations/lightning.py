"""A lorank method inside a Lightning ``Trainer`` (optional: ``pip install lightning``).

::

    class Net(L.LightningModule):
        def training_step(self, batch, i):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            return self.lowrank.loss(self, loss)       # adds the method's terms (svd, nnsvd)
        def configure_optimizers(self):
            return torch.optim.Adam(self.lowrank.parameters(self), lr=1e-3)

    net = Net()
    net.lowrank = LowRankCallback(method={"name": "oialr", "delay": 500, "frequency": 250})
    L.Trainer(callbacks=[net.lowrank], ...).fit(net, loader)

The callback converts the module in ``setup`` (before ``configure_optimizers``), runs the
method's ``after_step`` after every optimizer step (``on_train_batch_end`` when the global
step advanced) and ``on_epoch_end`` after every training epoch; rank changes update the
Trainer's optimizer in place (:func:`lorank.core.optim.swap_parameters`).

**DDP** (``strategy="ddp"``/``"ddp_spawn"``; ``LORANK_DEBUG_DDP=1`` checks after every step
that all processes hold the same parameters): every process takes the same decisions from
the same all-reduced gradients; when a rank change replaced parameters, the callback asks the
strategy to wrap the module in a new ``DistributedDataParallel`` (Lightning has no public
hook for this; it uses ``strategy._setup_model``, checked against Lightning 2.6).
Methods that own their step (DLRT) are not supported here: use ``method.train_step``.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

from lorank.core.metrics import low_rank_scalars
from lorank.errors import LorankError
from lorank.integrations.torch_hook import LowRankHook
from lorank.methods import Method
from lorank.training.distributed import DEBUG_ENV, check_agreement, parameter_signature

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise LorankError(
            "lorank.integrations.lightning needs Lightning; pip install lightning"
        ) from e


class LowRankCallback(pl.Callback):
    """Run a lorank method's hooks inside ``Trainer.fit``; see the module docstring."""

    def __init__(self, method: Method | dict[str, Any]) -> None:
        self.hook = LowRankHook(method)
        self.method = self.hook.method
        self._prepared_id: int | None = None
        self._global_step = 0

    # Helpers the LightningModule calls.
    def loss(self, module: nn.Module, task_loss: Tensor) -> Tensor:
        return self.hook.loss(module, task_loss)

    def parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return self.hook.parameters(module)

    # Lightning hooks.
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._prepared_id != id(pl_module):
            self.hook.prepare(pl_module)
            self._prepared_id = id(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._global_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.global_step == self._global_step:
            return  # gradient accumulation: no optimizer step this batch
        self._global_step = trainer.global_step
        before = parameter_signature(pl_module)
        for optimizer in trainer.optimizers:
            self.hook.after_optimizer_step(pl_module, getattr(optimizer, "optimizer", optimizer))
        self._rewrap_if_changed(trainer, pl_module, before)
        if trainer.world_size > 1 and os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            check_agreement(pl_module)  # raises if the processes hold different factors

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = parameter_signature(pl_module)
        optimizer = trainer.optimizers[0]
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.hook.epoch_end(
            pl_module, getattr(optimizer, "optimizer", optimizer), trainer.current_epoch, metrics
        )
        self._rewrap_if_changed(trainer, pl_module, before)
        # Ranks and parameter counts through whatever logger the Trainer uses.
        pl_module.log_dict(low_rank_scalars(pl_module), on_step=False, on_epoch=True)

    @staticmethod
    def _rewrap_if_changed(
        trainer: pl.Trainer, pl_module: pl.LightningModule, before: tuple
    ) -> None:
        if trainer.world_size <= 1 or parameter_signature(pl_module) == before:
            return
        strategy = trainer.strategy
        wrapped = strategy.model
        if not hasattr(strategy, "_setup_model") or not hasattr(wrapped, "module"):
            raise LorankError(
                f"the {type(strategy).__name__} strategy cannot be re-wrapped after a rank "
                "change; use strategy='ddp' or 'ddp_spawn', or a method with fixed ranks"
            )
        strategy.model = strategy._setup_model(wrapped.module)
