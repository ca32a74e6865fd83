"""Floating-point operations: counted with :class:`torch.utils.flop_counter.FlopCounterMode`,
plus textbook estimates for the matrix decompositions it does not count.

What a count includes, exactly:

* **counted** (PyTorch's own formulas, one multiply-add = 2 FLOPs): every matrix product and
  convolution that runs (``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions, scaled
  dot-product attention), forward and backward. Autograd computes only the gradients that
  are needed, so the backward of a ``Linear`` is ``4·m·n·b`` (input and weight gradients)
  but ``2·m·n·b`` for a first layer, whose input needs no gradient. A bias add inside
  ``addmm`` is not counted (PyTorch's formula counts the product only);
* **estimated** (:data:`DECOMPOSITION_FLOPS`, the Golub–Van Loan operation counts of the
  LAPACK algorithms behind them): QR, SVD, symmetric eigendecomposition, Cholesky,
  triangular and general solves, inverse, pseudo-inverse, least squares;
* **not counted**: element-wise work (activations, normalisation, the loss, the optimizer's
  update, bias adds). It is O(parameters + activations) per step, a few per cent of the
  products above for the models here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _batch(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-2]) if len(shape) > 2 else 1


def qr_flops(m: int, n: int, with_q: bool = True) -> float:
    """Householder QR of an m×n matrix: 2k²(p − k/3) for R (k = min, p = max), twice that
    when the thin Q is formed as well."""
    k, p = min(m, n), max(m, n)
    r = 2 * k * k * (p - k / 3)
    return 2 * r if with_q else r


def svd_flops(m: int, n: int, with_vectors: bool = True) -> float:
    """Thin SVD of an m×n matrix (Golub–Van Loan, Table 8.6.1, k = min, p = max): with the
    singular vectors the cheaper of Golub–Reinsch, 14pk² + 8k³, and R-SVD, 6pk² + 20k³
    (22k³ for a square matrix); 4pk² − 4k³/3 for the values only."""
    k, p = min(m, n), max(m, n)
    if not with_vectors:
        return 4 * p * k * k - 4 * k**3 / 3
    return min(14 * p * k * k + 8 * k**3, 6 * p * k * k + 20 * k**3)


def eigh_flops(n: int, with_vectors: bool = True) -> float:
    """Symmetric eigendecomposition (tridiagonal reduction + QR): 9n³, 4n³/3 values only."""
    return 9 * n**3 if with_vectors else 4 * n**3 / 3


def _qr(a: Any, mode: str = "reduced", *_: Any, **__: Any) -> float:
    return _batch(a) * qr_flops(a[-2], a[-1], with_q=mode != "r")


def _svd(a: Any, full_matrices: bool = True, compute_uv: bool = True, *_: Any, **__: Any) -> float:
    return _batch(a) * svd_flops(a[-2], a[-1], with_vectors=compute_uv)


def _eigh(a: Any, uplo: str = "L", compute_v: bool = True, *_: Any, **__: Any) -> float:
    return _batch(a) * eigh_flops(a[-1], with_vectors=compute_v)


def _cholesky(a: Any, *_: Any, **__: Any) -> float:
    return _batch(a) * a[-1] ** 3 / 3


def _solve_triangular(a: Any, b: Any, *_: Any, left: bool = True, **__: Any) -> float:
    n = a[-1]
    rhs = b[-1] if left else b[-2]
    return max(_batch(a), _batch(b)) * n * n * rhs


def _solve(a: Any, b: Any, *_: Any, **__: Any) -> float:
    # LU factorization plus forward and back substitution per right-hand side.
    n = a[-1]
    rhs = b[-1] if len(b) >= 2 and len(b) == len(a) else 1
    return max(_batch(a), _batch(b)) * (2 * n**3 / 3 + 2 * n * n * rhs)


def _inv(a: Any, *_: Any, **__: Any) -> float:
    return _batch(a) * 2 * a[-1] ** 3


def _pinv(a: Any, *_: Any, **__: Any) -> float:
    # SVD, then V Σ⁺ Uᵀ: one more product of the thin factors.
    m, n = a[-2], a[-1]
    return _batch(a) * (svd_flops(m, n) + 2 * m * n * min(m, n))


def _lstsq(a: Any, b: Any, *_: Any, **__: Any) -> float:
    # gelsd: an SVD of A, then Uᵀ B and V (Σ⁺ Uᵀ B).
    m, n = a[-2], a[-1]
    rhs = b[-1] if len(b) == len(a) else 1
    return _batch(a) * (svd_flops(m, n) + 2 * (m + n) * min(m, n) * rhs)


def _whole(formula: Callable[..., float]) -> Callable[..., int]:
    def count(*args: Any, **kwargs: Any) -> int:
        kwargs.pop("out_shape", None)  # FlopCounterMode passes the output's shape too
        return round(formula(*args, **kwargs))

    return count


DECOMPOSITION_FLOPS: dict[Any, Callable[..., int]] = {
    op: _whole(formula)
    for op, formula in (
        (aten.linalg_qr, _qr),
        (aten._linalg_svd, _svd),
        (aten._linalg_eigh, _eigh),
        (aten.linalg_cholesky_ex, _cholesky),
        (aten.linalg_solve_triangular, _solve_triangular),
        (aten._linalg_solve_ex, _solve),
        (aten.linalg_inv_ex, _inv),
        (aten.linalg_pinv, _pinv),
        (aten.linalg_lstsq, _lstsq),
    )
}
"""Estimated FLOPs of the decompositions, keyed by the ATen operator PyTorch dispatches
(``torch.linalg.svd`` arrives as ``_linalg_svd``, ``solve`` as ``_linalg_solve_ex``)."""


class FlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that also estimates decompositions and prints nothing::

    with FlopCounter() as counter:
        loss = model(x).sum(); loss.backward()
    counter.total, counter.estimated   # all FLOPs, and the part that was estimated
    """

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=dict(DECOMPOSITION_FLOPS))

    @property
    def total(self) -> int:
        return int(self.get_total_flops())

    @property
    def estimated(self) -> int:
        """The FLOPs of :data:`DECOMPOSITION_FLOPS` among :attr:`total`."""
        counts = self.get_flop_counts().get("Global", {})
        return int(sum(v for k, v in counts.items() if k in DECOMPOSITION_FLOPS))


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """``fn(*args, **kwargs)`` and the FLOPs it took (see the module docstring)."""
    with FlopCounter() as counter:
        out = fn(*args, **kwargs)
    return out, counter.total
