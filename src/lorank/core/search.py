r"""Loss-bounded rank selection and the Theorem-1 output bound (seed 003).

**The search.** Every layer :math:`W^l = U^l \Sigma^l V^{l\top}` is truncated with the rule
``delta(δ)``: keep the :math:`\sigma^l_i` with :math:`\sigma^l_i/\sigma^l_1 \ge \delta`. A larger
δ keeps fewer singular values. Given a loss tolerance ε and a precision Δδ, a binary search on
δ ∈ [0, 1] finds the largest δ (to within Δδ) whose truncated model changes the task loss on a
fixed subset of training data by less than ε:

.. code-block:: text

    L0 <- loss(model)                     # before truncation
    lo, hi <- 0, 1                        # δ = 0 keeps everything: |Δloss| = 0 < ε
    if |loss(truncate(model, 1)) - L0| < ε: return 1
    while hi - lo > Δδ:
        mid <- (lo + hi) / 2
        if |loss(truncate(model, mid)) - L0| < ε: lo <- mid  else: hi <- mid
    return lo                             # always a δ that was checked to satisfy the bound

(Seed 003's Algorithm 1 prints the midpoint as ``(l/u)/2``; the midpoint ``(l+u)/2`` is meant.)
The returned δ is always one whose loss change was measured to be below ε, so the guarantee
holds on the subset by construction. Feasibility is assumed monotone in δ, as in the paper.

Each layer's SVD is computed **once**, before the search; a trial truncation writes the
rank-k factors into the existing parameters in place (a dense weight becomes
:math:`U_k\Sigma_kV_k^\top`; a low-rank layer keeps its shape with the discarded singular values
set to zero, which is the same function) and the original values are restored afterwards, so
the model, its parameter identities and any optimizer holding them are untouched. Trials that
give the same ranks reuse the measured loss.

**Theorem 1.** For a feed-forward net :math:`X^l = a^l(W^l X^{l-1})` with :math:`\rho_l`-Lipschitz
activations, :math:`a^l(0) = 0`, truncating layer l to rank :math:`k_l` changes the output by at
most

.. math:: \|X^L - X^L_k\|_2 \le \Big(\prod_l \rho_l \sigma^l_1\Big)
          \Big(\sum_l \sigma^l_{k_l+1} / \sigma^l_1\Big) \|X^0\|_2 .

:func:`theorem1_bound` reports this for chains of linear layers and activations (lorank's
``mlp``). It is a diagnostic: the theorem assumes bias-free layers, so with biases it is not
a guaranteed bound, and it is usually loose by orders of magnitude.

Long because it holds the layer spectra, the loss-bounded searches and the Theorem-1 bound,
which share the truncation trials.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lorank.core.adapters import adapter_for, dense_matrix, set_dense_matrix
from lorank.core.convert import LayerSelection, eligible_layers, low_rank_layers
from lorank.core.layers import LowRankLayer
from lorank.core.rank import RankRule, delta
from lorank.errors import LorankError

LossFn = Callable[[nn.Module, Any], Tensor]

__all__ = [
    "LayerSpectrum",
    "SearchResult",
    "dense_weight_matrix",
    "layer_spectra",
    "loss_bounded_search",
    "mean_loss",
    "rule_ranks",
    "theorem1_bound",
    "truncated",
]


@dataclass
class LayerSpectrum:
    """One layer's thin SVD ``W = u diag(sigma) vᵀ`` (u: m×p, v: n×p), computed once.

    ``max_rank`` is the largest rank worth truncating to: a dense layer truncated to a rank
    that saves no parameters is left unchanged (dense), which the search mirrors.
    """

    name: str
    module: nn.Module
    u: Tensor
    sigma: Tensor
    v: Tensor
    max_rank: int

    @property
    def full_rank(self) -> int:
        return self.sigma.numel()

    def effective_rank(self, rank: int) -> int:
        """``rank``, or the full rank when truncating to ``rank`` would not save anything."""
        return rank if rank <= self.max_rank else self.full_rank


def dense_weight_matrix(module: nn.Module) -> Tensor:
    """The m×n matrix view of a dense layer (:func:`lorank.core.adapters.dense_matrix`)."""
    return dense_matrix(module)


def default_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every low-rank layer and every dense layer :func:`~lorank.core.convert.plan` finds
    eligible by default, output layer included (tied, grouped and unsupported layers are not),
    in module order."""
    dense = dict(eligible_layers(model, LayerSelection(keep_last_dense=False)))
    low_rank = low_rank_layers(model)
    return {n: m for n, m in model.named_modules() if n in dense or n in low_rank}


