r"""``oialr``: Orthogonality-Informed Adaptive Low-Rank training (Coquelin et al. 2024).

The observation behind the method is that the orthogonal bases of a weight's SVD settle early
in training while its singular values keep moving. So:

1. **Dense phase.** Train the ordinary network for ``delay`` optimizer steps.
2. **Switch.** Replace each eligible Linear/Conv2d weight by its exact SVD
   :math:`W = U\,S\,V^\top` (full rank, so the network computes the same function), freeze
   :math:`U \in \mathbb{R}^{m\times r}` and :math:`V \in \mathbb{R}^{n\times r}` and train only
   the full core :math:`S \in \mathbb{R}^{r\times r}`, initialised to
   :math:`\operatorname{diag}(\sigma)`.
3. **Basis updates.** Every ``frequency`` steps take the SVD of the small core,
   :math:`S = P\,\Sigma\,Q^\top`, and rotate the bases into it:

   .. math:: U \leftarrow U P,\qquad V \leftarrow V Q,\qquad S \leftarrow \Sigma,

   which leaves :math:`U S V^\top` unchanged. Then drop the singular values below
   :math:`\beta\,\sigma_{\max}` (the ``cutoff(β)`` rank rule), removing at most
   ``max_cut_fraction`` of the current rank per update and never going below ``r_min``:
   the columns :math:`r+1{:}` of :math:`UP` and :math:`VQ` and the matching rows/columns of
   :math:`\Sigma` are sliced off.

**Basis stability.** At each update every layer logs
:math:`\tfrac12\big(\overline{|\cos(u_i, u'_i)|} + \overline{|\cos(v_i, v'_i)|}\big)`, the mean
absolute cosine similarity of corresponding columns of the previous and the new U (and V) over
the kept columns: 1.0 means the bases did not move; a rotation lowers it.

**Optimizer state follows the basis.** Only S is optimized after the switch, so every state
tensor belongs to S (or, at the switch, to the replaced dense weight). The gradient transforms
linearly under a change of basis — at the switch :math:`\nabla_S = U^\top \nabla_W V`, at an
update :math:`\nabla_{S'} = P^\top \nabla_S Q` — so with ``optimizer_state = "transform"``:

* first-moment state (SGD ``momentum_buffer``, Adam ``exp_avg``) is carried over exactly,
  :math:`m \leftarrow L^\top m R` (L, R = U, V at the switch; P, Q sliced to the kept rank at
  an update). With SGD + momentum and no truncation this makes the trajectory of
  :math:`U S V^\top` identical to one without basis updates.
* second-moment state (``exp_avg_sq``, ``max_exp_avg_sq``) is element-wise, which no rotation
  preserves exactly; it is mapped as the expected square of the rotated gradient when the
  gradient's entries are independent, :math:`v \leftarrow (L \odot L)^\top v (R \odot R)`:
  non-negative, and at full rank it preserves :math:`\sum v` (the squared maps are doubly
  stochastic). Adam's ``step`` count is kept, so bias correction continues.
* any other state (unknown optimizers) is reset, i.e. the new S starts with fresh state.

``optimizer_state = "reset"`` gives S fresh state at the switch and at every update instead.
All changes go through :func:`lorank.core.optim.swap_parameters`; the replaced weights leave the
optimizer, the frozen bases never enter it, and the bias ``Parameter`` objects are reused so
their state is untouched.

Authors' ranges: ``delay`` 1000–10000 steps, ``frequency`` 100–2000 steps, β 0.1–0.2, AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lorank.core.adapters import adapter_for, low_rank_from
from lorank.core.convert import (
    ConversionReport,
    LayerSelection,
    eligible_layers,
    planned_report,
    replace_module,
)
from lorank.core.flops import FlopCounter
from lorank.core.layers import LowRankLayer
from lorank.core.optim import StateTransform, swap_parameters
from lorank.core.rank import cutoff
from lorank.methods.base import Method, MethodConfig
from lorank.methods.registry import register

# Optimizer state keys that are linear in the gradient, and those that are element-wise
# squares of it (torch SGD / Adam / AdamW names).
LINEAR_STATE = frozenset({"momentum_buffer", "exp_avg"})
SQUARED_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq"})


class OIALRConfig(MethodConfig, LayerSelection):
    """Dense for ``delay`` steps, then train only S of U S Vᵀ with periodic basis updates."""

    name: Literal["oialr"] = "oialr"
    delay: int = Field(
        1000,
        ge=0,
        description="optimizer steps of dense training before the "
        "switch to U S Vᵀ (0: switch before training)",
    )
    frequency: int = Field(500, ge=1, description="optimizer steps between basis updates")
    cutoff: float = Field(
        0.1,
        ge=0,
        le=1,
        description="β: drop singular values below β·σ_max "
        "at each basis update (0 never truncates)",
    )
    max_cut_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="at most this fraction of a layer's current rank is removed per update",
    )
    r_min: int = Field(1, ge=1, description="never truncate a layer below this rank")
    keep_last_dense: bool = Field(
        True, description="leave the last Linear/Conv2d (the output layer) dense and trainable"
    )
    optimizer_state: Literal["transform", "reset"] = Field(
        "transform",
        description="carry S's optimizer state through the switch and each basis "
        "change (transform), or restart it (reset)",
    )


@register
class OIALR(Method):
    name = "oialr"
    core = "full"
    config_class = OIALRConfig
    config: OIALRConfig

    def __init__(self, config: OIALRConfig) -> None:
        super().__init__(config)
        self.switched = False
        self.switch_step: int | None = None
        self.switch_epoch: int | None = None
        self.params_train_before: int | None = None
        self.params_train_after: int | None = None
        self.updates: list[dict[str, Any]] = []  # one entry per basis update (all layers)
        self._epoch_updates: list[dict[str, Any]] = []
        self._extra_flops = 0.0  # switch and basis updates since the last extra_flops()

    # ------------------------------------------------------------------ hooks
    def prepare(self, model: nn.Module) -> ConversionReport:
        """Plan the switch (report which layers will change); switch now if ``delay == 0``."""
        reason = f"dense for {self.config.delay} steps, then U S Vᵀ"
        report = planned_report(self._eligible(model), reason, at_full_rank=True)
        if self.config.delay == 0:
            self.switch(model, optimizer=None)
        return report

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        cfg = self.config
        # The switch and the basis updates happen every so many steps only; they are counted
        # here as they run (a counter costs nothing next to an SVD) for extra_flops.
        if not self.switched:
            if self.step >= cfg.delay:
                with FlopCounter() as counter:
                    self.switch(model, optimizer)
                self._extra_flops += counter.total
            return
        if self.step > self.switch_step and (self.step - self.switch_step) % cfg.frequency == 0:
            with FlopCounter() as counter:
                self.update_bases(model, optimizer)
            self._extra_flops += counter.total

    def on_epoch_end(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, metrics: dict
    ) -> None:
        if self.switched and self.switch_epoch is None:
            self.switch_epoch = epoch

    def epoch_metrics(self, model: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {"oialr_switched": self.switched}
        if self._epoch_updates:
            last = self._epoch_updates[-1]
            out["oialr_stability"] = {k: v["stability"] for k, v in last["layers"].items()}
            out["oialr_updates"] = len(self._epoch_updates)
        self._epoch_updates = []
        return out

    def extra_flops(self) -> float:
        flops, self._extra_flops = self._extra_flops, 0.0
        return flops

    def summary(self) -> dict[str, Any]:
        return {
            "oialr_switch_step": self.switch_step,
            "oialr_switch_epoch": self.switch_epoch,
            "oialr_params_train_before_switch": self.params_train_before,
            "oialr_params_train_after_switch": self.params_train_after,
            "oialr_updates": [
                {
                    "step": u["step"],
                    "ranks": {k: v["rank"] for k, v in u["layers"].items()},
                    "stability": {k: round(v["stability"], 6) for k, v in u["layers"].items()},
                }
                for u in self.updates
            ],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "switched": self.switched,
            "switch_step": self.switch_step,
            "switch_epoch": self.switch_epoch,
            "updates": self.updates,
            "params_train_before": self.params_train_before,
            "params_train_after": self.params_train_after,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.switched = bool(state.get("switched", False))
        self.switch_step = state.get("switch_step")
        self.switch_epoch = state.get("switch_epoch")
        self.updates = list(state.get("updates", []))
        self.params_train_before = state.get("params_train_before")
        self.params_train_after = state.get("params_train_after")

    # ------------------------------------------------------------------ the switch
    def _eligible(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return eligible_layers(model, self.config)

    @torch.no_grad()
    def switch(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Replace every eligible layer by its full-rank SVD with frozen U, V and trainable S."""
        self.params_train_before = _trainable(model)
        for name, module in self._eligible(model):
            weight = module.weight
            layer = low_rank_from(module, 1.0, "full")
            layer.freeze_bases()
            if getattr(module, "bias", None) is not None and layer.bias is not None:
                # Reuse the very same Parameter: the optimizer keeps its state untouched.
                layer.bias = module.bias
            replace_module(model, name, layer)
            if optimizer is not None:
                view = _matrix_view(module)
                transform = self._basis_change(layer.U, layer.V, view)
                swap_parameters(optimizer, {weight: layer.S}, transform)
        self.switched = True
        self.switch_step = self.step
        self.params_train_after = _trainable(model)

    # ------------------------------------------------------------------ basis updates
    @torch.no_grad()
    def update_bases(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Rotate every switched layer's bases into the SVD of its core, then truncate."""
        layers: dict[str, dict[str, float | int]] = {}
        for name, layer in _switched_layers(model).items():
            layers[name] = self._update_layer(layer, optimizer)
        record = {"step": self.step, "layers": layers}
        self.updates.append(record)
        self._epoch_updates.append(record)
        return record

    def _update_layer(
        self, layer: LowRankLayer, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, float | int]:
        cfg = self.config
        rank = layer.rank
        p, sigma, qh = torch.linalg.svd(layer.S.detach().double())
        q = qh.T
        keep = cutoff(cfg.cutoff).select(sigma, r_min=cfg.r_min, full_rank=rank)
        floor = rank - math.floor(cfg.max_cut_fraction * rank)
        keep = max(keep, min(floor, rank), 1)
        p, q = p[:, :keep], q[:, :keep]
        old_u, old_v = layer.U.detach(), layer.V.detach()
        new_u = old_u.double() @ p
        new_v = old_v.double() @ q
        mapping = layer.set_factors(new_u, torch.diag(sigma[:keep]), new_v)
        if optimizer is not None:
            swap_parameters(optimizer, mapping, self._basis_change(p, q))
        stability_u = basis_stability(old_u, layer.U)
        stability_v = basis_stability(old_v, layer.V)
        return {
            "rank_before": rank,
            "rank": keep,
            "stability_u": stability_u,
            "stability_v": stability_v,
            "stability": 0.5 * (stability_u + stability_v),
            "sigma_max": float(sigma[0]),
        }

    def _basis_change(
        self, left: Tensor, right: Tensor, view: Callable[[Tensor], Tensor] | None = None
    ) -> StateTransform | None:
        """The state transform for ``S_new = leftᵀ (old matrix) right`` (module docstring)."""
        if self.config.optimizer_state == "reset":
            return None
        left, right = left.detach().double(), right.detach().double()

        def transform(
            key: str, value: Tensor, old: nn.Parameter, new: nn.Parameter
        ) -> Tensor | None:
            matrix = (view(value) if view is not None else value).double()
            if matrix.shape != (left.shape[0], right.shape[0]):
                return None
            if key in LINEAR_STATE:
                out = left.T @ matrix @ right
            elif key in SQUARED_STATE:
                out = (left * left).T @ matrix @ (right * right)
            else:
                return None
            return out.to(value.dtype).reshape(new.shape)

        return transform


def basis_stability(previous: Tensor, current: Tensor) -> float:
    """Mean |cosine similarity| of corresponding columns (the first ``current.shape[1]``).

    1.0 when the columns did not move (up to sign), lower when they rotated.
    """
    k = current.shape[1]
    a, b = previous[:, :k].double(), current.double()
    cos = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-30)
    return float(cos.abs().mean())


def _matrix_view(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """How a state tensor shaped like ``module.weight`` reads as the m×n matrix of its SVD."""
    adapter = adapter_for(module)
    assert adapter is not None  # the switch only factorizes layers plan() found eligible
    return lambda t: adapter.matrix_view(module, t)


def _switched_layers(model: nn.Module) -> dict[str, LowRankLayer]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, LowRankLayer) and m.core == "full" and not m.U.requires_grad
    }


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
