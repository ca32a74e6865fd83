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

* augment: :math:`\hat U = [U \mid N]` with :math:`N R = (I - UU^\top)(U_1 - U)` (projected
  twice, Cholesky QR), so :math:`U_1 = \hat U C_U` with :math:`C_U = [I + U^\top(U_1 - U);\ R]`
  built from r×r matrices only. Since :math:`U_1 - U` is the optimizer's step along
  :math:`\nabla_U = \nabla_K S^\top`, the new directions span the same space as the K-step's
  whenever S is invertible, so no :math:`S^{-1}` is ever formed;
* Galerkin core: :math:`\tilde S = C_U S_1 C_V^\top`. This is exact: :math:`\hat U \tilde S
  \hat V^\top = U_1 S_1 V_1^\top`, so the S step taken by the optimizer is carried over
  unchanged;
* truncate :math:`\tilde S = P\Sigma Q^\top` as in KLS step 5, then one Cholesky-QR pass on
  :math:`\hat U P_{r_1}` (folded into the core) so rounding errors never accumulate. Fixed
  rank: :math:`U_1 = \hat U R_U` by one Cholesky-QR pass (a stepped basis is within one small
  step of orthonormal) and :math:`\tilde S = R_U S_1 R_V^\top`, again exact.

The step therefore costs one forward/backward of the factorized layer, a few m×r×r GEMMs
per basis (about 4 fixed, 12 adaptive) and, when adaptive, an SVD of a 2r×2r matrix per layer.

``truncate_every = k`` augments and truncates every k-th step only; the steps between are the
same integrator at fixed rank (so ranks never grow unboundedly without truncation).

**Optimizer state** (the choice the issue leaves open). The factors are trained by the
configured base optimizer (e.g. Adam), like the biases and the dense layers; its moments
follow every basis change instead of being reset. First moments (Adam ``exp_avg``, SGD
``momentum_buffer``) are mapped like the gradients they average:

* BUG re-factorizes :math:`U_1 = U' X_U`, :math:`V_1 = V' X_V` (fixed rank: :math:`X = R`;
  adaptive: :math:`X_U = R' P_{r_1}^\top C_U`, which also projects onto the kept directions).
  At the same W the gradients then satisfy :math:`\nabla_{U'} = \nabla_{U_1} X_U^\top` and
  :math:`\nabla_{S'} = X_U^{-\top} \nabla_{S_1} X_V^{-1}` (pseudo-inverses when the rank
  changed), so :math:`m_U \leftarrow m_U X_U^\top`, :math:`m_S \leftarrow X_U^{-\top} m_S
  X_V^{-1}`, :math:`m_V \leftarrow m_V X_V^\top`: exact for any invertible change of basis;
* KLS, whose U and V slots hold moments of :math:`\nabla_K = \nabla W V` and
  :math:`\nabla_L = \nabla W^\top U`, with :math:`A = U^\top U'`, :math:`B = V^\top V'`:
  :math:`m_K \leftarrow m_K B`, :math:`m_L \leftarrow m_L A`, :math:`m_S \leftarrow A^\top m_S
  B` (exact for a rotation of the bases; a projection when directions are dropped).

Second moments (``exp_avg_sq``, ``max_exp_avg_sq``) are mapped with the elementwise squares
of the same matrices (the variance of a linear map of independent entries), which keeps them
non-negative; on BUG's fixed-rank steps, where :math:`X = R = I + O(h)`, they are kept as
they are (the map would change them by O(h), far below Adam's own averaging, for two more
GEMMs per basis). Newly added directions start from zero. Adam's step count carries on, so
bias correction does not restart. Unknown state keys are dropped (fresh state), so no state
of a wrong shape or basis survives.

