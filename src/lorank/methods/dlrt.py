r"""``dlrt``: dynamical low-rank training (Schotthöfer et al., NeurIPS 2022, arXiv 2205.13571).

Every converted layer stores :math:`W = U S V^\top` with orthonormal :math:`U \in
\mathbb{R}^{m\times r}`, :math:`V \in \mathbb{R}^{n\times r}` and a full core :math:`S \in
\mathbb{R}^{r\times r}`; a matrix-ODE integrator of the gradient flow projected onto the
rank-r manifold evolves the factors. With :math:`K = US`, :math:`L = VS^\top`, :math:`G =
\nabla W` and ``opt`` the configured base optimizer's step (SGD, Adam, ...), every integrator
uses, at the current point :math:`(U_0, S_0, V_0)`,

.. math:: \nabla_K = G V_0,\quad \nabla_L = G^\top U_0,\quad \nabla_S = U_0^\top G V_0 .

They come exactly from one backward, with no :math:`S^{-1}`: in the layer's K/L/S gradient
mode (:attr:`lorank.layers.LowRankLayer.kls_gradients`) the backward computes
:math:`\nabla_K = g^\top (xV_0)`, :math:`\nabla_L = x^\top (gU_0)`, :math:`\nabla_S =
(gU_0)^\top(xV_0)` from the layer input x and output gradient g (Conv2d: the 1×1 and k×k
convolution identities), with the GEMMs and saved tensors of the factorized backward.

**parallel** (default; the parallel rank-adaptive integrator of Ceruti, Kusch and Lubich,
2024, the basis of GeoLoRA; one forward/backward per batch). One optimizer step on the three
gradients gives :math:`\bar S_1 = S_0 - h\,\mathrm{opt}(\nabla_S)` and the K- and L-steps
:math:`K_1 - K_0 = -h\,\mathrm{opt}(\nabla_K)`, :math:`L_1 - L_0`. The new directions
:math:`\tilde U` are an orthonormal basis of :math:`(I - U_0U_0^\top)K_1` (projected twice,
Cholesky QR; Householder QR when the step is rank-deficient), likewise :math:`\tilde V`, and

.. math:: \hat U = [U_0 \mid \tilde U],\quad \hat V = [V_0 \mid \tilde V],\quad
   \hat S = \begin{pmatrix} \bar S_1 & L_1^\top \tilde V \\ \tilde U^\top K_1 & 0
   \end{pmatrix},

so :math:`\hat U\hat S\hat V^\top = W_0 - h\,\mathrm{opt}` projected on the tangent space
(for SGD exactly :math:`W_0 - h(U_0U_0^\top G + GV_0V_0^\top - U_0U_0^\top G V_0V_0^\top)`).
:math:`\tilde U^\top K_1` is the R factor of the QR, so the core costs no tall product.
Adaptive: truncate by the tolerance (below); fixed rank: truncate to r (the 2r×2r core's
small singular values are O(h²), so this stays first order).

**bug** (the rank-adaptive augmented basis-update & Galerkin integrator of Ceruti, Kusch and
Lubich, BIT 2022). K- and L-steps from the same point as above (only the U and V slots step),
:math:`\hat U = \mathrm{orth}([U_0 \mid K_1])`, :math:`\hat V = \mathrm{orth}([L_1 \mid V_0])`
(the same :math:`[U_0 \mid \tilde U]` construction), :math:`\tilde S_0 = (\hat U^\top U_0) S_0
(\hat V^\top V_0)^\top = \mathrm{diag}(S_0, 0)`; then a Galerkin S-step at the augmented point
(biases and dense layers take their step here) and truncation of :math:`\tilde S_1`. The
augmented point :math:`\hat U \tilde S_0 \hat V^\top` is :math:`W_0` itself, so its gradient
:math:`\hat U^\top \nabla W \hat V` comes from the one backward: the blocks
:math:`\nabla_S`, :math:`\nabla_L^\top \tilde V`, :math:`\tilde U^\top \nabla_K` and
:math:`\tilde U^\top \nabla W \tilde V = (g\tilde U)^\top (x\tilde V)` from the input and
output gradient each layer stashes (one forward/backward per batch; layer kinds without a
stash, and layers whose augmented basis cannot keep the old one near full rank, take a
second pass). Fixed rank: the unconventional BUG integrator, :math:`\hat U =
\mathrm{orth}(K_1)`, :math:`\hat V = \mathrm{orth}(L_1)` (r columns), :math:`\tilde S_0 =
(\hat U^\top U_0) S_0 (\hat V^\top V_0)^\top`, S-step at that new point (a second pass).

**kls** (the DLRT paper's presentation; three forward/backward passes): the same algorithm as
``bug``, with :math:`\nabla_K` from a forward at :math:`W = K V_0^\top` and :math:`\nabla_L` from
one at :math:`W = U_0 L^\top` through ordinary autograd. Kept as an independent reference.

**retraction** (fast, *not* a DLRT integrator, kept for comparison): one optimizer step on
U, S and V as separate parameters (:math:`\nabla_U = \nabla_K S^\top`), then the stepped
factors are re-orthonormalised (adaptive: written in the augmented bases and truncated).
Its core :math:`C_U S_1 C_V^\top` has rank ≤ r, so truncation can never raise a rank, and
its step depends on the scale of S (:math:`\|\Delta W\| \propto \sigma^2` for
:math:`S = \sigma I`), the instability DLRT exists to avoid.

**Truncation** (adaptive steps): :math:`\hat S = P\Sigma Q^\top`; rank :math:`r_1` by the
``tolerance(τ)`` rule (smallest r with :math:`\|\sigma_{r+1:}\|_2 \le \tau\|\sigma\|_2`),
clamped to :math:`[r_{\min}, r_{\max}]`; :math:`U_1 R_U = \hat U P_{r_1}` by one Cholesky-QR
pass and :math:`S_1 = R_U \Sigma_{r_1} R_V^\top`, :math:`V_1 R_V = \hat V Q_{r_1}`. The
Cholesky-QR pass costs two m×r×r GEMMs and resets the rounding error of the bases every
step, so they stay orthonormal to working precision over any run length (without it the
error of :math:`\hat U P` accumulates, e.g. to 1e-1 after 1,000 float32 Adam steps).
``truncate_every = k`` truncates by the tolerance every k-th step only; the steps between
are the integrator's fixed-rank step.

**Optimizer state.** The U and V slots of the parallel, bug and kls integrators hold the
optimizer state of the K- and L-steps (moments of :math:`\nabla_K`, :math:`\nabla_L`), the S
slot that of the S-step; each state follows every change of basis instead of being reset.
When the bases change from :math:`(U_0, V_0)` to :math:`(U_1, V_1)`, with :math:`A =
U_0^\top U_1`, :math:`B = V_0^\top V_1` (small matrices, known from the construction):
:math:`m_K \leftarrow m_K B`, :math:`m_L \leftarrow m_L A`, :math:`m_S \leftarrow A^\top m_S
B` for first moments (Adam ``exp_avg``, SGD ``momentum_buffer``). This is exact (the moment
of the gradient at the new point) for any change of basis within the old span, and a
projection when directions are dropped; newly added directions start from zero. Second
moments (``exp_avg_sq``, ``max_exp_avg_sq``) are mapped with the elementwise squares of the
same matrices (the variance of a linear map of independent entries), which keeps them
non-negative; in bug and kls the augmented core's cross blocks, which are linear maps of
the K and L gradients, take the K- and L-slots' moments through those maps (Ũᵀ m_K,
(Ṽᵀ m_L)ᵀ), so the rotation part of the step keeps its momentum; any other newly added
direction gets its row's mean second moment instead of zero (a
zero second moment makes Adam's first steps ±3η whatever the gradient, so round-off-sized
gradients would be amplified into directions above the truncation threshold). Adam's step
count carries on, so bias correction does not restart. Unknown state keys are dropped
(fresh state). ``retraction`` maps its U, S, V moments by the
change of basis of the factors themselves (see :meth:`DLRT._galerkin`).

**Weight decay** acts on W once, as on a dense layer: during the K- and L-steps the U and V
slots hold :math:`K - K_0 = 0` (parallel, bug; kls holds K₀, whose decayed part lies in
span(U₀) and is discarded with it), so decoupled (AdamW) decay shrinks only S; ``retraction``
undoes the decay its U and V steps took.

Bias vectors and the layers kept dense (by default the output layer) are trained by the same
base optimizer, once per batch (bug and kls: during the S-step).

One method, one file (the package's rule): the four integrators share the layer bookkeeping,
the optimizer-state maps and the truncation, which is why the file is long.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from lorank.core.adapters import matrix_shape
from lorank.core.convert import ConversionReport, LowRankConfig, candidate_layers, convert
from lorank.core.convert import low_rank_layers as find_low_rank_layers
from lorank.core.layers import LowRankLayer, kls_cross_gradient
from lorank.core.optim import swap_parameters
from lorank.core.rank import RankRule, RankSpec, resolve_rank, tolerance
from lorank.errors import LorankError
from lorank.methods.base import LossFn, Method, MethodConfig
from lorank.methods.registry import register

# Optimizer-state keys that average gradients (first moments) or squared gradients.
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")

Integrator = Literal["parallel", "bug", "kls", "retraction"]
PASSES: dict[str, int] = {"parallel": 1, "bug": 2, "kls": 3, "retraction": 1}
# How often the parallel step's fast path re-orthonormalises its bases by an explicit
# Cholesky-QR pass (between passes, only GEMM rounding accumulates: ~1e-7 per step in float32).
REORTHONORMALIZE_EVERY = 16
#: The Gram-only (lean) parallel step needs every new direction's squared size ≥ this × the
#: step's largest squared column, else the explicit path runs. The Gram difference then has
#: relative error ≤ eps/LEAN_SEPARATION in the weakest new direction (1e-3 in float32), which
#: the kept core barely sees: on a 12-layer MLP at ratios down to 2e-4 the lean and explicit
#: steps gave the same W to 1e-6 (float32) and 3e-15 (float64). At 1e-2 deep networks took
#: the explicit path for most layers (2-3× the basis work).
LEAN_SEPARATION = 1e-4


class DLRTConfig(MethodConfig):
    """Dynamical low-rank training: orthonormal U, V and a full core S evolved by a DLRT
    integrator (parallel, bug or kls) or the non-DLRT one-step retraction."""

    name: Literal["dlrt"] = "dlrt"
    integrator: Integrator = Field(
        "parallel",
        description="parallel: rank-adaptive, one pass per batch; bug: augmented BUG (one "
        "pass adaptive, two fixed-rank); kls: the paper's three passes; retraction: one step "
        "on U, S, V plus QR "
        "(fast, cannot raise a rank, not scale-invariant)",
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
    """Dynamical low-rank training with the parallel, BUG or KLS integrator."""

    name = "dlrt"
    core = "full"
    config_class = DLRTConfig
    config: DLRTConfig

    def __init__(self, config: DLRTConfig) -> None:
        super().__init__(config)
        self.rule: RankRule = tolerance(config.tolerance, config.absolute)
        self.truncations = 0
        self.last_spectra: dict[str, tuple[Tensor, int]] = {}
        """Per layer, the singular values of the core the last step truncated and the rank
        kept (a diagnostic: tests check the tolerance rule on it)."""
        self._names: dict[int, str] = {}
        self.one_pass_bug = True
        """Adaptive BUG: take the S-step's gradient from the first backward (exact; False
        runs the second forward/backward, the reference form the tests compare with)."""
        self.batch_layers = True
        """Parallel step: batch the small linear algebra of equal-shape layers (False: one
        layer at a time, the reference the tests and benchmarks compare with)."""

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
        named = find_low_rank_layers(model)
        layers = list(named.values())
        self._names = {id(layer): name for name, layer in named.items()}
        adapt = self.config.adaptive and self.step % self.config.truncate_every == 0
        if adapt:
            self.last_spectra = {}
        step = {
            "parallel": self._parallel_step,
            "bug": self._bug_step,
            "kls": self._kls_step,
            "retraction": self._retraction_step,
        }[self.config.integrator]
        loss = step(model, layers, optimizer, batch, loss_fn, adapt)
        if loss is None:  # a skipped non-finite batch (train.nonfinite = "skip")
            self.skipped_batches += 1
            zero = torch.zeros((), device=next(model.parameters()).device)
            return {"loss": zero, "loss_task": zero.clone()}
        self.step += 1
        self.truncations += int(adapt)
        self.after_step(model, optimizer)
        return self.loss_stats(loss, loss, {})

    def _parallel_step(
        self,
        model: nn.Module,
        layers: list[LowRankLayer],
        optimizer: torch.optim.Optimizer,
        batch: Any,
        loss_fn: LossFn,
        adapt: bool,
    ) -> Tensor | None:
        optimizer.zero_grad(set_to_none=True)
        with _kls_gradients(layers):
            loss = loss_fn(model, batch)
        if self.skip_nonfinite and not torch.isfinite(loss):
            return None  # train.nonfinite = "skip": leave the weights as they are
        loss.backward()  # ∇_K, ∇_S, ∇_L in the U, S, V slots; biases and dense layers as usual
        self.clip_gradients(model)
        bases = _zero_kl_slots(layers)
        optimizer.step()  # S̄₁ in the S slot, K₁ - K₀ and L₁ - L₀ in the U and V slots
        with torch.no_grad():
            steps = [
                _LayerStep(layer, U0, V0, layer.S.detach(), layer.U.detach(), layer.V.detach())
                for layer, (U0, _, V0) in zip(layers, bases, strict=True)
            ]
            for layer, U0, V0, S1, dK, dL in self._parallel_lean(steps, optimizer, adapt):
                (Nu, Ru), (Nv, Rv) = _new_directions(U0, dK), _new_directions(V0, dL)
                r = S1.shape[0]
                ku, kv = Nu.shape[1], Nv.shape[1]
                # K₀ ∈ span(U₀), so Ũᵀ K₁ = Ũᵀ (K₁ - K₀) = R_U, and L₁ᵀ Ṽ = R_Vᵀ.
                core = S1.new_zeros(r + ku, r + kv)
                core[:r, :r] = S1
                core[:r, r:] = Rv.T
                core[r:, :r] = Ru
                A, B = _Extension(r, ku), _Extension(r, kv)
                self._install(
                    layer,
                    optimizer,
                    torch.cat([U0, Nu], 1),
                    core,
                    torch.cat([V0, Nv], 1),
                    A,
                    B,
                    rank=None if adapt else r,
                    truncate=True,
                )
        return loss

    def _parallel_lean(
        self, steps: list[_LayerStep], optimizer: torch.optim.Optimizer, adapt: bool
    ) -> list[_LayerStep]:
        """The parallel step's basis work from small matrices, batched over the layers of
        equal shape: one call per group for each product, Cholesky factorization and core
        SVD, and one host synchronisation per group for each decision, instead of one per
        layer. Returns the layers it did not take (new directions not well separated from
        the old span, or a layer near full rank); the caller takes the explicit path.

        With ``c = U₀ᵀ dK``, the residual ``dK - U₀ c = Ũ R`` has Gram ``dKᵀdK - cᵀc``, so
        ``R`` (the core block Ũᵀ K₁) comes from a Cholesky factor, and the kept basis
        ``Û P = U₀ P₁ + Ũ P₂ = U₀ (P₁ - c R⁻¹ P₂) + dK (R⁻¹ P₂)`` needs two GEMMs; Ũ is never
        formed (see :func:`_lean_basis`)."""
        groups: dict[tuple[Any, ...], list[_LayerStep]] = {}
        left = []
        for item in steps:
            rows, r = min(item.U0.shape[0], item.V0.shape[0]), item.U0.shape[1]
            if 2 * r > rows:  # no room for r new directions
                left.append(item)
                continue
            key = (item.U0.shape, item.V0.shape, item.U0.dtype, item.U0.device)
            groups.setdefault(key if self.batch_layers else id(item), []).append(item)
        for group in groups.values():
            left += self._parallel_lean_group(group, optimizer, adapt)
        return left

    def _parallel_lean_group(
        self, group: list[_LayerStep], optimizer: torch.optim.Optimizer, adapt: bool
    ) -> list[_LayerStep]:
        U0, V0, S1, dK, dL = (
            _stack([getattr(g, f) for g in group]) for f in _LayerStep._fields[1:]
        )
        (cu, Ru, gu, ok_u), (cv, Rv, gv, ok_v) = _gram_residual(U0, dK), _gram_residual(V0, dL)
        ok = (ok_u & ok_v).tolist()
        left = [g for g, good in zip(group, ok, strict=True) if not good]
        if left:
            if len(left) == len(group):
                return left
            keep = torch.tensor([i for i, good in enumerate(ok) if good], device=U0.device)
            group = [g for g, good in zip(group, ok, strict=True) if good]
            U0, V0, S1, dK, dL, cu, Ru, gu, cv, Rv, gv = (
                t[keep] for t in (U0, V0, S1, dK, dL, cu, Ru, gu, cv, Rv, gv)
            )
        n, r = S1.shape[0], S1.shape[-1]
        core = S1.new_zeros(n, 2 * r, 2 * r)
        core[:, :r, :r] = S1
        core[:, :r, r:] = Rv.mT
        core[:, r:, :r] = Ru
        P, sigma, Qt = _svd(core)
        ranks = [r] * n
        if adapt:
            spectra = sigma.cpu()  # one transfer for the group's rank decisions
            for i, item in enumerate(group):
                full_rank = item.layer.full_rank
                lo, hi = self.rank_bounds(full_rank)
                ranks[i] = min(self.rule.select(spectra[i], lo, hi, full_rank=full_rank), 2 * r)
                name = self._names.get(id(item.layer), str(id(item.layer)))
                self.last_spectra[name] = (sigma[i], ranks[i])
        # The kept bases are orthonormal by construction; their rounding error is reset by
        # an explicit Cholesky-QR pass every REORTHONORMALIZE_EVERY steps (two more m×r×r
        # GEMMs per basis), and between those passes grows only by the GEMMs' rounding.
        exact = self.step % REORTHONORMALIZE_EVERY == 0
        for r1 in sorted(set(ranks)):
            members = [i for i, k in enumerate(ranks) if k == r1]
            pick: Any = (
                slice(None) if len(members) == n else torch.tensor(members, device=U0.device)
            )
            U1, Au, Xu = _lean_basis(
                U0[pick], dK[pick], cu[pick], Ru[pick], P[pick][..., :r1], gu[pick], exact
            )
            V1, Bv, Xv = _lean_basis(
                V0[pick], dL[pick], cv[pick], Rv[pick], Qt[pick][..., :r1, :].mT, gv[pick], exact
            )
            cores = (Xu * sigma[pick][:, None, :r1]) @ Xv.mT
            layers = [group[i].layer for i in members]
            moved = _moved_states(optimizer, layers, Au, Bv)
            for j, layer in enumerate(layers):
                self._put(layer, optimizer, U1[j], cores[j], V1[j], Au[j], Bv[j], True, moved)
        return left

    def _bug_step(
        self,
        model: nn.Module,
        layers: list[LowRankLayer],
        optimizer: torch.optim.Optimizer,
        batch: Any,
        loss_fn: LossFn,
        adapt: bool,
    ) -> Tensor | None:
        # Adaptive: the augmented point Û S̃₀ V̂ᵀ = [U₀|Ũ] diag(S₀, 0) [V₀|Ṽ]ᵀ is W₀ itself, so
        # the S-step's gradient Ûᵀ ∇W V̂ comes from this one backward: ∇_S, ∇_Lᵀ Ṽ, Ũᵀ ∇_K and
        # Ũᵀ ∇W Ṽ from the stashed inputs and output gradients (see _bug_one_pass).
        stashes: list[list[tuple[Any, ...]]] = [[] for _ in layers] if adapt else []
        for layer, stash in zip(layers, stashes, strict=False):
            layer.kls_stash = stash
        try:
            with _kls_gradients(layers):
                loss = loss_fn(model, batch)
            if self.skip_nonfinite and not torch.isfinite(loss):
                return None  # train.nonfinite = "skip": leave the weights as they are
            slots = [p for layer in layers for p in (layer.U, layer.V)]
            if adapt:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # ∇_K, ∇_S, ∇_L in the U, S, V slots; all other gradients
            else:
                grads = torch.autograd.grad(loss, slots)
                optimizer.zero_grad(set_to_none=True)
                for p, g in zip(slots, grads, strict=True):
                    p.grad = g
        finally:
            for layer in layers:
                layer.kls_stash = None
        if adapt and self.one_pass_bug and all(stashes):
            self._bug_one_pass(model, layers, optimizer, batch, loss_fn, stashes)
            return loss
        if adapt:  # a layer kind without a stash: the S-step takes its own pass
            slot_ids = {id(p) for p in slots}
            for p in model.parameters():
                if id(p) not in slot_ids:
                    p.grad = None
        bases = _zero_kl_slots(layers)
        # The slots carry K₁ - K₀ and L₁ - L₀ after the optimizer step.
        self._kl_step(model, layers, optimizer, batch, loss_fn, bases, adapt, slots_hold_k1=False)
        return loss

    def _bug_one_pass(
        self,
        model: nn.Module,
        layers: list[LowRankLayer],
        optimizer: torch.optim.Optimizer,
        batch: Any,
        loss_fn: LossFn,
        stashes: list[list[tuple[Any, ...]]],
    ) -> None:
        """The adaptive BUG step after its one backward: K- and L-steps, augmented bases, the
        Galerkin S-step on S̃ with the gradient assembled block by block, truncation. The
        same update as the two-pass form (whose second pass evaluates the same W₀), for the
        cost of two rank-r products per layer instead of a forward/backward at rank 2r.
        Falls back to a second pass when a layer's augmented basis does not keep its old one
        (near full rank)."""
        factors = {id(p) for layer in layers for p in (layer.U, layer.V, layer.S)}
        held = {
            p: p.grad for p in model.parameters() if p.grad is not None and id(p) not in factors
        }
        grad_s = [layer.S.grad for layer in layers]
        # copies: clipping below scales the K/L gradients in place, the S-step's are unclipped
        grad_k = [layer.U.grad.clone() for layer in layers]
        grad_l = [layer.V.grad.clone() for layer in layers]
        for p in (*held, *(layer.S for layer in layers)):
            p.grad = None
        self.clip_gradients(model)  # the K/L gradients alone, as in the two-pass form
        bases = _zero_kl_slots(layers)  # the slots then carry K₁ - K₀, L₁ - L₀
        cores = self._k_and_l_steps(layers, optimizer, bases, adapt=True, slots_hold_k1=False)
        if any(new is None for new in cores):
            # Some layer's augmented point is not W₀: take the S-step's own pass instead.
            self._s_step(model, layers, optimizer, batch, loss_fn, True)
            return
        with torch.no_grad():
            for layer, (Nu, Nv), gs, gk, gl, stash in zip(
                layers, cores, grad_s, grad_k, grad_l, stashes, strict=True
            ):
                layer.U.grad = layer.V.grad = None
                layer.S.grad = torch.cat(
                    [
                        torch.cat([gs, gl.T @ Nv], 1),
                        torch.cat([Nu.T @ gk, kls_cross_gradient(stash, Nu, Nv)], 1),
                    ],
                    0,
                )
            for p, g in held.items():
                p.grad = g
        self.clip_gradients(model)
        optimizer.step()  # the Galerkin S-step; biases and dense layers step here
        self._truncate(layers, optimizer)

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
        # The slots hold K₁, L₁ themselves after the step: their parts outside span(U₀),
        # span(V₀) are those of K₁ - K₀, L₁ - L₀ (projected twice, so no cancellation).
        self._kl_step(model, layers, optimizer, batch, loss_fn, start, adapt, slots_hold_k1=True)
        return loss

    def _kl_step(
        self,
        model: nn.Module,
        layers: list[LowRankLayer],
        optimizer: torch.optim.Optimizer,
        batch: Any,
        loss_fn: LossFn,
        bases: list[tuple[Tensor, Tensor, Tensor]],
        adapt: bool,
        slots_hold_k1: bool,
    ) -> None:
        """BUG and KLS from the K/L gradients in the U/V slots: one optimizer step, the
        augmented bases installed, then the Galerkin S-step at the augmented point."""
        self.clip_gradients(model)
        self._k_and_l_steps(layers, optimizer, bases, adapt, slots_hold_k1)
        self._s_step(model, layers, optimizer, batch, loss_fn, adapt)

    def _k_and_l_steps(
        self,
        layers: list[LowRankLayer],
        optimizer: torch.optim.Optimizer,
        bases: list[tuple[Tensor, Tensor, Tensor]],
        adapt: bool,
        slots_hold_k1: bool,
    ) -> list[tuple[Tensor, Tensor] | None]:
        """One optimizer step on the U and V slots (the only ones with gradients), then each
        layer's augmented bases installed; the new directions per layer (see
        :meth:`_augment_and_install`)."""
        # Only an augmented core has cross blocks to take the K/L moments (copies: the step
        # below updates them in place).
        moments = [_slot_moments(optimizer, layer) if adapt else None for layer in layers]
        optimizer.step()
        with torch.no_grad():
            return [
                self._augment_and_install(
                    layer,
                    optimizer,
                    U0,
                    S0,
                    V0,
                    layer.U.detach(),
                    layer.V.detach(),
                    adapt,
                    slots_hold_k1,
                    m,
                )
                for layer, (U0, S0, V0), m in zip(layers, bases, moments, strict=True)
            ]

    def _augment_and_install(
        self,
        layer: LowRankLayer,
        optimizer: torch.optim.Optimizer,
        U0: Tensor,
        S0: Tensor,
        V0: Tensor,
        K: Tensor,
        L: Tensor,
        adapt: bool,
        absolute: bool,
        kl_moments: dict[str, tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor] | None:
        """BUG/KLS basis update: install ``Û``, ``S̃₀``, ``V̂`` from the K- and L-steps (``K``,
        ``L``: K₁, L₁ when ``absolute``, else K₁ - K₀, L₁ - L₀). Returns the new directions
        ``(Ũ, Ṽ)`` when ``Û = [U₀ | Ũ]``, ``V̂ = [V₀ | Ṽ]`` (then ``Û S̃₀ V̂ᵀ = W₀``), else None."""
        r = S0.shape[0]
        new = None
        if adapt:
            Nu, Nv = _new_directions(U0, K)[0], _new_directions(V0, L)[0]
            ku, kv = Nu.shape[1], Nv.shape[1]
            Uh, Vh = torch.cat([U0, Nu], 1), torch.cat([V0, Nv], 1)
            A, B = _Extension(r, ku), _Extension(r, kv)
            new = (Nu, Nv) if ku == kv else None
            if ku != kv:
                # Near full rank one side has fewer new directions, and the core must stay
                # square for the S-step: that side's basis spans K₁ (or L₁) first, then as
                # much of the old basis as fits, as the fixed-rank step would.
                k = r + min(ku, kv)
                if ku > kv:
                    K1 = K if absolute else U0 @ S0 + K
                    Uh = torch.linalg.qr(torch.cat([K1, U0], 1))[0][:, :k]
                    A = U0.T @ Uh
                else:
                    L1 = L if absolute else V0 @ S0.T + L
                    Vh = torch.linalg.qr(torch.cat([L1, V0], 1))[0][:, :k]
                    B = V0.T @ Vh
            if isinstance(A, _Extension) and isinstance(B, _Extension):
                core = F.pad(S0, (0, B.new, 0, A.new))  # Ûᵀ U₀ S₀ V₀ᵀ V̂ = diag(S₀, 0)
            else:
                core = _as_matrix(A, S0).T @ S0 @ _as_matrix(B, S0)
        else:
            K1 = K if absolute else U0 @ S0 + K
            L1 = L if absolute else V0 @ S0.T + L
            Uh, Vh = _orth(K1), _orth(L1)
            A, B = U0.T @ Uh, V0.T @ Vh
            core = A.T @ S0 @ B
        self._install(layer, optimizer, Uh, core, Vh, A, B, rank=None, truncate=False)
        if new is not None and kl_moments:
            _cross_block_moments(optimizer, layer, r, *new, kl_moments)
        return new

    def _s_step(
        self,
        model: nn.Module,
        layers: list[LowRankLayer],
        optimizer: torch.optim.Optimizer,
        batch: Any,
        loss_fn: LossFn,
        adapt: bool,
    ) -> None:
        """Galerkin S-step at the (augmented) point; biases and dense layers step here too;
        then, when ``adapt``, truncation by the tolerance."""
        optimizer.zero_grad(set_to_none=True)
        factors = {id(p) for layer in layers for p in (layer.U, layer.V)}
        trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in factors]
        grads = torch.autograd.grad(loss_fn(model, batch), trainable, allow_unused=True)
        for p, g in zip(trainable, grads, strict=True):
            p.grad = g
        self.clip_gradients(model)
        optimizer.step()
        if adapt:
            self._truncate(layers, optimizer)

    @torch.no_grad()
    def _truncate(self, layers: list[LowRankLayer], optimizer: torch.optim.Optimizer) -> None:
        """Truncate every layer's core by the tolerance rule (after a Galerkin S-step)."""
        for layer in layers:
            U, S, V = layer.U.detach(), layer.S.detach(), layer.V.detach()
            e = torch.eye(layer.rank, dtype=S.dtype, device=S.device)
            self._install(layer, optimizer, U, S.clone(), V, e, e, None, truncate=True)

    def _install(
        self,
        layer: LowRankLayer,
        optimizer: torch.optim.Optimizer,
        Uh: Tensor,
        core: Tensor,
        Vh: Tensor,
        A: Tensor | _Extension,
        B: Tensor | _Extension,
        rank: int | None,
        truncate: bool,
    ) -> None:
        """Install ``W = Uh core Vhᵀ`` (orthonormal ``Uh``, ``Vh``; any core shape) and move the
        optimizer state. ``truncate``: SVD of the core, rank ``rank`` or, when ``None``, by
        the tolerance rule; then one Cholesky-QR pass on the kept bases, folded into the core.
        ``A = U_oldᵀ Uh``, ``B = V_oldᵀ Vh`` are the coordinates of the old bases in the new
        ones (moments of ∇_K, ∇_L, ∇_S at the old point are mapped by them)."""
        if truncate:
            P, sigma, Qt = _svd(core)
            if rank is None:
                lo, hi = self.rank_bounds(layer.full_rank)
                r = self.rule.select(sigma, lo, hi, full_rank=layer.full_rank)
                self.last_spectra[self._names.get(id(layer), str(id(layer)))] = (sigma, r)
            else:
                r = rank
            r = min(r, sigma.numel())
            Pu, Pv = P[:, :r], Qt[:r].T
            # Uh Pu is orthonormal only up to the rounding of Uh, which would accumulate from
            # step to step: one Cholesky-QR pass resets it (W unchanged: R goes to the core).
            (Uh, Ru), (Vh, Rv) = _qr(Uh @ Pu), _qr(Vh @ Pv)
            core = (Ru * sigma[:r]) @ Rv.T
            A = _as_matrix(A, core) @ torch.linalg.solve_triangular(Ru, Pu, upper=True, left=False)
            B = _as_matrix(B, core) @ torch.linalg.solve_triangular(Rv, Pv, upper=True, left=False)
        self._put(layer, optimizer, Uh, core, Vh, A, B)

    def _put(
        self,
        layer: LowRankLayer,
        optimizer: torch.optim.Optimizer,
        Uh: Tensor,
        core: Tensor,
        Vh: Tensor,
        A: Tensor,
        B: Tensor,
        owned: bool = False,
        moved: dict[tuple[nn.Parameter, str], Tensor] | None = None,
    ) -> None:
        """Install the factors and map the optimizer state by ``A = U_oldᵀ Uh``, ``B``.
        ``owned``: the factors are fresh contiguous tensors nothing else holds, which the
        parameters may take over instead of copying them. ``moved``: states already mapped
        (by :func:`_moved_states`, for a group of layers at once)."""
        if Uh.shape == layer.U.shape and Vh.shape == layer.V.shape:
            # Same shapes: update the parameters in place (no new Parameters, so a DDP
            # wrapper need not be rebuilt); their state is moved by the identity mapping.
            for name, value in (("U", Uh), ("S", core), ("V", Vh)):
                if owned:
                    getattr(layer, name).data = value
                else:
                    getattr(layer, name).copy_(value)
            mapping = {p: p for p in (layer.U, layer.S, layer.V)}
        else:
            mapping = layer.set_factors(Uh, core, Vh)
        maps = {"U": B, "V": A, "S": (A if isinstance(A, _Extension) else A.T, B)}
        transform = _state_map(layer, mapping, maps)
        if moved:
            computed, fallback = moved, transform

            def transform(key: str, value: Tensor, old: nn.Parameter, new: nn.Parameter) -> Any:
                hit = computed.get((old, key))
                return hit if hit is not None else fallback(key, value, old, new)

        swap_parameters(optimizer, mapping, transform)

    def _retraction_step(
        self,
        model: nn.Module,
        layers: list[LowRankLayer],
        optimizer: torch.optim.Optimizer,
        batch: Any,
        loss_fn: LossFn,
        adapt: bool,
    ) -> Tensor:
        decay = _decoupled_decay(optimizer)
        keep = adapt or any(decay.get(p, 0.0) for layer in layers for p in (layer.U, layer.V))
        old_bases = (
            [(lr.U.detach().clone(), lr.V.detach().clone()) for lr in layers] if keep else []
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
                # Decoupled decay shrank U, V and S, i.e. W three times over: undo it on the
                # bases, U₁ = (1 - ηλ) U₀ - η a  →  U₀ - η a, so it acts on W once (via S).
                for p, old in zip((layer.U, layer.V), old_bases[i] if keep else (), strict=False):
                    if decay.get(p, 0.0):
                        p.add_(old, alpha=decay[p])
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
        """Retraction: install the result given orthonormal ``Uh``, ``Vh`` with ``U₁ = Uh Cu``,
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

    # ------------------------------------------------------------------ reporting
    def passes_per_batch(self) -> int:
        """Forward/backward passes per batch (adaptive BUG: one, unless a layer kind keeps
        no stash or a layer is near full rank, when the S-step takes a second)."""
        if self.config.integrator == "bug" and self.config.adaptive and self.one_pass_bug:
            return 1
        return PASSES[self.config.integrator]

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

        Every integrator keeps the start point (U₀, S₀, V₀) beside the slots holding the K-
        and L-steps; parallel, bug and kls build augmented bases and a core of up to 2r
        (parallel's fast path forms only the kept bases, but its fallback forms Û, V̂);
        the fixed-rank parallel step augments too, the fixed-rank bug/kls/retraction steps
        do not.
        """
        m, n, r = layer.out_dim, layer.in_dim, layer.rank
        augments = self.config.adaptive or self.config.integrator == "parallel"
        k = min(2 * r, m, n) if augments else r
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
    """Thin SVD of the small core(s). LAPACK's divide-and-conquer can fail to converge on
    cores with clustered singular values in float32 (an error), and MKL's can return NaN
    singular vectors for cores with singular values near 1e-8 without one (seen on a batch
    of 64×64 cores: "SLASCL parameter 4"); either way, retry in float64 before giving up."""
    try:
        P, sigma, Qt = torch.linalg.svd(core, full_matrices=False)
        finite = torch.isfinite(P).all() & torch.isfinite(sigma).all() & torch.isfinite(Qt).all()
    except torch.linalg.LinAlgError:
        finite = False
    if finite:
        return P, sigma, Qt
    if not torch.isfinite(core).all():
        # Not bad input: the run diverged. The trainer turns this into its one
        # divergence path (summary marked diverged, exit 1).
        raise FloatingPointError("a DLRT core holds NaN or inf")
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
    """One state tensor (or a stack of them, one per layer) moved by its slot's map."""
    if slot == "S":
        left, right = maps["S"]
        if isinstance(left, _Extension) and isinstance(right, _Extension):
            # [I 0]ᵀ m [I 0]: the old block in place; new entries 0 (first moments) or the
            # mean (second moments, as below).
            out = value.new_zeros(*value.shape[:-2], left.old + left.new, right.old + right.new)
            if square:
                out += value.mean((-2, -1), keepdim=True)
            out[..., : left.old, : right.old] = value
            return out
        left = left.matrix(value).mT if isinstance(left, _Extension) else left
        right = right.matrix(value) if isinstance(right, _Extension) else right
        if not square:
            return left @ value @ right
        left, right = left * left, right * right
        moved = left @ value @ right
        cover = left.sum(-1).clamp(max=1)[..., :, None] * right.sum(-2).clamp(max=1)[..., None, :]
        return moved + (1 - cover) * value.mean((-2, -1), keepdim=True)
    m = maps[slot]
    if isinstance(m, _Extension):  # value @ [I 0]: no product, the new columns appended
        fill = value.mean(-1, keepdim=True) if square else value.new_zeros(*value.shape[:-1], 1)
        return torch.cat([value, fill.expand(*value.shape[:-1], m.new)], -1)
    if not square:
        return value @ m
    m = m * m
    # A second moment of zero would make Adam's first steps in a new direction ±3η whatever
    # the gradient (round-off included), enough to keep noise directions above the
    # truncation threshold; a new direction instead inherits its row's mean second moment,
    # so its steps are scaled by the typical gradient size. ``cover`` is 1 for a direction
    # in the old span and 0 for a new one.
    cover = m.sum(-2).clamp(max=1)[..., None, :]
    return value @ m + (1 - cover) * value.mean(-1, keepdim=True)


def _moved_states(
    optimizer: torch.optim.Optimizer, layers: list[LowRankLayer], A: Tensor, B: Tensor
) -> dict[tuple[nn.Parameter, str], Tensor]:
    """The moments of a group of equal-shape layers moved by their stacked maps ``A``, ``B``
    (as :meth:`DLRT._put` would move them one layer at a time), keyed by (parameter, key);
    states that are missing or of another shape are left to the per-layer transform."""
    maps = {"U": B, "V": A, "S": (A.mT, B)}
    out = {}
    for slot in ("U", "S", "V"):
        params = [getattr(layer, slot) for layer in layers]
        states = [optimizer.state.get(p) or {} for p in params]
        for key in (*_FIRST_MOMENTS, *_SECOND_MOMENTS):
            values = [state.get(key) for state in states]
            pairs = zip(values, params, strict=True)
            if all(isinstance(v, Tensor) and v.shape == p.shape for v, p in pairs):
                moved = _apply_map(maps, slot, _stack(values), key in _SECOND_MOMENTS)
                out.update({(p, key): v for p, v in zip(params, moved, strict=True)})
    return out


class _Extension(NamedTuple):
    """The change of basis ``[I | 0]`` (old × (old + new)) from a basis to the same basis
    with ``new`` directions appended: the state maps pad instead of multiplying."""

    old: int
    new: int

    def matrix(self, like: Tensor) -> Tensor:
        return _eye(self.old, self.old + self.new, like)


def _as_matrix(x: Tensor | _Extension, like: Tensor) -> Tensor:
    return x.matrix(like) if isinstance(x, _Extension) else x


def _slot_moments(
    optimizer: torch.optim.Optimizer, layer: LowRankLayer
) -> dict[str, tuple[Tensor, Tensor]]:
    """The K- and L-slot moments before the K/L step (copies): the history the S-step's
    cross blocks inherit, without the current gradient, which the S-step adds itself."""
    state_u, state_v = optimizer.state.get(layer.U, {}), optimizer.state.get(layer.V, {})
    out = {}
    for key in (*_FIRST_MOMENTS, *_SECOND_MOMENTS):
        m_k, m_l = state_u.get(key), state_v.get(key)
        if isinstance(m_k, Tensor) and isinstance(m_l, Tensor) and m_k.dim() == 2:
            out[key] = (m_k.clone(), m_l.clone())
    return out


@torch.no_grad()
def _cross_block_moments(
    optimizer: torch.optim.Optimizer,
    layer: LowRankLayer,
    r: int,
    Nu: Tensor,
    Nv: Tensor,
    kl_moments: dict[str, tuple[Tensor, Tensor]],
) -> None:
    """Moments of the augmented core's cross blocks from those of the K- and L-steps.

    The S-step's gradient blocks Ũᵀ ∇W V₀ = Ũᵀ ∇_K and U₀ᵀ ∇W Ṽ = (Ṽᵀ ∇_L)ᵀ are linear maps
    of the K and L gradients, so their first moments are Ũᵀ m_K and (Ṽᵀ m_L)ᵀ exactly, with
    m_K, m_L the slots' moments before this step's K/L update (second moments: the same with
    Ũ², Ṽ² elementwise, as for every other map here). Starting them at zero instead, as a
    new direction would, drops the momentum of the whole rotation part of the step (SGD
    momentum 0.9 or Adam: ~10× smaller steps there), which left BUG and KLS training
    markedly slower than the parallel integrator, whose K- and L-steps keep it.
    """
    state_s = optimizer.state.get(layer.S)
    if not state_s:
        return
    k = Nu.shape[1]
    for key, (m_k, m_l) in kl_moments.items():
        moment = state_s.get(key)
        if not isinstance(moment, Tensor) or moment.shape != (r + k, r + k):
            continue
        left, right = (Nu * Nu, Nv * Nv) if key in _SECOND_MOMENTS else (Nu, Nv)
        moment[r:, :r] = left.T @ m_k
        moment[:r, r:] = (right.T @ m_l).T


def _full_rank(module: nn.Module) -> int:
    return min(matrix_shape(module))


def _gram_residual(basis: Tensor, step: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``c = basisᵀ step``, the R factor of ``step - basis c`` and ``stepᵀ step``, from Gram
    matrices alone (any leading batch dimensions), and whether that is accurate: ``ok`` is
    false where the residual is small or ill-conditioned next to the step (the Gram
    difference would cancel). The caller makes sure there is room for r new directions."""
    c = basis.mT @ step
    gram = step.mT @ step
    # Cholesky reads only the lower triangle, so the Gram difference needs no symmetrizing.
    chol, info = torch.linalg.cholesky_ex(gram - c.mT @ c)
    # The Gram difference has absolute error ~eps·‖step‖²: demand every residual direction
    # be at least 1/10 of the step's largest column, so its relative error stays ~100·eps.
    smallest = chol.diagonal(dim1=-2, dim2=-1).amin(-1).square()
    ok = (info == 0) & (smallest >= LEAN_SEPARATION * gram.diagonal(dim1=-2, dim2=-1).amax(-1))
    return c, chol.mT, gram, ok


def _lean_basis(
    basis: Tensor, step: Tensor, c: Tensor, R: Tensor, P: Tensor, gram: Tensor, exact: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``Q``, ``A = basisᵀ Q`` and ``X`` with ``Q X = [basis | Ũ] P`` orthonormal, where
    ``Ũ R = step - basis c`` (see :meth:`DLRT._parallel_lean`); a batch of layers (3-D).

    ``Q₀ = basis X₀ + step Y`` equals ``[basis | Ũ] P`` in exact arithmetic. Its Gram matrix
    follows from r×r matrices (``basisᵀ basis = I``, ``basisᵀ step = c``, the residual's
    Gram ``RᵀR``), so the Cholesky factor ``X`` of that Gram is folded into ``X₀``, ``Y``
    before the one tall product: this corrects the rounding of the small factors at no
    m×r×r cost. With ``exact``, one Cholesky-QR pass on the tall result instead also removes
    the drift of ``basis`` itself (two more GEMMs)."""
    r = basis.shape[-1]
    solve = torch.linalg.solve_triangular
    P1 = P[..., :r, :]
    Y = solve(R, P[..., r:, :], upper=True)  # R⁻¹ P₂
    X0 = P1 - c @ Y
    if not exact:
        # Q₀ = basis (X₀ + c Y) + Ũ (R Y) with Ũ ⟂ basis: Gram TᵀT + (RY)ᵀ(RY), T = X₀ + c Y
        # as rounded (≈ P₁), R Y ≈ P₂.
        T, RY = X0 + c @ Y, R @ Y
        chol, info = torch.linalg.cholesky_ex(T.mT @ T + RY.mT @ RY)
        if not bool(info.any()):
            X = chol.mT
            Q = torch.baddbmm(
                basis @ solve(X, X0, upper=True, left=False),
                step,
                solve(X, Y, upper=True, left=False),
            )
            return Q, solve(X, P1, upper=True, left=False), X
    pairs = [_qr(x) for x in torch.baddbmm(basis @ X0, step, Y)]
    Q, X = torch.stack([q for q, _ in pairs]), torch.stack([x for _, x in pairs])
    # basisᵀ Q = (X₀ + c Y) X⁻¹ = P₁ X⁻¹ (basis orthonormal up to its drift)
    return Q, solve(X, P1, upper=True, left=False), X


class _LayerStep(NamedTuple):
    """One layer's parallel step: old bases, stepped core, and the K/L steps ``K₁ - K₀``,
    ``L₁ - L₀``."""

    layer: LowRankLayer
    U0: Tensor
    V0: Tensor
    S1: Tensor
    dK: Tensor
    dL: Tensor


def _stack(tensors: list[Tensor]) -> Tensor:
    """A batch of equal-shape tensors (a view, no copy, for one)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


@contextmanager
def _kls_gradients(layers: list[LowRankLayer]) -> Iterator[None]:
    """Forwards inside build graphs whose backward gives ∇_K, ∇_S, ∇_L (see the docstring)."""
    for layer in layers:
        layer.kls_gradients = True
    try:
        yield
    finally:
        for layer in layers:
            layer.kls_gradients = False


@torch.no_grad()
def _zero_kl_slots(layers: list[LowRankLayer]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Keep ``(U₀, S₀, V₀)`` and zero the U and V slots, which then hold K - K₀ and L - L₀:
    the optimizer's K- and L-steps are all the integrators need of K₁, L₁ (only their parts
    outside span(U₀), span(V₀) enter), and a zero slot keeps weight decay from acting on W
    through K and L besides S."""
    bases = []
    for layer in layers:
        # The old factors keep their storage; the slots get fresh zeros (no m×r copies).
        U0, V0 = layer.U.data, layer.V.data
        bases.append((U0, layer.S.detach().clone(), V0))
        layer.U.data, layer.V.data = torch.zeros_like(U0), torch.zeros_like(V0)
    return bases


def _decoupled_decay(optimizer: torch.optim.Optimizer) -> dict[Tensor, float]:
    """``lr · weight_decay`` of every parameter whose group decays decoupled (AdamW)."""
    out: dict[Tensor, float] = {}
    for group in optimizer.param_groups:
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get(
            "decoupled_weight_decay", False
        )
        if decoupled and group.get("weight_decay", 0.0):
            for p in group["params"]:
                out[p] = float(group["lr"]) * float(group["weight_decay"])
    return out


def _eye(rows: int, cols: int, like: Tensor) -> Tensor:
    return torch.eye(rows, cols, dtype=like.dtype, device=like.device)


def _new_directions(basis: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """``N``, ``R`` with ``(I - basis basisᵀ) step = N R``: ``N`` orthonormal, orthogonal to
    ``basis``, with min(r, rows - r) columns (none at full rank).

    When the step is well separated from ``basis`` (see :func:`_gram_residual`), ``R`` comes
    from Gram matrices and one projection. Otherwise the residual is projected twice ("twice
    is enough" for orthogonality to ``basis`` in floating point), then factored by two
    Cholesky-QR passes: only m×r×r GEMMs. A
    rank-deficient step (e.g. from a batch of one sample) makes the Gram matrix singular; then
    Householder QR of ``[basis | residual]`` completes the basis with arbitrary orthonormal
    directions, whose rows of R are ≈ 0 (and which truncation drops)."""
    rows, r = basis.shape
    k = min(r, rows - r)
    if k <= 0:
        return basis.new_zeros(rows, 0), basis.new_zeros(0, step.shape[1])
    if k == step.shape[1]:
        # Well separated from the old span (checked on the Gram matrices): one projection
        # suffices, and N = (step - basis c) R⁻¹ costs four m×r×r products instead of eight.
        c, R, _, ok = _gram_residual(basis, step)
        if bool(ok):
            R_inv = torch.linalg.solve_triangular(R, _eye(k, k, R), upper=True)
            return torch.addmm(step @ R_inv, basis, c @ R_inv, alpha=-1), R
    residual = step - basis @ (basis.T @ step)
    residual = residual - basis @ (basis.T @ residual)
    if k == step.shape[1]:
        out = _cholesky_qr(residual, passes=2)
        if out is not None and _well_conditioned(out[1]):
            return out
    q, _ = torch.linalg.qr(torch.cat([basis, residual], 1))
    new = q[:, r : r + k]
    # Householder's first r columns are ±basis up to rounding; project once more so the new
    # directions are orthogonal to basis itself, not to its rounded copy.
    new = new - basis @ (basis.T @ new)
    new = torch.linalg.qr(new)[0]
    return new, new.T @ residual


def _well_conditioned(r: Tensor) -> bool:
    """Whether Cholesky QR with this R reached working precision: its loss of orthogonality
    grows like κ²·eps, so accept κ (estimated by the diagonal of R) below eps^(-1/4)."""
    diag = torch.diagonal(r).abs()
    if diag.numel() == 0:
        return True
    eps = torch.finfo(r.dtype).eps
    return bool(diag.min() > diag.max() * eps**0.25)


def _orth(x: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``x`` (Householder when Cholesky QR would lose
    accuracy, e.g. K₁ = U₀S₀ with an ill-conditioned S₀)."""
    if x.shape[1] <= x.shape[0]:
        out = _cholesky_qr(x, passes=2)
        if out is not None and _well_conditioned(out[1]):
            return out[0]
    return torch.linalg.qr(x)[0][:, : min(x.shape)]
