r"""``dlrt``: dynamical low-rank training (Schotthöfer et al., NeurIPS 2022, arXiv 2205.13571).

Every converted layer stores :math:`W = U S V^\top` with orthonormal :math:`U \in
\mathbb{R}^{m\times r}`, :math:`V \in \mathbb{R}^{n\times r}` and a full core :math:`S \in
\mathbb{R}^{r\times r}`; a matrix-ODE integrator evolves the three factors so that the bases
stay orthonormal (QR after every step) and, when ``adaptive``, the rank follows the spectrum.

**KLS** (the paper's integrator, three forward/backward passes per batch). With
:math:`K = US`, :math:`L = VS^\top` and :math:`\nabla W` the loss gradient w.r.t. W:

1. K-step: forward with :math:`W = K V^\top`, gradient :math:`\nabla_K = \nabla W\,V`, step
   :math:`K_1 = K - h\,\mathrm{opt}(\nabla_K)`.
2. L-step: forward with :math:`W = U L^\top`, :math:`\nabla_L = \nabla W^\top U`, step
   :math:`L_1`.
3. Bases: adaptive :math:`\hat U = \mathrm{qr}([K_1 \mid U])`, :math:`\hat V =
   \mathrm{qr}([L_1 \mid V])` (k = min(2r, m, n) columns each, so the core stays square);
   fixed rank :math:`\hat U = \mathrm{qr}(K_1)`.
   Core in the new bases :math:`\tilde S = M S N^\top`, :math:`M = \hat U^\top U`,
   :math:`N = \hat V^\top V`.
4. S-step: forward with :math:`\hat U \tilde S \hat V^\top`, step :math:`\tilde S`.
5. Truncation (adaptive): :math:`\tilde S = P \Sigma Q^\top`, rank :math:`r_1` by the
   ``tolerance(τ)`` rule on :math:`\Sigma` (smallest r with :math:`\|\sigma_{r+1:}\|_2 \le
   \tau\|\sigma\|_2`), clamped to :math:`[r_{\min}, r_{\max}]`; :math:`U \leftarrow \hat U
   P_{r_1}`, :math:`S \leftarrow \Sigma_{r_1}`, :math:`V \leftarrow \hat V Q_{r_1}`.

**BUG** (default; the augmented basis-update & Galerkin integrator of Ceruti, Kusch and
Lubich in the one-backward form of the same group's later work, e.g. GeoLoRA). One
forward/backward at :math:`(U, S, V)` gives :math:`\nabla_U = \nabla W V S^\top`,
:math:`\nabla_S = U^\top \nabla W V`, :math:`\nabla_V = \nabla W^\top U S`; the base optimizer
takes one step on all three, giving :math:`(U_1, S_1, V_1)`. Then

* augment: :math:`\hat U = \mathrm{qr}([U \mid U_1])`, :math:`\hat V = \mathrm{qr}([V \mid
  V_1])`. Since :math:`U_1 - U` is the optimizer's step along :math:`\nabla_U = \nabla_K
  S^\top`, the new directions span the same space as the K-step's whenever S is invertible,
  so no :math:`S^{-1}` is ever formed;
* Galerkin core: :math:`\tilde S = (\hat U^\top U_1)\,S_1\,(V_1^\top \hat V)`. This is exact:
  :math:`\hat U \tilde S \hat V^\top = U_1 S_1 V_1^\top` because :math:`U_1, V_1` lie in the
  augmented spans, so the S step taken by the optimizer is carried over unchanged;
* truncate :math:`\tilde S` by its SVD as in KLS step 5. Fixed rank: :math:`\hat U =
  \mathrm{qr}(U_1)` (r columns) and no truncation, again exact.

The step therefore costs one forward/backward of the factorized layer plus a QR of an
m×2r and an n×2r matrix and an SVD of a 2r×2r matrix per layer.

``truncate_every = k`` augments and truncates every k-th step only; the steps between are the
same integrator at fixed rank (so ranks never grow unboundedly without truncation).

**Optimizer state** (the choice the issue leaves open). The factors are trained by the
configured base optimizer (e.g. Adam), like the biases and the dense layers; its moments
follow every basis change instead of being reset. When a layer goes from bases
:math:`(U, V)` to :math:`(U', V')` let :math:`A = U^\top U'`, :math:`B = V^\top V'` (the
change of coordinates; orthogonal for a pure rotation, a projection when directions are added
or dropped). First moments (Adam ``exp_avg``, SGD ``momentum_buffer``) are mapped like the
gradients they average:

* core: :math:`m_S \leftarrow A^\top m_S B` (the design's :math:`m \leftarrow M m N^\top`);
* BUG, whose U and V slots hold moments of :math:`\nabla_U, \nabla_V`:
  :math:`m_U \leftarrow m_U A`, :math:`m_V \leftarrow m_V B`;
* KLS, whose U and V slots hold moments of :math:`\nabla_K = \nabla W V` and
  :math:`\nabla_L = \nabla W^\top U`: :math:`m_K \leftarrow m_K B`, :math:`m_L \leftarrow
  m_L A`.

These maps are exact for a rotation of the bases (the gradient at the same W transforms the
same way) and keep the part of the moment inside the new bases otherwise; newly added
directions start from zero. Second moments (``exp_avg_sq``, ``max_exp_avg_sq``) are mapped
with the elementwise squares :math:`A^{\circ 2}, B^{\circ 2}` (the variance of a linear map of
independent entries), which keeps them non-negative. Adam's step count carries on, so bias
correction does not restart. Every change goes through
:meth:`~lorank.layers.LowRankLayer.set_factors` and :func:`lorank.optim.swap_parameters`;
unknown state keys are dropped (fresh state), so no state of a wrong shape or basis survives.

Bias vectors and the layers kept dense (by default the output layer) are trained by the same
base optimizer, once per batch (in KLS during the S-step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lorank.convert import ConversionReport, LowRankConfig, candidate_layers, convert
from lorank.convert import low_rank_layers as find_low_rank_layers
from lorank.errors import LorankError
from lorank.layers import LowRankLayer
from lorank.methods.base import LossFn, Method, MethodConfig
from lorank.methods.registry import register
from lorank.optim import swap_parameters
from lorank.rank import RankRule, RankSpec, resolve_rank, tolerance

# Optimizer-state keys that average gradients (first moments) or squared gradients.
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


class DLRTConfig(MethodConfig):
    """Dynamical low-rank training: orthonormal U, V and a full core S evolved by KLS or BUG."""

    name: Literal["dlrt"] = "dlrt"
    integrator: Literal["bug", "kls"] = Field(
        "bug", description="bug: one forward/backward per batch; kls: the paper's three passes"
    )
    adaptive: bool = Field(True, description="augment to 2r and truncate by the tolerance")
    tolerance: float = Field(0.1, ge=0, description="τ: drop the tail with ‖σ_tail‖ ≤ τ‖σ‖")
    absolute: bool = Field(False, description="compare the tail with τ itself, not τ‖σ‖")
    init_rank: RankSpec = Field(
        0.5, description="initial rank: int, or a fraction of each layer's min(m, n)"
    )
    r_min: int = Field(2, ge=1, description="smallest rank a layer may truncate to")
    r_max: RankSpec = Field(
        0.5, description="largest rank: int, or a fraction of min(m, n) (default half)"
    )
    dense_layers: list[str] | None = Field(
        None, description="layer names (suffix match) kept dense; default: the output layer"
    )
    init: Literal["random", "svd"] = Field(
        "random", description="random orthonormal bases, or the SVD of the existing weights"
    )

    @model_validator(mode="after")
    def _relative_tolerance_below_one(self) -> DLRTConfig:
        # A relative τ ≥ 1 would truncate every layer to r_min: certainly a typo.
        if not self.absolute and self.tolerance >= 1:
            raise ValueError(
                f"tolerance {self.tolerance} must be in [0, 1) for the relative rule "
                "(set absolute = true for an absolute tolerance)"
            )
        return self

    truncate_every: int = Field(
        1, ge=1, description="adaptive: augment and truncate every N steps (fixed rank between)"
    )


@register
class DLRT(Method):
    """Dynamical low-rank training with the KLS or the one-backward augmented BUG integrator."""

    name = "dlrt"
    config_class = DLRTConfig
    config: DLRTConfig

    def __init__(self, config: DLRTConfig) -> None:
        super().__init__(config)
        self.rule: RankRule = tolerance(config.tolerance, config.absolute)
        self.truncations = 0

    # ------------------------------------------------------------------ setup
    def prepare(self, model: nn.Module) -> ConversionReport:
        cfg = self.config
        probe = LowRankConfig(
            method="dlrt",
            exclude_modules=cfg.dense_layers,
            keep_last_dense=cfg.dense_layers is None,
        )
        candidates = candidate_layers(model, probe)
        pattern: dict[str, int | float] = {}
        for name, module in candidates:
            p = _full_rank(module)
            lo, hi = self.rank_bounds(p)
            init = min(cfg.init_rank, p) if isinstance(cfg.init_rank, int) else cfg.init_rank
            pattern[name] = max(lo, min(hi, resolve_rank(init, p)))
        # Every targeted layer is converted even when its starting rank saves nothing yet: an
        # adaptive run starts high and truncates, and a fixed rank was asked for explicitly.
        report = convert(
            model,
            probe.model_copy(
                update={
                    "rank": cfg.init_rank,
                    "core": "full",
                    "init": cfg.init,
                    "rank_pattern": pattern,
                    "skip_if_no_savings": False,
                }
            ),
        )
        if not report.converted:
            raise LorankError(
                "dlrt found no Linear/Conv2d layer to make low-rank; check "
                "method.dense_layers against the names in `print(model)`"
            )
        return report

    def rank_bounds(self, full_rank: int) -> tuple[int, int]:
        """``[r_min, r_max]`` for a layer of full rank ``min(m, n)``."""
        r_max = self.config.r_max
        hi = resolve_rank(r_max, full_rank) if isinstance(r_max, float) else min(r_max, full_rank)
        return min(self.config.r_min, hi), hi

    # ------------------------------------------------------------------ the step
    def train_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, loss_fn: LossFn
    ) -> dict[str, Tensor]:
        layers = list(find_low_rank_layers(model).values())
        adapt = self.config.adaptive and self.step % self.config.truncate_every == 0
        if self.config.integrator == "bug":
            loss = self._bug_step(model, layers, optimizer, batch, loss_fn, adapt)
        else:
            loss = self._kls_step(model, layers, optimizer, batch, loss_fn, adapt)
        self.step += 1
        self.truncations += int(adapt)
        self.after_step(model, optimizer)
        return self.loss_stats(loss, loss, {})

    def _bug_step(
        self,
        model: nn.Module,
        layers: list[LowRankLayer],
        optimizer: torch.optim.Optimizer,
        batch: Any,
        loss_fn: LossFn,
        adapt: bool,
    ) -> Tensor:
        old_bases = [(layer.U.detach().clone(), layer.V.detach().clone()) for layer in layers]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        self.clip_gradients(model)
        optimizer.step()
        with torch.no_grad():
            for layer, (U0, V0) in zip(layers, old_bases, strict=True):
                U1, S1, V1 = layer.U.detach(), layer.S.detach(), layer.V.detach()
                if adapt:
                    Uh, Vh = _augmented_basis(U0, U1), _augmented_basis(V0, V1)
                else:
                    Uh, Vh = _orthonormal_basis(U1), _orthonormal_basis(V1)
                core = (Uh.T @ U1) @ S1 @ (V1.T @ Vh)
                self._set(layer, optimizer, Uh, core, Vh, U0, V0, "bug", truncate=adapt)
        return loss

    def _kls_step(
        self,
        model: nn.Module,
        layers: list[LowRankLayer],
        optimizer: torch.optim.Optimizer,
        batch: Any,
        loss_fn: LossFn,
        adapt: bool,
    ) -> Tensor:
        start = [
            (lr.U.detach().clone(), lr.S.detach().clone(), lr.V.detach().clone()) for lr in layers
        ]
        eye = [torch.eye(lr.rank, dtype=lr.S.dtype, device=lr.S.device) for lr in layers]
        with torch.no_grad():  # K-step point: W = K Vᵀ with K = U S held in the U slot
            for layer, (U0, S0, _), e in zip(layers, start, eye, strict=True):
                layer.U.copy_(U0 @ S0)
                layer.S.copy_(e)
        loss = loss_fn(model, batch)
        grad_k = torch.autograd.grad(loss, [layer.U for layer in layers])
        with torch.no_grad():  # L-step point: W = U Lᵀ with L = V Sᵀ held in the V slot
            for layer, (U0, S0, V0) in zip(layers, start, strict=True):
                layer.U.copy_(U0)
                layer.V.copy_(V0 @ S0.T)
        grad_l = torch.autograd.grad(loss_fn(model, batch), [layer.V for layer in layers])
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for layer, (U0, S0, _), gk, gl in zip(layers, start, grad_k, grad_l, strict=True):
                layer.U.copy_(U0 @ S0)
                layer.U.grad, layer.V.grad = gk, gl
        self.clip_gradients(model)
        optimizer.step()  # K₁ and L₁ (only the U and V slots carry gradients)
        with torch.no_grad():
            for layer, (U0, S0, V0) in zip(layers, start, strict=True):
                K1, L1 = layer.U.detach(), layer.V.detach()
                if adapt:
                    if 2 * layer.rank <= layer.full_rank:
                        Uh, Vh = _augmented_basis(U0, K1), _augmented_basis(V0, L1)
                    else:
                        # The core must stay square, so near full rank both bases get
                        # k = min(m, n) columns; K₁, L₁ come first, so the old directions are
                        # the ones dropped, as the fixed-rank step would do.
                        k = layer.full_rank
                        Uh = torch.linalg.qr(torch.cat([K1, U0], 1))[0][:, :k]
                        Vh = torch.linalg.qr(torch.cat([L1, V0], 1))[0][:, :k]
                else:
                    Uh, Vh = _orthonormal_basis(K1), _orthonormal_basis(L1)
                core = (Uh.T @ U0) @ S0 @ (V0.T @ Vh)
                self._set(layer, optimizer, Uh, core, Vh, U0, V0, "kls", truncate=False)
        # S-step on the (augmented) core; biases and dense layers take their step here too.
        optimizer.zero_grad(set_to_none=True)
        factors = {id(p) for layer in layers for p in (layer.U, layer.V)}
        trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in factors]
        grads = torch.autograd.grad(loss_fn(model, batch), trainable, allow_unused=True)
        for p, g in zip(trainable, grads, strict=True):
            p.grad = g
        self.clip_gradients(model)
        optimizer.step()
        if adapt:
            with torch.no_grad():
                for layer in layers:
                    U, S, V = layer.U.detach(), layer.S.detach(), layer.V.detach()
                    self._set(
                        layer,
                        optimizer,
                        U,
                        S.clone(),
                        V,
                        U.clone(),
                        V.clone(),
                        "kls",
                        truncate=True,
                    )
        return loss

    def _set(
        self,
        layer: LowRankLayer,
        optimizer: torch.optim.Optimizer,
        Uh: Tensor,
        core: Tensor,
        Vh: Tensor,
        U_old: Tensor,
        V_old: Tensor,
        integrator: str,
        truncate: bool,
    ) -> None:
        """Install ``Uh core Vhᵀ`` (truncated by the rule when asked) and move the state."""
        if truncate:
            P, sigma, Qt = _svd(core)
            lo, hi = self.rank_bounds(layer.full_rank)
            r = self.rule.select(sigma, lo, hi, full_rank=layer.full_rank)
            r = min(r, sigma.numel())
            Uh, core, Vh = Uh @ P[:, :r], torch.diag(sigma[:r]), Vh @ Qt[:r].T
        mapping = layer.set_factors(Uh, core, Vh)
        A, B = U_old.T @ layer.U.detach(), V_old.T @ layer.V.detach()
        swap_parameters(optimizer, mapping, _basis_change(layer, mapping, A, B, integrator))

    # ------------------------------------------------------------------ reporting
    def passes_per_batch(self) -> int:
        return 1 if self.config.integrator == "bug" else 3

    def epoch_metrics(self, model: nn.Module) -> dict[str, Any]:
        layers = find_low_rank_layers(model)
        factor_ids = {id(p) for layer in layers.values() for p in (layer.U, layer.S, layer.V)}
        others = sum(
            p.numel() for p in model.parameters() if p.requires_grad and id(p) not in factor_ids
        )
        return {
            "passes_per_batch": self.passes_per_batch(),
            "params_allocated": others + sum(self.allocated(layer) for layer in layers.values()),
            "truncations": self.truncations,
        }

    def allocated(self, layer: LowRankLayer) -> int:
        """Factor entries the integrator holds in one step at the layer's current rank.

        BUG keeps the old bases beside the stepped ones and builds the augmented bases and
        core; KLS holds K, L, the start point and the augmented bases and core. Fixed-rank
        steps need no augmentation but still keep the start point.
        """
        m, n, r = layer.out_dim, layer.in_dim, layer.rank
        k = min(2 * r, m, n) if self.config.adaptive else r
        kept = 2 * r * (m + n) + 2 * r * r  # current factors + start point (or K, L)
        return kept + k * (m + n) + k * k

    def summary(self) -> dict[str, Any]:
        return {
            "dlrt_integrator": self.config.integrator,
            "dlrt_passes_per_batch": self.passes_per_batch(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "truncations": self.truncations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.truncations = int(state.get("truncations", 0))


def _svd(core: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the small core; LAPACK's divide-and-conquer can fail to converge on cores
    with clustered singular values in float32, so retry in float64 before giving up."""
    try:
        return torch.linalg.svd(core, full_matrices=False)
    except torch.linalg.LinAlgError:
        if not torch.isfinite(core).all():
            raise LorankError(
                "a DLRT core holds NaN or inf (training diverged); lower optim.lr "
                "or set optim.grad_clip"
            ) from None
        P, sigma, Qt = torch.linalg.svd(core.double(), full_matrices=False)
        return P.to(core.dtype), sigma.to(core.dtype), Qt.to(core.dtype)