Bias vectors and the layers kept dense (by default the output layer) are trained by the same
base optimizer, once per batch (in KLS during the S-step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lorank.core.convert import ConversionReport, LowRankConfig, candidate_layers, convert
from lorank.core.convert import low_rank_layers as find_low_rank_layers
from lorank.core.layers import LowRankLayer
from lorank.core.optim import swap_parameters
from lorank.core.rank import RankRule, RankSpec, resolve_rank, tolerance
from lorank.errors import LorankError
from lorank.methods.base import LossFn, Method, MethodConfig
from lorank.methods.registry import register

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
    core = "full"
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
        if loss is None:  # a skipped non-finite batch
            self.skipped_batches += 1
            zero = torch.zeros((), device=next(model.parameters()).device)
            return {"loss": zero, "loss_task": zero.clone()}
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
    ) -> Tensor | None:
        # Only the augmentation needs the bases from before the optimizer step.
        old_bases = (
            [(lr.U.detach().clone(), lr.V.detach().clone()) for lr in layers] if adapt else []
        )
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        if self.skip_nonfinite and not torch.isfinite(loss):
            return None  # train.nonfinite = "skip": leave the weights as they are
        loss.backward()
        self.clip_gradients(model)
        optimizer.step()
        with torch.no_grad():
            for i, layer in enumerate(layers):
                U1, S1, V1 = layer.U.detach(), layer.S.detach(), layer.V.detach()
                if adapt:
                    (Uh, Cu), (Vh, Cv) = (
                        _augment(old_bases[i][0], U1),
                        _augment(old_bases[i][1], V1),
                    )
                else:
                    (Uh, Cu), (Vh, Cv) = _qr(U1), _qr(V1)
                self._galerkin(layer, optimizer, Uh, Cu, S1, Vh, Cv, truncate=adapt)
        return loss

    def _galerkin(
        self,
        layer: LowRankLayer,
        optimizer: torch.optim.Optimizer,
        Uh: Tensor,
        Cu: Tensor,
        S1: Tensor,
        Vh: Tensor,
        Cv: Tensor,
        truncate: bool,
    ) -> None:
        """Install the BUG result given orthonormal ``Uh``, ``Vh`` with ``U₁ = Uh Cu``,
        ``V₁ = Vh Cv``: the core ``Cu S₁ Cvᵀ`` (exactly ``Uhᵀ U₁ S₁ V₁ᵀ Vh``, from small
        matrices only), truncated by the rule when asked, and the optimizer state moved by
        ``X_U``, ``X_V`` with ``U₁ ≈ U' X_U`` (see the module docstring)."""
        core = Cu @ S1 @ Cv.T
        if truncate:
            P, sigma, Qt = _svd(core)
            lo, hi = self.rank_bounds(layer.full_rank)
            r = min(self.rule.select(sigma, lo, hi, full_rank=layer.full_rank), sigma.numel())
            Pu, Pv = P[:, :r], Qt[:r].T
            # Uh Pu is orthonormal up to rounding; one Cholesky-QR pass (folded into the
            # core) keeps rounding errors from accumulating over many steps.
            (Uh, Ru), (Vh, Rv) = _qr(Uh @ Pu), _qr(Vh @ Pv)
            core = Ru @ torch.diag(sigma[:r]) @ Rv.T
            Xu, Xv = Ru @ (Pu.T @ Cu), Rv @ (Pv.T @ Cv)
        else:
            Xu, Xv = Cu, Cv
        maps = {"U": Xu.T, "V": Xv.T, "S": (_pinv(Xu).T, _pinv(Xv))}
        if Uh.shape != layer.U.shape:
            mapping = layer.set_factors(Uh, core, Vh)
        else:
            # Same shapes: update the parameters in place (no new Parameters); their state is
            # transformed in place by the identity mapping.
            for name, value in (("U", Uh), ("S", core), ("V", Vh)):
                getattr(layer, name).copy_(value)
            mapping = {p: p for p in (layer.U, layer.S, layer.V)}
        # A fixed-rank step's X = R is I + O(step), so its second moments are kept as they
        # are: the elementwise-square map would change them by O(step) too, far below Adam's
        # own averaging, at the cost of two more GEMMs per basis.
        transform = _state_map(layer, mapping, maps, map_second_moments=truncate)
        swap_parameters(optimizer, mapping, transform)

    def _kls_step(
        self,
        model: nn.Module,
        layers: list[LowRankLayer],
        optimizer: torch.optim.Optimizer,
        batch: Any,
        loss_fn: LossFn,
        adapt: bool,
    ) -> Tensor | None:
        start = [
            (lr.U.detach().clone(), lr.S.detach().clone(), lr.V.detach().clone()) for lr in layers
        ]
        eye = [torch.eye(lr.rank, dtype=lr.S.dtype, device=lr.S.device) for lr in layers]
        with torch.no_grad():  # K-step point: W = K Vᵀ with K = U S held in the U slot
            for layer, (U0, S0, _), e in zip(layers, start, eye, strict=True):
                layer.U.copy_(U0 @ S0)
                layer.S.copy_(e)
        loss = loss_fn(model, batch)
        if self.skip_nonfinite and not torch.isfinite(loss):
            with torch.no_grad():  # train.nonfinite = "skip": back to the weights before
                for layer, (U0, S0, _) in zip(layers, start, strict=True):
                    layer.U.copy_(U0)
                    layer.S.copy_(S0)
            return None
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
                r = layer.rank
                if adapt and 2 * r <= layer.full_rank:
                    (Uh, _), (Vh, _) = _augment(U0, K1), _augment(V0, L1)
                elif adapt:
                    # The core must stay square, so near full rank both bases get
                    # k = min(m, n) columns; K₁, L₁ come first, so the old directions are
                    # the ones dropped, as the fixed-rank step would do.
                    k = layer.full_rank
                    Uh = torch.linalg.qr(torch.cat([K1, U0], 1))[0][:, :k]
                    Vh = torch.linalg.qr(torch.cat([L1, V0], 1))[0][:, :k]
                else:
                    Uh, Vh = _qr(K1)[0], _qr(L1)[0]
                if adapt and _starts_with(Uh, U0) and _starts_with(Vh, V0):
                    # [U₀ | N]: the old basis in new coordinates is [I; 0], so the core
                    # M S₀ Nᵀ and the coordinate changes need no product with a tall basis.
                    A = torch.eye(r, Uh.shape[1], dtype=S0.dtype, device=S0.device)
                    B = torch.eye(r, Vh.shape[1], dtype=S0.dtype, device=S0.device)
                else:
                    A, B = U0.T @ Uh, V0.T @ Vh
                self._set(layer, optimizer, Uh, A.T @ S0 @ B, Vh, A, B, truncate=False)
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
                    eye = torch.eye(layer.rank, dtype=S.dtype, device=S.device)
                    self._set(layer, optimizer, U, S.clone(), V, eye, eye, truncate=True)
        return loss

    def _set(
        self,
        layer: LowRankLayer,
        optimizer: torch.optim.Optimizer,
        Uh: Tensor,
        core: Tensor,
        Vh: Tensor,
        A: Tensor,
        B: Tensor,
        truncate: bool,
    ) -> None:
        """KLS: install ``Uh core Vhᵀ`` (truncated by the rule when asked) and move the state;
        ``A = U_oldᵀ Uh``, ``B = V_oldᵀ Vh`` are the coordinate changes before truncation."""
        if truncate:
            P, sigma, Qt = _svd(core)
            lo, hi = self.rank_bounds(layer.full_rank)
            r = self.rule.select(sigma, lo, hi, full_rank=layer.full_rank)
            r = min(r, sigma.numel())
            Pr, Qr = P[:, :r], Qt[:r].T
            Uh, core, Vh = Uh @ Pr, torch.diag(sigma[:r]), Vh @ Qr
            A, B = A @ Pr, B @ Qr
        mapping = layer.set_factors(Uh, core, Vh)
        # KLS's U and V slots hold moments of ∇_K = ∇W V and ∇_L = ∇Wᵀ U.
        maps = {"U": B, "V": A, "S": (A.T, B)}
        swap_parameters(optimizer, mapping, _state_map(layer, mapping, maps))

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
            # Not bad input: the run diverged. The trainer turns this into its one
            # divergence path (summary marked diverged, exit 1).
            raise FloatingPointError("a DLRT core holds NaN or inf") from None
        P, sigma, Qt = torch.linalg.svd(core.double(), full_matrices=False)
        return P.to(core.dtype), sigma.to(core.dtype), Qt.to(core.dtype)


