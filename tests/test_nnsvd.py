"""The ``nnsvd`` training variants: U Vᵀ with nn-svd's orthonormal penalty, and W = B Bᵀ."""

import pytest
import torch
import torch.nn.functional as F
from conftest import SYNTHETIC_DATA
from torch import nn

import lorank
from lorank.core.metrics import ranks
from lorank.core.regularizers import orthonormal_penalty
from lorank.methods import build
from lorank.methods.nnsvd import SymmetricLowRankLinear
from lorank.models import MLP, MLPConfig


def small_mlp():
    torch.manual_seed(0)
    return MLP(MLPConfig(hidden=[32, 32]), 20, 5)


def test_symmetric_layer_is_b_bt_with_one_factor():
    torch.manual_seed(0)
    layer = SymmetricLowRankLinear(16, 4)
    w = layer.weight_matrix().detach()
    torch.testing.assert_close(w, w.T)
    assert torch.linalg.eigvalsh(w).min() > -1e-6  # positive semi-definite
    assert layer.V is layer.U and layer.B is layer.U
    assert [n for n, _ in layer.named_parameters()] == ["U", "bias"]
    assert layer.params_eval == 4 * 16 + 16 and layer.params_train == 4 * 16 + 16
    x = torch.randn(8, 16)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias.detach()))
    # ‖B Bᵀ‖²_F matches the dense init's expected n / 3
    assert float(torch.linalg.matrix_norm(w) ** 2) == pytest.approx(16 / 3, rel=1e-4)


def test_symmetric_gradient_matches_autograd_through_the_dense_weight():
    torch.manual_seed(1)
    layer = SymmetricLowRankLinear(10, 3)
    x, target = torch.randn(6, 10), torch.randn(6, 10)
    F.mse_loss(layer(x), target).backward()
    b = layer.U.detach().clone().requires_grad_(True)
    F.mse_loss(F.linear(x, b @ b.T, layer.bias.detach()), target).backward()
    torch.testing.assert_close(layer.U.grad, b.grad)


def test_from_linear_is_exact_for_a_low_rank_psd_weight_and_truncation_stays_tied():
    torch.manual_seed(2)
    b = torch.randn(12, 3)
    dense = nn.Linear(12, 12)
    with torch.no_grad():
        dense.weight.copy_(b @ b.T)
    layer = SymmetricLowRankLinear.from_linear(dense, 3)
    torch.testing.assert_close(layer.weight_matrix().detach(), b @ b.T, atol=1e-4, rtol=1e-4)
    sigma = torch.linalg.svdvals(b @ b.T)
    mapping = layer.truncate(2)
    assert layer.rank == 2 and layer.V is layer.U and len(mapping) == 1
    error = torch.linalg.matrix_norm(layer.weight_matrix().detach() - b @ b.T, ord=2)
    assert float(error) == pytest.approx(float(sigma[2]), rel=1e-3)


def test_prepare_symmetric_on_square_layers_only():
    model = small_mlp()
    report = build({"name": "nnsvd", "rank": 4, "symmetric": True}).prepare(model)
    assert type(model.layers[0]) is lorank.LowRankLinear  # 32×20: U Vᵀ fallback
    assert type(model.layers[2]) is SymmetricLowRankLinear  # 32×32
    assert type(model.layers[4]) is nn.Linear  # classifier kept dense
    assert model.layers[0].core == "none"
    assert report.layers[1].params_after == 4 * 32 + 32
    assert ranks(model) == {"layers.0": 4, "layers.2": 4}


def test_orthonormal_penalty_weighted_by_alpha():
    model = small_mlp()
    method = build({"name": "nnsvd", "rank": 4, "alpha": 0.3, "symmetric": True})
    method.prepare(model)
    terms = method.regularization(model)
    first, sym = model.layers[0], model.layers[2]
    expected = 0.3 * (
        orthonormal_penalty(first.U) + orthonormal_penalty(first.V) + orthonormal_penalty(sym.U)
    )  # the tied factor counts once
    torch.testing.assert_close(terms["orthonormal"], expected)
    assert build({"name": "nnsvd", "alpha": 0.0}).regularization(model) == {}


def test_symmetric_model_saves_and_loads_with_the_same_outputs(tmp_path):
    model = small_mlp()
    build({"name": "nnsvd", "rank": 4, "symmetric": True}).prepare(model)
    lorank.save(model, tmp_path / "m")
    loaded = lorank.load(tmp_path / "m", small_mlp())
    x = torch.randn(4, 20)
    torch.testing.assert_close(loaded(x), model(x))


def test_trains_end_to_end_with_one_optimized_factor_per_symmetric_layer(run_config):
    trained = run_config(
        {
            "data": SYNTHETIC_DATA,
            "model": {"name": "mlp", "hidden": [32, 32]},
            "method": {"name": "nnsvd", "rank": 6, "alpha": 1e-3, "symmetric": True},
            "optim": {"lr": 3e-3},
            "train": {"epochs": 3, "threads": 1},
        }
    )
    records, summary = trained.records, trained.summary
    assert "loss_orthonormal" in records[1]
    assert records[-1]["train_loss"] < records[1]["train_loss"]
    # layers.0: 6(32+16)+32, layers.2 symmetric: 6·32+32, classifier 32·4+4
    assert summary["params_eval"] == 6 * 48 + 32 + 6 * 32 + 32 + 32 * 4 + 4