def _cholesky_qr(x: Tensor, passes: int = 2) -> Tensor | None:
    """Cholesky QR: ``Q = X R⁻¹`` with ``RᵀR = XᵀX``, repeated ``passes`` times (the second
    pass brings a well-conditioned ``x`` to working precision). Only GEMMs and an r×r
    triangular inverse, several times faster than Householder QR on thin matrices. ``None``
    when the Gram matrix is not numerically positive definite."""
    q = x
    for _ in range(passes):
        chol, info = torch.linalg.cholesky_ex(q.T @ q)
        if int(info) != 0:
            return None
        eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
        q = q @ torch.linalg.solve_triangular(chol, eye, upper=False).T
    return q


def _orthonormal_basis(x: Tensor) -> Tensor:
    """Orthonormal columns spanning the columns of ``x`` (at most ``rows`` of them): Cholesky
    QR for a tall, well-conditioned ``x``, Householder QR otherwise."""
    if x.shape[1] <= x.shape[0]:
        q = _cholesky_qr(x)
        if q is not None:
            return q
    q, _ = torch.linalg.qr(x)
    return q[:, : min(x.shape)]


def _augmented_basis(basis: Tensor, x: Tensor) -> Tensor:
    """``[basis' | new]``: an orthonormal basis of span([basis | x]), min(2r, rows) columns,
    whose first r columns span ``basis`` (orthonormal up to rounding).

    ``x`` (a stepped factor) is close to ``basis``, so the concatenation is far too
    ill-conditioned for Cholesky QR; instead the new directions are ``x`` minus its projection
    on ``basis`` (projected twice, "twice is enough"), orthonormalized, and the near-orthonormal
    concatenation gets one more Cholesky QR pass, which also removes any drift of ``basis``
    from orthonormality accumulated over steps. Near full rank (2r > rows), or when the new
    directions are rank-deficient, Householder QR of the concatenation is used.
    """
    rows, r = basis.shape
    if 2 * r <= rows:
        new = x - basis @ (basis.T @ x)
        new = _cholesky_qr(new - basis @ (basis.T @ new))
        if new is not None:
            full = _cholesky_qr(torch.cat([basis, new], 1), passes=1)
            if full is not None:
                return full
    q, _ = torch.linalg.qr(torch.cat([basis, x], 1))
    return q[:, : min(rows, 2 * r)]