def _cholesky_qr(
    x: Tensor, passes: int, gram: Tensor | None = None
) -> tuple[Tensor, Tensor] | None:
    """Cholesky QR, ``x = Q R``: ``R`` from the Cholesky factor of ``xᵀx``, ``Q = x R⁻¹``;
    ``passes`` times (a second pass brings a well-conditioned ``x`` to working precision).
    Only GEMMs and r×r triangular work: several times faster than Householder QR on thin
    matrices. ``None`` when the Gram matrix is not numerically positive definite. ``gram``:
    ``xᵀx`` when the caller already has it."""
    q, r_total = x, None
    for i in range(passes):
        chol, info = torch.linalg.cholesky_ex(gram if i == 0 and gram is not None else q.T @ q)
        if int(info) != 0:
            return None
        r = chol.T
        eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
        q = q @ torch.linalg.solve_triangular(r, eye, upper=True)
        r_total = r if r_total is None else r @ r_total
    assert r_total is not None
    return q, r_total


def _qr(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x = Q R`` with orthonormal ``Q`` (min(rows, cols) columns).

    A stepped basis is within one small step of orthonormal, where one Cholesky-QR pass
    already reaches working precision (its error grows with κ(x)², here ≈ 1); a second pass
    runs only when the Gram matrix is far from the identity. Householder QR is the fallback
    for wide or rank-deficient ``x``."""
    if x.shape[1] <= x.shape[0]:
        gram = x.T @ x
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        passes = 1 if float((gram - eye).abs().max()) < 0.1 else 2
        out = _cholesky_qr(x, passes, gram)
        if out is not None:
            return out
    q, r = torch.linalg.qr(x)
    k = min(x.shape)
    return q[:, :k], r[:k]


def _augment(basis: Tensor, stepped: Tensor) -> tuple[Tensor, Tensor]:
    """``Uh = [basis | N]``, orthonormal with min(2r, rows) columns, and ``C`` with
    ``stepped = Uh C``.

    The new directions come from the step ``D = stepped - basis`` itself (no cancellation,
    unlike projecting ``stepped``): ``D`` minus its projection on ``basis``, projected twice
    ("twice is enough"), is ``N R`` by Cholesky QR, so ``stepped = basis (I + c) + N R`` with
    ``c`` the two projection coefficients; ``C`` needs no product with a tall matrix. Near
    full rank (2r > rows) or when the step is rank-deficient, Householder QR of
    ``[basis | stepped]`` is used instead."""
    rows, r = basis.shape
    if 2 * r <= rows:
        step = stepped - basis
        c1 = basis.T @ step
        residual = step - basis @ c1
        c2 = basis.T @ residual
        residual = residual - basis @ c2
        out = _cholesky_qr(residual, passes=2)
        if out is not None:
            new, r_new = out
            eye = torch.eye(r, dtype=basis.dtype, device=basis.device)
            return torch.cat([basis, new], 1), torch.cat([eye + c1 + c2, r_new], 0)
    q, _ = torch.linalg.qr(torch.cat([basis, stepped], 1))
    q = q[:, : min(rows, 2 * r)]
    return q, q.T @ stepped


def _starts_with(basis: Tensor, head: Tensor) -> bool:
    """Whether ``basis``'s first columns are ``head`` itself (``_augment``'s fast path)."""
    r = head.shape[1]
    return basis.shape[1] > r and bool(torch.equal(basis[:, :r], head))


def _pinv(x: Tensor) -> Tensor:
    """Inverse of a small square factor, pseudo-inverse when the rank changed."""
    if x.shape[0] == x.shape[1]:
        inv, info = torch.linalg.inv_ex(x)
        if int(info) == 0:
            return inv
    return torch.linalg.pinv(x)


def _state_map(
    layer: LowRankLayer,
    mapping: dict[nn.Parameter, nn.Parameter],
    maps: dict[str, Any],
    map_second_moments: bool = True,
) -> Callable[[str, Tensor, nn.Parameter, nn.Parameter], Tensor | None]:
    """The optimizer-state transform of one layer: first moments of the U and V slots are
    multiplied on the right by ``maps["U"]``, ``maps["V"]``, the core's by
    ``left @ m @ right`` with ``(left, right) = maps["S"]``; second moments by the
    elementwise squares of the same matrices (which keeps them non-negative), or kept as
    they are when ``map_second_moments`` is false."""
    slots = {}
    for old, new in mapping.items():
        slots[old] = "U" if new is layer.U else "V" if new is layer.V else "S"

    def transform(key: str, value: Tensor, old: nn.Parameter, new: nn.Parameter) -> Tensor | None:
        if key not in _FIRST_MOMENTS and key not in _SECOND_MOMENTS:
            return None  # unknown state: start fresh rather than guess
        if key in _SECOND_MOMENTS and not map_second_moments:
            return value
        return _apply_map(maps, slots[old], value, key in _SECOND_MOMENTS)

    return transform


def _apply_map(maps: dict[str, Any], slot: str, value: Tensor, square: bool) -> Tensor:
    if slot == "S":
        left, right = maps["S"]
        if square:
            left, right = left * left, right * right
        return left @ value @ right
    m = maps[slot]
    return value @ (m * m if square else m)


def _full_rank(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return min(module.out_channels, module.in_channels * kh * kw // module.groups)
    if isinstance(module, nn.Linear):
        return min(module.out_features, module.in_features)
    return min(module.weight.shape)
