r"""Closed-form building blocks of the gradient-free methods (``pil``, ``bipil``).

Everything is computed from running float64 sums over batches, so the training set is never
held as one matrix and no N×N matrix ever exists. For features :math:`H` (N×d) and targets
:math:`Y` (N×t), :class:`Gram` keeps :math:`N`, :math:`\sum h`, :math:`\sum y`,
:math:`H^\top H` and :math:`H^\top Y`; from them

* :func:`ridge` solves :math:`\min_{W,b} \tfrac1N\|HW + \mathbf 1 b^\top - Y\|_F^2
  + \lambda\|W\|_F^2` (the intercept is not penalised) as
  :math:`W = (C + \lambda I)^{+} C_{hy}`, :math:`b = \bar y - W^\top \bar h`, with
  :math:`C = \tfrac1N H^\top H - \bar h\bar h^\top` the feature covariance and
  :math:`C_{hy}` the cross-covariance. :math:`\lambda` is relative to features of unit
  variance, so it does not depend on N. With :math:`\lambda = 0` the pseudoinverse gives the
  minimum-norm least-squares solution, the one ``torch.linalg.lstsq`` (gelsd) returns.
* :func:`principal_projection` is PIL's hidden layer: for the centred input
  :math:`H_c = U\Sigma V^\top`, the truncated pseudoinverse :math:`H_c^+ \approx
  V_k\Sigma_k^{-1}U_k^\top` maps the data onto :math:`H_c V_k \Sigma_k^{-1} = U_k`, the
  coordinates of the truncated projector :math:`H_c H_c^+ \approx U_k U_k^\top`. The layer's
  weights are :math:`\sqrt N\,V_k\Sigma_k^{-1}` (so every unit has unit variance on the
  training set) and its bias centres the input. :math:`V` and :math:`\Sigma^2/N` come from
  the eigendecomposition of :math:`C`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorank.core.rank import RankRule

#: Eigenvalues below this fraction of the largest are treated as zero by the pseudoinverse.
PINV_RTOL = 1e-12


class Gram:
    """Running float64 sums of features ``h`` (B×d) and, optionally, targets ``y`` (B×t)."""

    def __init__(self, d: int, t: int = 0) -> None:
        self.n = 0
        self.hh = torch.zeros(d, d, dtype=torch.float64)
        self.h_sum = torch.zeros(d, dtype=torch.float64)
        self.hy = torch.zeros(d, t, dtype=torch.float64)
        self.y_sum = torch.zeros(t, dtype=torch.float64)

    def update(self, h: Tensor, y: Tensor | None = None) -> None:
        h = h.detach().to("cpu", torch.float64)
        self.n += h.shape[0]
        self.hh.addmm_(h.T, h)
        self.h_sum += h.sum(0)
        if y is not None:
            y = y.detach().to("cpu", torch.float64)
            self.hy.addmm_(h.T, y)
            self.y_sum += y.sum(0)

    @property
    def mean(self) -> Tensor:
        return self.h_sum / max(self.n, 1)

    def covariance(self) -> Tensor:
        mu = self.mean
        c = self.hh / max(self.n, 1) - torch.outer(mu, mu)
        return (c + c.T) / 2  # exact symmetry for eigh

    def cross_covariance(self) -> Tensor:
        return self.hy / max(self.n, 1) - torch.outer(self.mean, self.y_sum / max(self.n, 1))


def _eigh_desc(c: Tensor) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(c)
    return evals.flip(0).clamp_min(0.0), evecs.flip(1)


def ridge(gram: Gram, lam: float) -> tuple[Tensor, Tensor]:
    """``(W, b)`` (d×t, t) of the ridge regression of the targets on the features, float64."""
    evals, q = _eigh_desc(gram.covariance())
    shifted = evals + lam
    top = float(shifted.max()) if shifted.numel() else 0.0
    keep = shifted > PINV_RTOL * max(top, 1e-300)
    inv = torch.where(keep, 1.0 / torch.where(keep, shifted, torch.ones_like(shifted)), 0.0)
    w = q @ (inv[:, None] * (q.T @ gram.cross_covariance()))
    b = gram.y_sum / max(gram.n, 1) - gram.mean @ w
    return w, b


def principal_projection(
    gram: Gram,
    width: int,
    rule: RankRule,
    *,
    whiten: bool = True,
    signed_pairs: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, int]:
    """PIL's hidden layer on the input summarised by ``gram``: ``(W, b, k)``, W is d×width.

    The first ``k = min(width, rank by rule)`` units are the truncated-pseudoinverse
    coordinates (principal directions scaled to unit variance; with ``whiten=False`` all are
    scaled by one common factor so their mean variance is 1 and their ratios are kept). When
    the rule keeps fewer directions than ``width``, the remaining units are random unit-variance
    combinations of the kept whitened directions (as an extreme learning machine's hidden
    units), so the layer still has the configured width.
    """
    evals, q = _eigh_desc(gram.covariance())
    sigma = evals.sqrt()
    d = q.shape[0]
    if float(sigma.max()) <= 0.0:
        k = 0
        r = 0
    else:
        r = rule.select(sigma, r_min=1, r_max=d)
        r = max(1, min(r, int((evals > PINV_RTOL * evals[0]).sum())))
        k = min(width // 2 if signed_pairs else width, r)
    w = torch.zeros(d, width, dtype=torch.float64)
    used = 2 * k if signed_pairs else k
    if r:
        inv_sd = evals[:r].rsqrt()
        if whiten:
            w[:, :k] = q[:, :k] * inv_sd[:k]
        else:
            w[:, :k] = q[:, :k] / evals[:k].mean().sqrt()
        if signed_pairs:
            w[:, k:used] = -w[:, :k]
        if width > used:
            g = torch.randn(r, width - used, generator=generator, dtype=torch.float64)
            w[:, used:] = (q[:, :r] * inv_sd) @ g / r**0.5
    b = -gram.mean @ w
    return w, b, k