def _basis_change(
    layer: LowRankLayer,
    mapping: dict[nn.Parameter, nn.Parameter],
    A: Tensor,
    B: Tensor,
    integrator: str,
) -> Callable[[str, Tensor, nn.Parameter, nn.Parameter], Tensor | None]:
    """The state transform for one layer going from bases (U, V) to (U', V')."""
    slots = {}
    for old, new in mapping.items():
        if new is layer.U:
            slots[old] = "U"
        elif new is layer.V:
            slots[old] = "V"
        else:
            slots[old] = "S"
    # Which coordinate change the U and V slots' moments follow (see the module docstring).
    right = {"U": A, "V": B} if integrator == "bug" else {"U": B, "V": A}

    def transform(key: str, value: Tensor, old: nn.Parameter, new: nn.Parameter) -> Tensor | None:
        if key in _FIRST_MOMENTS:
            square = False
        elif key in _SECOND_MOMENTS:
            square = True
        else:
            return None  # unknown state: start fresh rather than guess
        slot = slots[old]
        a, b = (A * A, B * B) if square else (A, B)
        if slot == "S":
            return a.T @ value @ b
        r = right[slot]
        return value @ (r * r if square else r)

    return transform


def _full_rank(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return min(module.out_channels, module.in_channels * kh * kw // module.groups)
    if isinstance(module, nn.Linear):
        return min(module.out_features, module.in_features)
    return min(module.weight.shape)