@torch.no_grad()
def thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, sigma, v)`` with ``a = u diag(sigma) vᵀ`` (thin), in ``a``'s dtype.

    A wide matrix is decomposed through its transpose: LAPACK's divide and conquer is several
    times slower on an m×n matrix with m < n than on its n×m transpose (measured 3-4× for
    512×2048 on CPU), and the factors are the same up to signs.
    """
    if a.shape[0] < a.shape[1]:
        v, sigma, uh = torch.linalg.svd(a.T, full_matrices=False)
        return uh.T, sigma, v
    u, sigma, vh = torch.linalg.svd(a, full_matrices=False)
    return u, sigma, vh.T


def savings_rank(m: int, n: int) -> int:
    """The largest r with r(m + n) < mn: above it a factorization of an m×n matrix costs more
    than the matrix."""
    return (m * n - 1) // (m + n)


def layer_spectra(
    model: nn.Module | None,
    layers: dict[str, nn.Module] | None = None,
    skip_if_no_savings: bool = True,
) -> list[LayerSpectrum]:
    """The SVD of each layer (default :func:`default_layers` of ``model``), in float32/64 of
    the layer.

    Low-rank layers use their exact factored SVD (never forming W); dense layers the SVD of
    their weight matrix (in float64, returned in the weight's dtype).
    """
    if layers is None:
        assert model is not None
        layers = default_layers(model)
    out = []
    for name, module in layers.items():
        if isinstance(module, LowRankLayer):
            u, sigma, v = module.svd()
            max_rank = module.rank
        else:
            weight = dense_weight_matrix(module)
            u, sigma, v = (t.to(weight) for t in thin_svd(weight.double()))
            m, n = weight.shape
            max_rank = savings_rank(m, n) if skip_if_no_savings else sigma.numel()
        out.append(LayerSpectrum(name, module, u, sigma, v, max_rank))
    return out


def rule_ranks(spectra: Sequence[LayerSpectrum], rule: RankRule, r_min: int = 1) -> dict[str, int]:
    """``{layer: rank}`` from ``rule`` on each layer's singular values (no-savings → full)."""
    ranks = {}
    for spec in spectra:
        k = rule.select(spec.sigma, r_min, full_rank=spec.full_rank)
        ranks[spec.name] = spec.effective_rank(k)
    return ranks


@contextmanager
def truncated(spectra: Sequence[LayerSpectrum], ranks: dict[str, int]) -> Iterator[None]:
    """Temporarily truncate each layer to ``ranks[name]`` in place; restore on exit.

    Shapes and parameter identities never change, so this is safe while an optimizer holds
    the parameters.
    """
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for spec in spectra:
                k = ranks.get(spec.name, spec.full_rank)
                if k >= spec.full_rank:
                    continue
                for p in spec.module.parameters(recurse=False):
                    saved.append((p, p.detach().clone()))
                _write_truncation(spec, k)
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def _write_truncation(spec: LayerSpectrum, k: int) -> None:
    kept = spec.sigma.clone()
    kept[k:] = 0
    module = spec.module
    if isinstance(module, LowRankLayer):
        # The layer's own SVD has exactly `rank` columns, so it fits the existing shapes.
        u_new, s_new, v_new = module._factors_from_svd(spec.u, kept, spec.v)
        module.U.copy_(u_new)
        if s_new is not None:
            module.S.copy_(s_new)
        if module.V is not module.U:  # a tied (symmetric) layer has one factor
            module.V.copy_(v_new)
    else:
        set_dense_matrix(module, (spec.u[:, :k] * kept[:k]) @ spec.v[:, :k].T)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn) -> float:
    """Sample-weighted mean of ``loss_fn`` over ``batches``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            n = len(batch[0]) if isinstance(batch, tuple | list) else 1
            total += float(loss_fn(model, batch)) * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise LorankError(
            "the loss-bounded search got no calibration batches; use at least one training sample"
        )
    return total / count


@dataclass
class SearchResult:
    """What a loss-bounded search found: the searched value (``kind`` says which: the
    truncation δ of :func:`loss_bounded_search` or the global budget of
    :func:`lorank.compress.allocation.budget_search`), the ranks there, the loss on the
    search batches before and after, and every trial made."""

    kind: str
    value: float
    ranks: dict[str, int]
    loss_before: float
    loss_after: float
    epsilon: float
    precision: float
    trials: list[dict[str, float]] = field(default_factory=list)
    allocation: str | None = None

    @property
    def delta(self) -> float:
        return self.value

    @property
    def budget(self) -> float:
        return self.value

    @property
    def loss_change(self) -> float:
        return abs(self.loss_after - self.loss_before)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, self.kind: self.value}
        if self.allocation is not None:
            out["allocation"] = self.allocation
        return out | {
            "ranks": self.ranks,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "loss_change": self.loss_change,
            "epsilon": self.epsilon,
            "precision": self.precision,
            "trials": self.trials,
        }


class TruncationLosses:
    """The mean loss on fixed ``batches`` with the layers of ``spectra`` truncated to given
    ranks: measured once per distinct set of ranks, the model restored after each trial."""

    def __init__(
        self,
        model: nn.Module,
        spectra: Sequence[LayerSpectrum],
        batches: Sequence[Any],
        loss_fn: LossFn,
    ) -> None:
        self.model, self.spectra, self.batches, self.loss_fn = model, spectra, batches, loss_fn
        self.before = mean_loss(model, batches, loss_fn)
        self._measured: dict[tuple[int, ...], float] = {}

    def __call__(self, ranks: dict[str, int]) -> float:
        key = tuple(ranks[s.name] for s in self.spectra)
        if key not in self._measured:
            with truncated(self.spectra, ranks):
                self._measured[key] = mean_loss(self.model, self.batches, self.loss_fn)
        return self._measured[key]


def bisect(feasible: Callable[[float], bool], precision: float, *, feasible_low: bool) -> float:
    """The boundary in [0, 1] of a monotone ``feasible`` to within ``precision``: the largest
    feasible value when small values are the feasible ones (``feasible_low``), else the
    smallest. The end assumed feasible (0 or 1) is returned when nothing else is."""
    lo, hi = 0.0, 1.0
    while hi - lo > precision:
        mid = 0.5 * (lo + hi)
        if feasible(mid) == feasible_low:
            lo = mid
        else:
            hi = mid
    return lo if feasible_low else hi


def check_search_options(epsilon: float, precision: float) -> None:
    if not epsilon > 0:
        raise LorankError(f"loss tolerance {epsilon!r} must be > 0, e.g. 0.01")
    if not 0 < precision < 1:
        raise LorankError(f"search precision {precision!r} must be in (0, 1), e.g. 0.01")


def loss_bounded_search(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: LossFn,
    epsilon: float,
    precision: float = 0.01,
    spectra: Sequence[LayerSpectrum] | None = None,
    r_min: int = 1,
) -> SearchResult:
    """Binary-search the largest δ whose ``delta(δ)`` truncation keeps |Δloss| < ε.

    Args:
        model: the model; it is left exactly as it was (truncations are trials only).
        batches: a fixed list of training batches (e.g. ``data.train_subset_batches(n)``).
        loss_fn: ``loss_fn(model, batch) -> mean loss`` (the trainer's task loss).
        epsilon: loss tolerance ε > 0.
        precision: stop when the bracket on δ is narrower than Δδ.
        spectra: precomputed :func:`layer_spectra` (default: every eligible layer).
        r_min: smallest rank any layer is truncated to.

    Returns:
        The δ found, the per-layer ranks (a layer's full rank means "unchanged"), and the
        loss on ``batches`` before and after truncation, with every trial made.
    """
    check_search_options(epsilon, precision)
    batches = list(batches)
    spectra = layer_spectra(model) if spectra is None else list(spectra)
    if not spectra:
        raise LorankError("the model has no Linear/Conv2d or low-rank layer to truncate")
    losses = TruncationLosses(model, spectra, batches, loss_fn)
    trials: list[dict[str, float]] = []

    def ranks_at(d: float) -> dict[str, int]:
        return rule_ranks(spectra, delta(d), r_min)

    def feasible(d: float) -> bool:
        loss = losses(ranks_at(d))
        ok = abs(loss - losses.before) < epsilon
        trials.append({"delta": d, "loss": loss, "feasible": float(ok)})
        return ok

    found = 1.0 if feasible(1.0) else bisect(feasible, precision, feasible_low=True)
    ranks = ranks_at(found)
    loss_after = losses(ranks) if found > 0 else losses.before
    return SearchResult(
        "delta", found, ranks, losses.before, loss_after, epsilon, precision, trials
    )


# ---------------------------------------------------------------------- Theorem 1

#: Lipschitz constants of activations (GELU's derivative peaks at about 1.1289).
_LIPSCHITZ: dict[type[nn.Module], float] = {
    nn.ReLU: 1.0,
    nn.Tanh: 1.0,
    nn.GELU: 1.1290,
    nn.Sigmoid: 0.25,
    nn.Identity: 1.0,
    nn.Dropout: 1.0,
    nn.Flatten: 1.0,
}


def feedforward_chain(model: nn.Module) -> list[tuple[str, nn.Module, float]] | None:
    """``[(name, linear layer, ρ of the activations after it)]`` if ``model`` is a plain chain
    of linear layers and known activations registered in execution order, else ``None``."""
    chain: list[list[Any]] = []
    for name, module in model.named_modules():
        if any(True for _ in module.children()) and not isinstance(module, LowRankLayer):
            continue  # containers
        if _is_linear(module):
            chain.append([name, module, 1.0])
            continue
        if isinstance(module, nn.LeakyReLU):
            rho = max(1.0, abs(module.negative_slope))
        elif type(module) in _LIPSCHITZ:
            rho = _LIPSCHITZ[type(module)]
        else:
            return None
        if chain:
            chain[-1][2] *= rho
    return [(n, m, r) for n, m, r in chain] or None


def _is_linear(module: nn.Module) -> bool:
    adapter = adapter_for(module)
    return adapter is not None and adapter.acts_on_features


def theorem1_bound(
    model: nn.Module,
    ranks: dict[str, int],
    input_norm: float,
    spectra: Sequence[LayerSpectrum] | None = None,
) -> dict[str, Any] | None:
    r"""Seed 003's Theorem-1 bound for truncating an MLP to ``ranks`` (None if not an MLP).

    Layers missing from ``ranks`` keep full rank. ``spectra`` (from the untruncated model)
    avoids recomputing SVDs. Returns the bound with its two factors and ``input_norm``.
    """
    chain = feedforward_chain(model)
    if chain is None:
        return None
    known = {s.name: s for s in spectra or []}
    missing = {n: m for n, m, _ in chain if n not in known}
    known.update({s.name: s for s in layer_spectra(model, missing, skip_if_no_savings=False)})
    lipschitz, tail = 1.0, 0.0
    for name, _, rho in chain:
        sigma = known[name].sigma.double()
        s1 = float(sigma[0])
        k = ranks.get(name, sigma.numel())
        lipschitz *= rho * s1
        if k < sigma.numel() and s1 > 0:
            tail += float(sigma[k]) / s1
    return {
        "bound": lipschitz * tail * input_norm,
        "lipschitz_product": lipschitz,
        "relative_tail_sum": tail,
        "input_norm": input_norm,
        "assumes": "bias-free layers, activations with a(0) = 0",
    }


@torch.no_grad()
def max_input_norm(batches: Iterable[Any]) -> float:
    """max_i ‖x_i‖₂ over the inputs of ``batches`` (B in seed 003's Theorem 2)."""
    return max(float(x.flatten(1).double().norm(dim=1).max()) for x, *_ in batches)


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, batches: Iterable[Any]) -> float:
    """max_i ‖a(x_i) − b(x_i)‖₂ over the inputs of ``batches`` (both in eval mode)."""
    modes = a.training, b.training
    a.eval()
    b.eval()
    try:
        return max(float((a(x) - b(x)).flatten(1).double().norm(dim=1).max()) for x, *_ in batches)
    finally:
        a.train(modes[0])
        b.train(modes[1])
