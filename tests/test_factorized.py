"""The ``factorized`` method: fixed-rank W = U Vᵀ."""

import copy

import pytest
import torch
from conftest import SYNTHETIC_DATA
from torch import nn

import lorank
from lorank.core.layers import LowRankLinear
from lorank.errors import LorankError
from lorank.methods import build
from lorank.models import MLP, MLPConfig
from lorank.training.config import validate_config


def small_mlp(hidden=(64, 48), inputs=20, classes=5):
    torch.manual_seed(0)
    return MLP(MLPConfig(hidden=list(hidden)), inputs, classes)


def test_prepare_factorizes_hidden_layers_and_keeps_classifier_dense():
    model = small_mlp()
    report = build({"name": "factorized", "rank": 8}).prepare(model)
    layers = lorank.low_rank_layers(model)
    assert list(layers) == ["layers.0", "layers.2"]
    assert all(layer.core == "none" and layer.S is None for layer in layers.values())
    assert all(layer.rank == 8 for layer in layers.values())
    assert type(model.layers[4]) is nn.Linear  # keep_last_dense by default
    assert [e.status for e in report.layers] == ["converted", "converted", "kept"]
    # params_eval = r(m + n) + bias per factorized layer
    assert layers["layers.0"].params_eval == 8 * (64 + 20) + 64
    assert report.params_after == 8 * (64 + 20) + 64 + 8 * (48 + 64) + 48 + 5 * 48 + 5


@torch.no_grad()
def test_random_init_has_orthogonal_factors_with_matched_scale():
    model = small_mlp()
    build({"name": "factorized", "rank": 8}).prepare(model)
    layer = model.layers[0]
    gram_u, gram_v = layer.U.T @ layer.U, layer.V.T @ layer.V
    # U = Q sqrt(c), V = Q' sqrt(c): both Grams are c I, and ‖U Vᵀ‖²_F = c² r = m / 3.
    c = gram_u[0, 0]
    torch.testing.assert_close(gram_u, c * torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(gram_v, c * torch.eye(8), atol=1e-5, rtol=0)
    norm_sq = float(torch.linalg.matrix_norm(layer.weight_matrix().detach()) ** 2)
    assert norm_sq == pytest.approx(64 / 3, rel=1e-4)


def test_svd_init_is_the_best_rank_r_approximation_of_the_dense_init():
    model = small_mlp()
    dense = copy.deepcopy(model.layers[0].weight.detach())
    build({"name": "factorized", "rank": 8, "init": "svd"}).prepare(model)
    u, s, vh = torch.linalg.svd(dense.double())
    best = (u[:, :8] * s[:8]) @ vh[:8]
    torch.testing.assert_close(model.layers[0].weight_matrix().double(), best, atol=1e-5, rtol=0)


def test_fractional_rank_and_rank_pattern():
    model = small_mlp()
    build({"name": "factorized", "rank": 0.25, "rank_pattern": {"layers.2": 3}}).prepare(model)
    assert lorank.core.metrics.ranks(model) == {"layers.0": 5, "layers.2": 3}  # ceil(0.25 * 20) = 5


@pytest.mark.parametrize(
    "bad", [{"rank": 0}, {"rank": -0.5}, {"rank": 1.5}, {"init": "xavier"}, {"ranks": 3}]
)
def test_bad_config_values_are_one_line_errors(bad):
    with pytest.raises(LorankError) as err:
        validate_config({"method": {"name": "factorized", **bad}})
    assert "\n" not in str(err.value) and "method" in str(err.value)


def test_rank_above_full_rank_is_refused_at_prepare():
    with pytest.raises(LorankError, match="exceeds the layer's full rank"):
        build({"name": "factorized", "rank": 100, "skip_if_no_savings": False}).prepare(small_mlp())


def test_trains_end_to_end_on_synthetic_data(run_config):
    trained = run_config(
        {
            "data": SYNTHETIC_DATA,
            "model": {"name": "mlp", "hidden": [32, 32]},
            "method": {"name": "factorized", "rank": 4},
            "optim": {"lr": 3e-3},
            "train": {"epochs": 3, "threads": 1},
        }
    )
    run, records, summary = trained.path, trained.records, trained.summary
    assert summary["ranks"] == {"layers.0": 4, "layers.2": 4}
    assert records[-1]["train_loss"] < records[1]["train_loss"]
    assert summary["test_acc"] > 1 / 4 + 0.15  # 4 synthetic classes
    assert summary["params_eval"] < summary["params_dense"]
    loaded = lorank.load(run / "model")
    assert isinstance(loaded.layers[0], LowRankLinear) and loaded.layers[0].rank == 4
