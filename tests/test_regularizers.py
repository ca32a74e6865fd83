import math

import pytest
import torch
from torch.autograd import gradcheck

from lorank.core.regularizers import (
    SPARSITY,
    hoyer,
    hoyer_square,
    l1,
    orthogonality,
    orthogonality_error,
    orthonormal_penalty,
    sparsity,
)
from lorank.errors import LorankError

F64 = torch.float64


def _orthonormal(m: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))
    return q


def _randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


@pytest.mark.parametrize(("m", "n", "r"), [(50, 30, 8), (7, 5, 1), (4, 4, 4)])
def test_orthogonality_zero_for_orthonormal(m, n, r):
    U, V = _orthonormal(m, r, 0), _orthonormal(n, r, 1)
    assert orthogonality(U, V).item() <= 1e-12
    assert orthogonality(U).item() <= 1e-12
    assert orthonormal_penalty(U).item() <= 1e-12
    assert orthogonality_error(U) <= 1e-6


@pytest.mark.parametrize("r", [1, 3, 6])
def test_orthogonality_positive_otherwise(r):
    U, V = _randn(20, r, seed=2), _randn(15, r, seed=3)
    assert orthogonality(U, V).item() > 1e-3
    # Scaling an orthonormal factor by 2 makes the Gram 4I: ||3I||_F^2 = 9r, divided by r^2.
    Q = _orthonormal(20, r, 4)
    assert orthogonality(2 * Q).item() == pytest.approx(9 / r)
    assert orthogonality(2 * Q, Q).item() == pytest.approx(9 / r)


def test_orthogonality_matches_definition():
    U, V = _randn(9, 4, seed=5), _randn(6, 4, seed=6)
    eye = torch.eye(4, dtype=F64)
    expected = (
        torch.linalg.matrix_norm(U.T @ U - eye) ** 2 + torch.linalg.matrix_norm(V.T @ V - eye) ** 2
    ) / 16
    assert torch.allclose(orthogonality(U, V), expected)
    assert orthogonality_error(U) == pytest.approx(float(torch.linalg.matrix_norm(U.T @ U - eye)))


def test_orthogonality_error_is_float_without_grad():
    U = _randn(5, 2, seed=7).requires_grad_()
    err = orthogonality_error(U)
    assert isinstance(err, float) and err > 0


def test_orthogonality_rank_mismatch():
    with pytest.raises(ValueError):
        orthogonality(_randn(5, 2, seed=0), _randn(5, 3, seed=1))


def test_orthogonality_gradcheck():
    U = _randn(7, 3, seed=8).requires_grad_()
    V = _randn(5, 3, seed=9).requires_grad_()
    assert gradcheck(orthogonality, (U, V))
    assert gradcheck(lambda u: orthogonality(u), (U,))
    assert gradcheck(orthonormal_penalty, (_randn(6, 1, seed=10).requires_grad_(),))


def test_orthogonality_gradient_vanishes_at_orthonormal():
    U = _orthonormal(10, 3, 11).requires_grad_()
    orthogonality(U).backward()
    assert U.grad.abs().max().item() <= 1e-12


def test_sparsity_hand_values():
    s = torch.tensor([3.0, -4.0], dtype=F64)
    assert l1(s).item() == 7.0
    assert hoyer(s).item() == pytest.approx(7 / 5, abs=1e-15)
    assert hoyer_square(s).item() == pytest.approx(49 / 25, abs=1e-15)
    # A 1-sparse vector is maximally sparse: hoyer = 1, hoyer_square = 1; uniform gives n.
    assert hoyer(torch.tensor([0.0, 5.0, 0.0])).item() == pytest.approx(1.0)
    assert hoyer_square(torch.ones(6)).item() == pytest.approx(6.0)
    assert hoyer(torch.ones(4)).item() == pytest.approx(2.0)


def test_sparsity_scale_invariance():
    s = _randn(10, seed=12)
    assert hoyer(7 * s).item() == pytest.approx(hoyer(s).item())
    assert hoyer_square(0.1 * s).item() == pytest.approx(hoyer_square(s).item())


@pytest.mark.parametrize("fn", [hoyer, hoyer_square, l1])
def test_sparsity_gradcheck(fn):
    # Keep entries away from 0, where |s| is not differentiable.
    s = (_randn(8, seed=13).abs() + 0.1) * torch.tensor([1, -1] * 4, dtype=F64)
    assert gradcheck(fn, (s.requires_grad_(),))


@pytest.mark.parametrize("fn", [hoyer, hoyer_square])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sparsity_zero_vector_is_finite(fn, dtype):
    s = torch.zeros(5, dtype=dtype, requires_grad=True)
    out = fn(s)
    out.backward()
    assert out.item() == 0.0
    assert torch.isfinite(s.grad).all()


def test_sparsity_dispatch():
    s = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    assert sparsity("none", s).item() == 0.0
    assert sparsity("l1", s).item() == 7.0
    assert sparsity("hoyer", s).item() == pytest.approx(1.4)
    assert sparsity("hoyer_square", s).item() == pytest.approx(1.96)
    assert set(SPARSITY) == {"none", "l1", "hoyer", "hoyer_square"}
    sparsity("hoyer", s).backward()
    # d/ds (|s|_1 / |s|_2) = sign(s)/|s|_2 - |s|_1 s / |s|_2^3
    expected = torch.tensor([1 / 5 - 7 * 3 / 125, 1 / 5 - 7 * 4 / 125], dtype=F64)
    assert torch.allclose(s.grad, expected)


def test_sparsity_unknown_kind():
    with pytest.raises(LorankError, match="hoyer_square"):
        sparsity("l2", torch.ones(2))  # type: ignore[arg-type]


def test_orthogonality_uses_small_gram():
    # A tall factor (m=200000, r=2) would need 320 GB for the m x m Gram; the r x r one is instant.
    U = torch.zeros(200_000, 2, dtype=F64)
    U[0, 0] = U[1, 1] = 1.0
    assert orthogonality(U).item() == 0.0
    assert math.isclose(orthonormal_penalty(2 * U).item(), 18.0)
