"""Truncated SVD and the loss-bounded rank search of seed 003, with its Theorem-1 bound."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorank
from lorank.compress import apply_ranks
from lorank.core.layers import LowRankLinear
from lorank.core.rank import delta
from lorank.core.search import (
    feedforward_chain,
    layer_spectra,
    loss_bounded_search,
    max_input_norm,
    max_output_difference,
    mean_loss,
    rule_ranks,
    theorem1_bound,
    truncated,
)
from lorank.errors import LorankError
from lorank.models import MLP, LeNet5, MLPConfig
from lorank.training.evaluate import task_loss

_FITTED: dict[int, tuple[dict, list]] = {}


def trained_mlp(steps=60):
    """A small MLP fitted a little to a fixed random task, so truncation changes the loss
    (fitted once per test session, then copied)."""
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=[48, 32]), 24, 6)
    if steps not in _FITTED:
        x = torch.randn(512, 24)
        y = (x[:, :6] @ torch.randn(6, 6)).argmax(1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            optimizer.zero_grad()
            task_loss(model, (x, y)).backward()
            optimizer.step()
        batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
        _FITTED[steps] = (copy.deepcopy(model.state_dict()), batches)
    state, batches = _FITTED[steps]
    model.load_state_dict(state)
    return model, batches


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(2, 12), data=st.data())
def test_truncation_to_rank_k_has_spectral_error_sigma_k_plus_1(m, n, data):
    k = data.draw(st.integers(1, min(m, n) - 1 if min(m, n) > 1 else 1))
    torch.manual_seed(m * 100 + n)
    dense = nn.Linear(n, m).double()
    w = dense.weight.detach().clone()
    sigma = torch.linalg.svdvals(w)
    # a low-rank layer truncated in place ...
    layer = LowRankLinear.from_linear(dense, min(m, n))
    layer.truncate(k)
    error = torch.linalg.matrix_norm(layer.weight_matrix().detach() - w, ord=2)
    assert float(error) == pytest.approx(float(sigma[k]), rel=1e-7, abs=1e-12)
    # ... and a dense layer replaced through compress's surgery
    model = nn.Sequential(dense)
    spectra = layer_spectra(model, skip_if_no_savings=False)
    apply_ranks(model, spectra, {"0": k})
    error = torch.linalg.matrix_norm(model[0].weight_matrix().detach() - w, ord=2)
    assert float(error) == pytest.approx(float(sigma[k]), rel=1e-7, abs=1e-12)


def test_search_keeps_the_loss_change_within_epsilon_after_truncating():
    model, batches = trained_mlp()
    for epsilon in (0.01, 0.05, 0.2):
        spectra = layer_spectra(model, skip_if_no_savings=False)
        result = loss_bounded_search(model, batches, task_loss, epsilon, 0.01, spectra)
        assert result.loss_change < epsilon
        assert result.loss_before == pytest.approx(mean_loss(model, batches, task_loss))
        truncated_model, _ = trained_mlp()
        apply_ranks(
            truncated_model, layer_spectra(truncated_model, skip_if_no_savings=False), result.ranks
        )
        after = mean_loss(truncated_model, batches, task_loss)
        assert abs(after - result.loss_before) < epsilon  # the bound holds on the real model
        assert after == pytest.approx(result.loss_after, abs=1e-5)
        # every accepted trial was within ε, every rejected one was not
        for trial in result.trials:
            assert (abs(trial["loss"] - result.loss_before) < epsilon) == bool(trial["feasible"])


def test_search_truncates_more_with_a_larger_tolerance():
    model, batches = trained_mlp()
    tight = loss_bounded_search(model, batches, task_loss, 0.005, 0.01)
    loose = loss_bounded_search(model, batches, task_loss, 0.5, 0.01)
    assert loose.delta >= tight.delta
    assert sum(loose.ranks.values()) <= sum(tight.ranks.values())
    assert sum(loose.ranks.values()) < sum(s.full_rank for s in layer_spectra(model))


def test_search_leaves_the_model_untouched_and_computes_each_svd_once(monkeypatch):
    model, batches = trained_mlp()
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        calls.append(1)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    result = loss_bounded_search(model, batches, task_loss, 0.05, 0.005)
    assert len(calls) == 3  # one per layer, however many trials the search made
    assert len(result.trials) >= 7
    for name, p in model.named_parameters():
        assert p is params[name][0]
        assert torch.equal(p.detach(), params[name][1])


def test_search_on_low_rank_layers_keeps_shapes():
    model, batches = trained_mlp()
    lorank.convert(
        model, lorank.LowRankConfig(keep_last_dense=False, rank=1.0, skip_if_no_savings=False)
    )
    shapes = {n: p.shape for n, p in model.named_parameters()}
    result = loss_bounded_search(model, batches, task_loss, 0.05, 0.02)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert result.loss_change < 0.05


def test_truncated_context_restores_on_error():
    model, _ = trained_mlp()
    before = model.layers[0].weight.detach().clone()
    spectra = layer_spectra(model)
    with pytest.raises(RuntimeError), truncated(spectra, {"layers.0": 1}):
        assert torch.linalg.matrix_rank(model.layers[0].weight.detach()) == 1
        raise RuntimeError("boom")
    assert torch.equal(model.layers[0].weight.detach(), before)


def test_dense_ranks_without_savings_stay_full():
    model = nn.Sequential(nn.Linear(8, 8))
    spec = layer_spectra(model)[0]
    assert spec.max_rank == (64 - 1) // 16  # r(m + n) < mn  <=>  r <= 3
    assert rule_ranks([spec], delta(0.0)) == {"0": 8}


def test_bad_search_arguments():
    model, batches = trained_mlp(steps=0)
    with pytest.raises(LorankError, match="must be > 0"):
        loss_bounded_search(model, batches, task_loss, 0.0)
    with pytest.raises(LorankError, match="precision"):
        loss_bounded_search(model, batches, task_loss, 0.1, precision=1.5)


@settings(max_examples=20, deadline=None)
@given(
    widths=st.lists(st.integers(2, 10), min_size=2, max_size=4),
    activation=st.sampled_from(["relu", "tanh"]),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_theorem1_bound_holds_for_bias_free_mlps(widths, activation, seed, data):
    torch.manual_seed(seed)
    model = MLP(
        MLPConfig(hidden=widths[1:-1] or [4], activation=activation), widths[0], widths[-1]
    ).double()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.bias = None
    spectra = layer_spectra(model, skip_if_no_savings=False)
    ranks = {s.name: data.draw(st.integers(1, s.full_rank)) for s in spectra}
    batches = [(torch.randn(16, widths[0], dtype=torch.float64), None)]
    original = MLP(
        MLPConfig(hidden=widths[1:-1] or [4], activation=activation), widths[0], widths[-1]
    ).double()
    for module in original.modules():
        if isinstance(module, nn.Linear):
            module.bias = None
    original.load_state_dict(model.state_dict())
    bound = theorem1_bound(model, ranks, max_input_norm(batches), spectra)
    apply_ranks(model, spectra, ranks)
    measured = max_output_difference(original, model, batches)
    assert measured <= bound["bound"] * (1 + 1e-9) + 1e-9


def test_theorem1_is_only_for_feedforward_chains():
    assert feedforward_chain(LeNet5((1, 28, 28), 10)) is None
    model, _ = trained_mlp(steps=0)
    chain = feedforward_chain(model)
    assert [name for name, _, _ in chain] == ["layers.0", "layers.2", "layers.4"]
    assert [rho for _, _, rho in chain] == [1.0, 1.0, 1.0]
    assert theorem1_bound(model, {}, 1.0)["bound"] == 0.0  # no truncation, no difference
