r"""Differentiable loss terms used by the low-rank methods.

All functions are pure: they take tensors (factors ``U`` (m x r), ``V`` (n x r), a vector of
singular values ``s``) and return a 0-d tensor that can be added to the loss. The module-level
wrappers that find these tensors on layers live elsewhere.

* :func:`orthogonality` —
  :math:`\frac{1}{r^2}\left(\|U^\top U - I\|_F^2 + \|V^\top V - I\|_F^2\right)`
* :func:`orthonormal_penalty` — :math:`\|F^\top F - I\|_F^2` (nn-svd)
* :func:`l1`, :func:`hoyer`, :func:`hoyer_square` — sparsity of ``s``:
  :math:`\|s\|_1`, :math:`\|s\|_1 / \|s\|_2`, :math:`\|s\|_1^2 / \|s\|_2^2`
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from lorank.errors import LorankError

__all__ = [
    "SPARSITY",
    "SparsityKind",
    "hoyer",
    "hoyer_square",
    "l1",
    "orthogonality",
    "orthogonality_error",
    "orthonormal_penalty",
    "sparsity",
]

SparsityKind = Literal["none", "l1", "hoyer", "hoyer_square"]


def _gram_minus_identity(F: Tensor) -> Tensor:
    """:math:`F^\\top F - I` on the small r x r side (never the m x m side)."""
    if F.dim() != 2:
        raise ValueError(f"expected a 2-D factor (m x r), got shape {tuple(F.shape)}")
    r = F.shape[1]
    gram = F.mT @ F
    return gram - torch.eye(r, dtype=gram.dtype, device=gram.device)


def orthonormal_penalty(F: Tensor) -> Tensor:
    r""":math:`\|F^\top F - I\|_F^2` — zero exactly when the columns of ``F`` are orthonormal."""
    return _gram_minus_identity(F).square().sum()


def orthogonality(U: Tensor, V: Tensor | None = None) -> Tensor:
    r"""Soft orthogonality :math:`\frac{1}{r^2}(\|U^\top U - I\|_F^2 + \|V^\top V - I\|_F^2)`.

    ``U`` is m x r and ``V`` (optional) is n x r. Dividing by :math:`r^2`, the number of Gram
    entries, keeps the weight of this term comparable across layers of different rank.
    """
    r = U.shape[-1]
    loss = orthonormal_penalty(U)
    if V is not None:
        if V.shape[-1] != r:
            raise ValueError(f"U has rank {r} but V has {V.shape[-1]} columns; they must match")
        loss = loss + orthonormal_penalty(V)
    return loss / (r * r)


@torch.no_grad()
def orthogonality_error(U: Tensor) -> float:
    r"""Diagnostic :math:`\|U^\top U - I\|_F` as a Python float (no gradient)."""
    return float(torch.linalg.matrix_norm(_gram_minus_identity(U.detach())))


def _safe_sum_sq(s: Tensor) -> Tensor:
    # Clamping at the dtype's smallest normal number leaves every value with a representable
    # norm unchanged (so s=[3, 4] gives exactly 7/5), avoids 0/0 at s=0, and passes a zero
    # gradient there instead of the inf*0 = NaN that sqrt would produce at 0.
    return s.square().sum().clamp_min(torch.finfo(s.dtype).tiny)


def l1(s: Tensor) -> Tensor:
    r""":math:`\|s\|_1 = \sum_i |s_i|`."""
    return s.abs().sum()


def hoyer(s: Tensor) -> Tensor:
    r"""Hoyer sparsity measure :math:`\|s\|_1 / \|s\|_2` (scale invariant; 0 at ``s = 0``)."""
    return s.abs().sum() / _safe_sum_sq(s).sqrt()


def hoyer_square(s: Tensor) -> Tensor:
    r"""Hoyer-square :math:`\|s\|_1^2 / \|s\|_2^2` (ranges over :math:`[1, n]` for ``s != 0``)."""
    return s.abs().sum().square() / _safe_sum_sq(s)


def _none(s: Tensor) -> Tensor:
    return s.new_zeros(())


#: Name -> sparsity function, the names being those accepted in configs.
SPARSITY: dict[str, Callable[[Tensor], Tensor]] = {
    "none": _none,
    "l1": l1,
    "hoyer": hoyer,
    "hoyer_square": hoyer_square,
}


def sparsity(kind: SparsityKind, s: Tensor) -> Tensor:
    """Apply the sparsity term named ``kind`` to ``s``; ``"none"`` gives a zero scalar."""
    try:
        fn = SPARSITY[kind]
    except KeyError:
        raise LorankError(
            f"unknown sparsity regularizer {kind!r}; use one of {', '.join(get_args(SparsityKind))}"
        ) from None
    return fn(s)
