"""Invariants every method must keep, checked by hypothesis across methods and shapes:
ranks in bounds, orthonormal bases where the method promises them, parameter counts that
match the factor shapes, an optimizer that holds only live parameters of the right shape,
and ``merge`` preserving the network's outputs."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorank
from lorank.core.metrics import parameter_counts
from lorank.core.optim import optimizer_holds_only
from lorank.methods import METHODS, build

# method -> (config, promises orthonormal bases)
CASES = {
    "dense": ({}, False),
    "factorized": ({"rank": 0.5}, False),
    "svd": ({"rank": 0.5}, False),
    "dlrt": ({"tolerance": 0.2, "r_min": 1}, True),
    "oialr": ({"delay": 2, "frequency": 2, "cutoff": 0.3}, True),
    "hybrid": ({"direction": "dense_to_lowrank", "switch_epoch": 1}, False),
    "nnsvd": ({"rank": 0.5}, False),
}
# Gradient-free methods fit lorank's MLP in closed form instead of taking optimizer steps.
GRADIENT_FREE_CASES = {"pil": {}, "bipil": {}}


def test_the_cases_cover_every_registered_method():
    # A new method must say here which invariants it keeps before it can land.
    assert set(METHODS) == set(CASES) | set(GRADIENT_FREE_CASES)
    assert all(METHODS[n].gradient_free for n in GRADIENT_FREE_CASES)
    assert not any(METHODS[n].gradient_free for n in CASES)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_model(kind: str, width: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(48, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 5),
        )
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(5),
    )


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["mlp", "conv"]), width=st.integers(6, 20), seed=st.integers(0, 99))
def test_method_invariants(name, kind, width, seed):
    torch.manual_seed(seed)
    model = make_model(kind, width)
    x = torch.randn(16, 3, 4, 4)
    y = torch.randint(0, 5, (16,))
    model(x)  # materialise lazy layers
    config, orthonormal = CASES[name]
    method = build({"name": name, **config})
    method.attach(loss_fn=loss_fn, calibration=lambda n: [(x, y)], epochs=2)
    method.prepare(model)
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-2)
    for epoch in range(1, 3):
        for _ in range(3):
            method.train_step(model, optimizer, (x, y), loss_fn)
        method.on_epoch_end(model, optimizer, epoch, {"loss_task": 1.0 / epoch})

    assert optimizer_holds_only(optimizer, model)
    counts = parameter_counts(model)
    assert counts["params_train"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    low_rank = lorank.low_rank_layers(model)
    inside = {id(p) for layer in low_rank.values() for p in layer.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    factor_counts = sum(
        layer.rank * (layer.out_dim + layer.in_dim)
        + (layer.rank**2 if layer.core == "full" else 0)
        + (layer.out_dim if layer.bias is not None else 0)
        for layer in low_rank.values()
    )
    assert counts["params_eval"] == rest + factor_counts
    for layer in low_rank.values():
        assert 1 <= layer.rank <= layer.full_rank
        assert layer.U.shape == (layer.out_dim, layer.rank)
        assert layer.V.shape == (layer.in_dim, layer.rank)
        if orthonormal:
            eye = torch.eye(layer.rank)
            torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-4, rtol=0)
            torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-4, rtol=0)

    model.eval()
    with torch.no_grad():
        before = model(x)
        lorank.merge(model)
        assert not lorank.low_rank_layers(model)
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(GRADIENT_FREE_CASES))
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(8, 24), depth=st.integers(1, 2), seed=st.integers(0, 99))
def test_gradient_free_invariants(name, width, depth, seed):
    from lorank.models import MLP, MLPConfig

    torch.manual_seed(seed)
    model = MLP(MLPConfig(hidden=[width] * depth), 12, 3)
    x = torch.randn(96, 12)
    y = torch.randint(0, 3, (96,))
    method = build({"name": name, **GRADIENT_FREE_CASES[name]})
    method.prepare(model)
    stats = method.fit(model, [(x[:48], y[:48]), (x[48:], y[48:])])
    assert "loss_task" in stats
    counts = parameter_counts(model)
    assert counts["params_eval"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = model(x)
    assert out.shape == (96, 3) and torch.isfinite(out).all()
