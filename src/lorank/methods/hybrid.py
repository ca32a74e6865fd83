r"""``hybrid``: switch the representation once during training, low-rank ↔ dense.

Two schedules, chosen by ``direction``:

**Low-rank → dense** (seed 000's future work 2). Train the low-rank method ``lowrank_method``
(``factorized`` or ``svd``, with its own options in ``lowrank``) while the training loss falls
fast; at the end of an epoch :math:`t \ge 2` compute the relative decrease of the mean epoch
training (task) loss,

.. math:: d_t = \frac{L_{t-1} - L_t}{L_{t-1}},

and switch once :math:`d_t < \text{threshold}` (or at the end of ``switch_epoch``, whichever
comes first). Switching merges every low-rank layer into a dense one with
:math:`W = U S V^\top` (exactly the same function) and training continues dense.

**Dense → low-rank** (Cuttlefish, Wang et al. 2023). Train dense and track every eligible
layer's stable rank :math:`\operatorname{srank}(W) = \|\sigma\|_2^2 / \sigma_1^2` at the end of
each epoch. The trigger value at epoch t is the largest relative per-epoch change over the last
``window`` epochs, over all layers,

.. math:: c_t = \max_{l}\ \max_{t-\text{window} < k \le t}
          \frac{|\operatorname{srank}_l(k) - \operatorname{srank}_l(k-1)|}
               {\operatorname{srank}_l(k-1)},

(epoch 0 is the initialisation), and the switch happens once :math:`c_t < \text{threshold}`
(or at the end of ``switch_epoch``). Each layer is then factorized by truncated SVD of its
trained weight at the rank given by ``rank_rule``; the default is Cuttlefish's *scaled* stable
rank :math:`\lceil \operatorname{srank}_l(t)\cdot p_l / \operatorname{srank}_l(0) \rceil`
(:math:`p_l = \min(m, n)`: the scale makes a layer whose spectrum is still as flat as at
initialisation keep full rank). Training continues with ``lowrank_method``, whose hooks
(regularization, pruning, metrics) the hybrid method runs from then on.

**The optimizer across the switch.** Parameters that disappear (dense weights, or factors)
leave the optimizer and the new ones join it with fresh state, through
:func:`lorank.core.optim.swap_parameters` and :func:`lorank.core.optim.add_parameters`; there is no
linear map from the old state to the new parameters' state. Biases are the same ``Parameter``
objects before and after, so their state continues.

Logged per epoch: ``hybrid_phase``, ``hybrid_trigger`` (:math:`d_t` or :math:`c_t`) and, in the
switch epoch, ``hybrid_switch_epoch`` with the parameter counts before and after; the summary
repeats the switch record.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator
from torch import Tensor, nn

from lorank.core.adapters import dense_matrix
from lorank.core.convert import (
    ConversionReport,
    eligible_layers,
    low_rank_layers,
    merge_layers,
    planned_report,
)
from lorank.core.layers import LowRankLayer
from lorank.core.metrics import parameter_counts
from lorank.core.optim import add_parameters, swap_parameters
from lorank.core.rank import RankRuleField
from lorank.errors import LorankError
from lorank.methods.base import LossFn, Method, MethodConfig, MethodConversion
from lorank.methods.registry import METHODS, build, register

LOWRANK_METHODS = ("factorized", "svd")


class HybridConfig(MethodConfig):
    """One switch between dense and low-rank training, fired by a loss or stable-rank trigger."""

    name: Literal["hybrid"] = "hybrid"
    direction: Literal["lowrank_to_dense", "dense_to_lowrank"] = Field(
        "lowrank_to_dense", description="train low-rank then dense, or dense then low-rank"
    )
    threshold: float = Field(
        0.1,
        gt=0,
        description="switch when the trigger falls below this: the relative decrease of the "
        "epoch training loss (lowrank_to_dense) or the largest relative per-epoch change of a "
        "layer's stable rank over the window (dense_to_lowrank)",
    )
    switch_epoch: int | None = Field(
        None, ge=1, description="switch at the end of this epoch at the latest (None: trigger only)"
    )
    window: int = Field(
        2, ge=1, description="dense_to_lowrank: epochs over which stable ranks must be settled"
    )
    rank_rule: RankRuleField | None = Field(
        None,
        description="dense_to_lowrank: rank of each layer at the switch from its singular values; "
        "None = Cuttlefish's scaled stable rank srank(W_t)·p/srank(W_0)",
    )
    r_min: int = Field(1, ge=1, description="dense_to_lowrank: smallest rank at the switch")
    lowrank_method: Literal["factorized", "svd"] = Field(
        "factorized", description="the method that trains the low-rank phase"
    )
    lowrank: dict[str, Any] = Field(
        default_factory=dict,
        description="options of lowrank_method (e.g. rank, keep_last_dense, lambda_orth); for "
        "dense_to_lowrank the ranks come from rank_rule and the init is the SVD",
    )

    @model_validator(mode="after")
    def _valid_inner(self) -> HybridConfig:
        self.inner_config()  # raises ValueError with the inner method's first problem
        return self

    def inner_config(self, **override: Any) -> MethodConfig:
        """The validated config of the low-rank phase's method (with ``override`` applied)."""
        if self.lowrank_method not in METHODS:
            raise ValueError(f"low-rank method {self.lowrank_method!r} is not available")
        raw = {**self.lowrank, **override, "name": self.lowrank_method}
        try:
            config = METHODS[self.lowrank_method].config_class.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"lowrank.{key}: {err['msg']}") from None
        if not isinstance(config, MethodConversion):
            raise ValueError(f"{self.lowrank_method} does not convert layers")
        return config


