"""Numerical identities of the factorized layers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorank import LorankError, LowRankConv2d, LowRankLinear

CORES = ["full", "diag", "none"]


@pytest.mark.parametrize("core", CORES)
def test_linear_full_rank_reproduces_dense(core):
    torch.manual_seed(0)
    dense = nn.Linear(37, 23).double()
    layer = LowRankLinear.from_linear(dense, 1.0, core)
    x = torch.randn(11, 37, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.to_dense()(x), dense(x), atol=1e-12, rtol=0)
    assert isinstance(layer.to_dense(), nn.Linear)


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=1, padding=1, dilation=1),
        dict(kernel_size=3, stride=2, padding=0, dilation=1),
        dict(kernel_size=(3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
        dict(kernel_size=1, stride=1, padding=0, dilation=1, bias=False),
    ],
)
def test_conv_full_rank_reproduces_dense(core, kwargs):
    torch.manual_seed(1)
    dense = nn.Conv2d(4, 6, **kwargs).double()
    layer = LowRankConv2d.from_conv(dense, 1.0, core)
    x = torch.randn(2, 4, 13, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-11, rtol=0)
    back = layer.to_dense()
    assert back.stride == dense.stride and back.padding == dense.padding
    assert back.dilation == dense.dilation
    torch.testing.assert_close(back(x), dense(x), atol=1e-11, rtol=0)


def test_conv_string_padding_same():
    torch.manual_seed(2)
    dense = nn.Conv2d(3, 5, 3, padding="same").double()
    layer = LowRankConv2d.from_conv(dense, 1.0)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-11, rtol=0)


def test_grouped_conv_refused():
    with pytest.raises(LorankError, match="groups=2"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2)


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_truncation_spectral_error_is_next_singular_value(core, k):
    torch.manual_seed(3)
    dense = nn.Linear(20, 15).double()
    sigma = torch.linalg.svdvals(dense.weight)
    layer = LowRankLinear.from_linear(dense, k, core)
    err = torch.linalg.matrix_norm(dense.weight - layer.weight_matrix(), ord=2)
    assert err.item() == pytest.approx(sigma[k].item(), rel=1e-10)
    # Frobenius error is the norm of the dropped tail (Eckart–Young).
    fro = torch.linalg.matrix_norm(dense.weight - layer.weight_matrix())
    assert fro.item() == pytest.approx(sigma[k:].norm().item(), rel=1e-10)


@pytest.mark.parametrize("core", CORES)
def test_truncate_in_place_keeps_best_approximation(core):
    torch.manual_seed(4)
    layer = LowRankLinear(30, 20, 12, core=core).double()
    w = layer.weight_matrix().detach().clone()
    sigma = torch.linalg.svdvals(w)
    mapping = layer.truncate(5)
    assert layer.rank == 5 and len(mapping) == (2 if core == "none" else 3)
    err = torch.linalg.matrix_norm(w - layer.weight_matrix().detach(), ord=2)
    assert err.item() == pytest.approx(sigma[5].item(), rel=1e-8)
    torch.testing.assert_close(layer.singular_values(), sigma[:5])


def test_singular_values_match_dense_svd_without_forming_w():
    torch.manual_seed(5)
    layer = LowRankLinear(40, 25, 9, core="full").double()
    torch.nn.init.normal_(layer.U)  # non-orthonormal factors
    torch.nn.init.normal_(layer.V)
    expected = torch.linalg.svdvals(layer.weight_matrix().detach())[:9]
    torch.testing.assert_close(layer.singular_values(), expected)


@pytest.mark.parametrize("core", CORES)
def test_random_init_is_orthonormal_and_variance_matched(core):
    torch.manual_seed(6)
    layer = LowRankLinear(400, 300, 50, core=core)
    if core != "none":
        eye = torch.eye(50)
        torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-5, rtol=0)
    dense = nn.Linear(400, 300)
    ratio = layer.weight_matrix().detach().norm() / dense.weight.detach().norm()
    assert 0.9 < ratio.item() < 1.1


def test_forward_cost_never_forms_w():
    # A factorized layer's forward must not create an m×n tensor: check the autograd graph's
    # saved tensors are all small.
    layer = LowRankLinear(2048, 2048, 8)
    x = torch.randn(4, 2048)
    y = layer(x)
    seen = []

    def walk(fn):
        if fn is None or fn in seen:
            return
        seen.append(fn)
        for name in dir(fn):
            if name.startswith("_saved_"):
                value = getattr(fn, name)
                if isinstance(value, torch.Tensor):
                    assert value.numel() < 2048 * 2048
        for nxt, _ in fn.next_functions:
            walk(nxt)

    walk(y.grad_fn)


def test_params_counts():
    layer = LowRankLinear(100, 50, 10, core="full")
    assert layer.params_eval == 10 * 150 + 100 + 50
    assert layer.params_dense == 100 * 50 + 50
    assert layer.params_train == 10 * 150 + 100 + 50
    layer.freeze_bases()
    assert layer.params_train == 100 + 50
    assert LowRankLinear(100, 50, 10, core="diag").params_eval == 10 * 150 + 50


def test_rank_larger_than_layer_is_a_clear_error():
    with pytest.raises(LorankError, match="exceeds the layer's full rank 20"):
        LowRankLinear(20, 30, 25)


def test_set_factors_changes_rank_and_keeps_frozen_flags():
    layer = LowRankLinear(20, 10, 4, core="full")
    layer.freeze_bases()
    old_u = layer.U
    mapping = layer.set_factors(torch.randn(10, 6), torch.randn(6, 6), torch.randn(20, 6))
    assert layer.rank == 6 and mapping[old_u] is layer.U
    assert not layer.U.requires_grad and layer.S.requires_grad


def test_state_dict_loads_into_a_layer_of_another_rank():
    a = LowRankLinear(20, 10, 3, core="full")
    b = LowRankLinear(20, 10, 7, core="full")
    b.load_state_dict(a.state_dict())
    assert b.rank == 3
    x = torch.randn(2, 20)
    torch.testing.assert_close(a(x), b(x))


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    frac=st.floats(0.01, 1.0),
    core=st.sampled_from(CORES),
    batch=st.integers(1, 5),
)
def test_shapes_and_ranks_property(m, n, frac, core, batch):
    layer = LowRankLinear(n, m, frac, core=core)
    assert 1 <= layer.rank <= min(m, n)
    assert layer(torch.randn(batch, n)).shape == (batch, m)
    assert layer.to_dense().weight.shape == (m, n)
    assert layer.singular_values().shape == (layer.rank,)


@settings(max_examples=20, deadline=None)
@given(
    cin=st.integers(1, 4),
    cout=st.integers(1, 6),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    rank=st.integers(1, 6),
)
def test_conv_shapes_property(cin, cout, k, stride, rank):
    dense = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    rank = min(rank, cout, cin * k * k)
    layer = LowRankConv2d.from_conv(dense, rank)
    x = torch.randn(2, cin, 7, 7)
    assert layer(x).shape == dense(x).shape