@register
class Hybrid(Method):
    name = "hybrid"
    config_class = HybridConfig
    config: HybridConfig

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.epochs: int | None = None
        self.inner: Method | None = None
        self.lowrank_phase = config.direction == "lowrank_to_dense"
        self.switch_record: dict[str, Any] | None = None
        self.triggers: list[dict[str, Any]] = []  # one per epoch: epoch, trigger value
        self.previous_loss: float | None = None
        self.stable_ranks: dict[str, list[float]] = {}  # per layer, index = epoch
        self._epoch: dict[str, Any] = {}
        self._attach_kwargs: dict[str, Any] = {}
        if self.lowrank_phase:
            self.inner = build(config.inner_config())

    def attach(self, **kwargs: Any) -> None:
        super().attach(**kwargs)
        self._attach_kwargs = kwargs
        if self.inner is not None:
            self.inner.attach(**kwargs)

    # ------------------------------------------------------------------ delegation
    def prepare(self, model: nn.Module) -> ConversionReport:
        if self.inner is not None:
            return self.inner.prepare(model)
        eligible = self._eligible(model)
        for name, module in eligible:
            self.stable_ranks[name] = [stable_rank_of(module)]
        return planned_report(eligible, "dense until the stable ranks settle")

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        if self.lowrank_phase and self.inner is not None:
            return self.inner.parameters(model)
        return super().parameters(model)

    def regularization(self, model: nn.Module) -> dict[str, Tensor]:
        if self.lowrank_phase and self.inner is not None:
            return self.inner.regularization(model)
        return {}

    def train_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, loss_fn: LossFn
    ) -> dict[str, Tensor]:
        if self.lowrank_phase and self.inner is not None:
            stats = self.inner.train_step(model, optimizer, batch, loss_fn)
            self.step += 1
            return stats
        return super().train_step(model, optimizer, batch, loss_fn)

    def on_epoch_end(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, metrics: dict
    ) -> None:
        self._epoch = {}
        if self.lowrank_phase and self.inner is not None:
            self.inner.on_epoch_end(model, optimizer, epoch, metrics)
        if self.switch_record is not None:
            return
        forced = self.config.switch_epoch is not None and epoch >= self.config.switch_epoch
        if self.config.direction == "lowrank_to_dense":
            trigger = self._loss_trigger(metrics)
        else:
            trigger = self._stable_rank_trigger(model)
        self._epoch["hybrid_trigger"] = trigger
        self.triggers.append({"epoch": epoch, "trigger": trigger})
        fired = trigger is not None and trigger < self.config.threshold
        if fired or forced:
            before = parameter_counts(model)
            ranks = None
            if self.config.direction == "lowrank_to_dense":
                self.to_dense(model, optimizer)
            else:
                ranks = self.to_lowrank(model, optimizer)
            after = parameter_counts(model)
            self.switch_record = {
                "hybrid_switch_epoch": epoch,
                "hybrid_switch_step": self.step,
                "hybrid_switch_reason": "trigger" if fired else "switch_epoch",
                "hybrid_switch_trigger": trigger,
                "hybrid_params_eval_before": before["params_eval"],
                "hybrid_params_eval_after": after["params_eval"],
                "hybrid_params_train_before": before["params_train"],
                "hybrid_params_train_after": after["params_train"],
            }
            if ranks is not None:
                self.switch_record["hybrid_switch_ranks"] = ranks
            self._epoch.update(self.switch_record)

    def epoch_metrics(self, model: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {"hybrid_phase": "lowrank" if self.lowrank_phase else "dense"}
        if self.lowrank_phase and self.inner is not None:
            out.update(self.inner.epoch_metrics(model))
        out.update(self._epoch)
        self._epoch = {}
        return out

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hybrid_direction": self.config.direction,
            "hybrid_triggers": self.triggers,
        }
        out.update(self.switch_record or {"hybrid_switch_epoch": None})
        if self.inner is not None:
            out.update(self.inner.summary())
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "lowrank_phase": self.lowrank_phase,
            "switch_record": self.switch_record,
            "triggers": self.triggers,
            "previous_loss": self.previous_loss,
            "stable_ranks": self.stable_ranks,
        }
        if self.inner is not None:
            state["inner"] = self.inner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.lowrank_phase = bool(state.get("lowrank_phase", self.lowrank_phase))
        self.switch_record = state.get("switch_record")
        self.triggers = list(state.get("triggers", []))
        self.previous_loss = state.get("previous_loss")
        self.stable_ranks = {k: list(v) for k, v in state.get("stable_ranks", {}).items()}
        if "inner" in state:
            if self.inner is None:
                self.inner = self._build_inner_for_switch()
            self.inner.load_state_dict(state["inner"])

    # ------------------------------------------------------------------ triggers
    def _loss_trigger(self, metrics: dict) -> float | None:
        """Relative decrease of the epoch training loss (None in the first epoch)."""
        loss = metrics.get("loss_task", metrics.get("loss"))
        if loss is None:
            raise LorankError(
                "hybrid lowrank_to_dense needs the epoch's training loss: pass "
                "metrics={'loss_task': ...} to on_epoch_end (the trainer does)"
            )
        previous, self.previous_loss = self.previous_loss, float(loss)
        if previous is None or previous <= 0:
            return None
        return (previous - float(loss)) / previous

    def _stable_rank_trigger(self, model: nn.Module) -> float | None:
        """Largest relative per-epoch stable-rank change over the window (None until the
        window is full)."""
        window = self.config.window
        worst = 0.0
        for name, module in self._eligible(model):
            history = self.stable_ranks.setdefault(name, [])
            history.append(stable_rank_of(module))
            if len(history) <= window:
                worst = math.inf
                continue
            for k in range(len(history) - window, len(history)):
                change = abs(history[k] - history[k - 1]) / max(history[k - 1], 1e-12)
                worst = max(worst, change)
        return None if math.isinf(worst) else worst

    # ------------------------------------------------------------------ switches
    def _eligible(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The dense layers the low-rank phase would factorize (keep-first/last applied)."""
        return eligible_layers(model, self.config.inner_config())

    @torch.no_grad()
    def switch_ranks(self, model: nn.Module) -> dict[str, int]:
        """Each eligible layer's rank at the switch to low-rank, from ``rank_rule``."""
        cfg = self.config
        ranks = {}
        for name, module in self._eligible(model):
            sigma = torch.linalg.svdvals(dense_matrix(module).double())
            p = sigma.numel()
            if cfg.rank_rule is not None:
                ranks[name] = cfg.rank_rule.select(sigma, cfg.r_min, full_rank=p)
                continue
            current = float((sigma * sigma).sum() / (sigma[0] * sigma[0])) if sigma[0] > 0 else 1
            initial = self.stable_ranks.get(name, [current])[0]
            scaled = math.ceil(current * p / max(initial, 1e-12) - 1e-9)
            ranks[name] = max(min(cfg.r_min, p), min(scaled, p))
        return ranks

    def _build_inner_for_switch(self, ranks: dict[str, int] | None = None) -> Method:
        override: dict[str, Any] = {"init": "svd"}
        if ranks is not None:
            # Ranks the user pinned in lowrank.rank_pattern win over the rule's.
            override["rank_pattern"] = {**ranks, **self.config.lowrank.get("rank_pattern", {})}
        inner = build(self.config.inner_config(**override))
        inner.attach(**self._attach_kwargs)
        inner.step = self.step
        return inner

    @torch.no_grad()
    def to_lowrank(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, int]:
        """Factorize the eligible layers (truncated SVD at :meth:`switch_ranks`), hand the
        rest of training to the low-rank method, and return the ranks the rule chose (layers
        whose rank saves nothing may stay dense, as the low-rank method's options decide)."""
        ranks = self.switch_ranks(model)
        old = dict(model.named_modules())
        self.inner = self._build_inner_for_switch(ranks)
        self.inner.prepare(model)
        converted = low_rank_layers(model)
        mapping: dict[nn.Parameter, nn.Parameter | None] = {}
        new_params: list[nn.Parameter] = []
        for name, layer in converted.items():
            dense = old.get(name)
            if dense is None or dense is layer:
                continue  # was low-rank already
            if dense.bias is not None and layer.bias is not None:
                layer.bias = dense.bias  # same Parameter: its optimizer state continues
            mapping[dense.weight] = None
            new_params += [p for n, p in layer.named_parameters() if n != "bias"]
        if optimizer is not None:
            swap_parameters(optimizer, mapping)
            add_parameters(optimizer, new_params)
        self.lowrank_phase = True
        return ranks

    @torch.no_grad()
    def to_dense(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Merge every low-rank layer into a dense one with W = U S Vᵀ; continue dense."""
        mapping: dict[nn.Parameter, nn.Parameter | None] = {}
        new_params: list[nn.Parameter] = []
        for layer, dense in merge_layers(model).values():
            mapping.update({p: None for p in (layer.U, layer.S, layer.V) if p is not None})
            new_params.append(dense.weight)
        if optimizer is not None:
            swap_parameters(optimizer, mapping)
            add_parameters(optimizer, new_params)
        self.lowrank_phase = False


def stable_rank_of(module: nn.Module) -> float:
    """‖σ‖²/σ₁² of a dense or low-rank layer's weight matrix."""
    if isinstance(module, LowRankLayer):
        sigma = module.singular_values().double()
    else:
        sigma = torch.linalg.svdvals(dense_matrix(module).double())
    top = float(sigma[0])
    return float((sigma * sigma).sum()) / (top * top) if top > 0 else 1.0
