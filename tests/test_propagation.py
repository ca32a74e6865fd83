"""Error-propagation-aware truncation, the closed-form refit, the measured allocation and
distillation: each does what its objective says, on random layers and small models."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorank
from lorank.compress import BudgetRanks, CompressConfig, DistillFinetune, compress_model
from lorank.compress.calibration import activation_svd
from lorank.compress.distill import trainable_parameters
from lorank.compress.propagation import PairedMoments, objective, propagated_svd, refit
from lorank.errors import LorankError

torch.set_default_dtype(torch.float32)


def _direct(w, b, w_r, b_r, x, xt, lam):
    """J computed from the rows themselves."""
    y = x @ w.T + (b if b is not None else 0)
    yh = xt @ w_r.T + (b_r if b_r is not None else 0)
    return float((y - yh).pow(2).sum(1).mean() + lam * (w - w_r).pow(2).sum())


def _layer(seed, m, n, rows, noise, bias):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64) if bias else None
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)  # correlated inputs
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) @ mix + 0.5
    xt = x + noise * torch.randn(rows, n, generator=g, dtype=torch.float64) + noise * 0.3
    return w, b, x, xt


layers = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(2, 12),  # m
    st.integers(2, 12),  # n
    st.integers(3, 60),  # rows (fewer than n: a singular C)
    st.sampled_from([0.0, 0.05, 0.5]),  # upstream perturbation
    st.booleans(),  # bias
    st.sampled_from([0.0, 1e-4, 1e-2]),  # damping
)


@settings(max_examples=60, deadline=None)
@given(layers, st.data())
def test_objective_matches_its_definition(layer, data):
    seed, m, n, rows, noise, bias, damping = layer
    w, b, x, xt = _layer(seed, m, n, rows, noise, bias)
    pm = PairedMoments.of(x, xt)
    w_r = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    b_r = None if b is None else b + 0.1
    j, energy = objective(w, b, w_r, b_r, pm, damping)
    assert j == pytest.approx(_direct(w, b, w_r, b_r, x, xt, damping), rel=1e-5, abs=1e-6)
    assert energy == pytest.approx(_direct(w, b, 0 * w, 0 * b if b is not None else None, x, x, 0))


@settings(max_examples=60, deadline=None)
@given(layers, st.data())
def test_propagated_truncation_never_loses_to_independent_factors(layer, data):
    """J(propagated rank-r) ≤ J(any other rank-r): the independent activation-aware and the
    plain factors, both with the original bias."""
    seed, m, n, rows, noise, bias, damping = layer
    w, b, x, xt = _layer(seed, m, n, rows, noise, bias)
    r = data.draw(st.integers(1, min(m, n)))
    pm = PairedMoments.of(x, xt)
    u, s, v, lam = propagated_svd(w, pm, damping)
    j_prop, _ = objective(w, b, (u[:, :r] * s[:r]) @ v[:, :r].T, b, pm, lam)
    # abs: at full rank J is 0, and the moment form rounds to about ±1e-12 of it.
    direct = _direct(w, b, (u[:, :r] * s[:r]) @ v[:, :r].T, b, x, xt, lam)
    assert j_prop == pytest.approx(direct, abs=1e-9)
    ua, sa, va = activation_svd(w, x.T @ x / rows, damping)
    pu, ps, pvh = torch.linalg.svd(w, full_matrices=False)
    for w_r in ((ua[:, :r] * sa[:r]) @ va[:, :r].T, (pu[:, :r] * ps[:r]) @ pvh[:r]):
        j_other, _ = objective(w, b, w_r, b, pm, lam)
        assert j_prop <= j_other * (1 + 1e-7) + 1e-9
    if noise == 0.0:  # nothing upstream changed: exactly the activation-aware SVD's error
        tail = float(s[r:].pow(2).sum())
        j_act, _ = objective(w, b, (ua[:, :r] * sa[:r]) @ va[:, :r].T, b, pm, lam)
        assert j_prop == pytest.approx(j_act, rel=1e-6, abs=1e-8)
        assert j_prop - lam * 0 == pytest.approx(tail, rel=1e-6, abs=1e-8)


@settings(max_examples=60, deadline=None)
@given(layers, st.data())
def test_refit_never_increases_the_objective(layer, data):
    seed, m, n, rows, noise, bias, damping = layer
    w, b, x, xt = _layer(seed, m, n, rows, noise, bias)
    r = data.draw(st.integers(1, min(m, n)))
    pm = PairedMoments.of(x, xt)
    lam = damping * float((xt.T @ xt / rows).diagonal().mean())
    pu, ps, pvh = torch.linalg.svd(w, full_matrices=False)
    u, v = pu[:, :r] * ps[:r], pvh[:r].T  # plain truncation: U, V
    before, _ = objective(w, b, u @ v.T, b, pm, lam)
    new_u, new_b = refit(w, b, v, pm, lam)
    after, _ = objective(w, b, new_u @ v.T, new_b, pm, lam)
    assert after <= before * (1 + 1e-7) + 1e-9
    assert after == pytest.approx(_direct(w, b, new_u @ v.T, new_b, x, xt, lam), rel=1e-5, abs=1e-7)
    # and after a propagated truncation (already optimal in U): still never worse
    pu2, s2, v2, lam2 = propagated_svd(w, pm, damping)
    base, _ = objective(w, b, (pu2[:, :r] * s2[:r]) @ v2[:, :r].T, b, pm, lam2)
    u3, b3 = refit(w, b, v2[:, :r], pm, lam2)
    again, _ = objective(w, b, u3 @ v2[:, :r].T, b3, pm, lam2)
    assert again <= base * (1 + 1e-7) + 1e-9


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 64),
        nn.GELU(),
        nn.LayerNorm(64),
        nn.Linear(64, 64),
        nn.GELU(),
        nn.Linear(64, 64),
        nn.GELU(),
        nn.Linear(64, 10),
    )


def _batches(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(20, 20, generator=g)
    return [(torch.randn(32, 20, generator=g) @ mix,) for _ in range(n)]


def test_propagation_and_refit_lower_each_layers_objective_and_the_output_error():
    batches = _batches()
    reference = _mlp()
    errors = {}
    for name, extra in {
        "activation": {},
        "propagation": {"error_propagation": True},
        "refit": {"error_propagation": True, "refit": True},
    }.items():
        model = copy.deepcopy(reference)
        config = CompressConfig(svd="activation", ranks=BudgetRanks(budget=0.3), **extra)
        report = compress_model(model, config, batches, progress=False)
        rows = [r for r in report.layers if r["status"] != "kept"]
        if extra:
            assert rows and all(
                r["objective"] <= r["objective_independent"] * (1 + 1e-6) + 1e-12 for r in rows
            )
        with torch.no_grad():
            errors[name] = sum(
                float((model(b[0]) - reference(b[0])).pow(2).mean()) for b in batches
            )
    assert errors["propagation"] < errors["activation"]
    assert errors["refit"] <= errors["propagation"] * 1.001


def test_first_layer_with_propagation_equals_the_activation_svd():
    """Nothing upstream of the first layer is compressed: its factors are the independent ones."""
    batches = _batches()
    a, b = _mlp(), _mlp()
    compress_model(
        a, CompressConfig(svd="activation", ranks=BudgetRanks(budget=0.4)), batches, progress=False
    )
    compress_model(
        b,
        CompressConfig(svd="activation", ranks=BudgetRanks(budget=0.4), error_propagation=True),
        batches,
        progress=False,
    )
    wa, wb = a[0].weight_matrix(), b[0].weight_matrix()
    torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a[3].weight_matrix(), b[3].weight_matrix(), atol=1e-4)


def test_measured_allocation_meets_the_budget_and_records_sensitivities():
    batches = _batches()
    model = _mlp()
    weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    config = CompressConfig(svd="activation", ranks=BudgetRanks(budget=0.4, allocation="measured"))
    report = compress_model(model, config, batches, progress=False)
    kept = sum(
        r["rank"] * sum(r["shape"]) if r["status"] != "kept" else r["shape"][0] * r["shape"][1]
        for r in report.layers
    )
    assert kept <= 0.4 * weights
    assert set(report.allocation_measurements) == {r["name"] for r in report.layers}
    assert all(m["sensitivity"] > 0 for m in report.allocation_measurements.values())


def test_distillation_lowers_the_held_out_distillation_loss():
    batches = _batches(12)
    model = _mlp()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = CompressConfig(
        svd="activation",
        ranks=BudgetRanks(budget=0.25),
        finetune=DistillFinetune(steps=60, lr=3e-3, holdout=0.25, eval_every=10, patience=10),
    )
    report = compress_model(model, config, batches, progress=False)
    d = report.distill
    assert d["loss"] == "kl" and d["held_out_batches"] == 3
    assert d["held_out_after"] < 0.9 * d["held_out_before"]
    assert report.params_after == lorank.core.metrics.parameter_counts(model)
    # only factors, norms and biases trained; nothing is left requiring no gradient
    trained = {id(p) for p in trainable_parameters(model)}
    assert all(p.requires_grad for p in model.parameters())
    del frozen, trained


def test_distillation_of_hidden_states_uses_cosine():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()

        def forward(self, x):
            return {"last_hidden_state": self.body(x)}

    batches = _batches(6)
    model = Encoder()
    config = CompressConfig(
        svd="activation",
        ranks=BudgetRanks(budget=0.25),
        finetune=DistillFinetune(steps=20, lr=1e-3, eval_every=5),
    )
    report = compress_model(model, config, batches, progress=False)
    assert report.distill["loss"] == "cosine"
    assert report.distill["held_out_after"] <= report.distill["held_out_before"]


def test_bad_in_memory_configs_are_one_line_errors():
    model = _mlp()
    with pytest.raises(LorankError, match="calibration"):
        compress_model(model, CompressConfig(svd="activation"), None)
    with pytest.raises(LorankError, match="at least 2 calibration batches"):
        compress_model(
            model,
            CompressConfig(ranks=BudgetRanks(budget=0.5), finetune=DistillFinetune()),
            _batches(1),
            progress=False,
        )
    with pytest.raises(LorankError, match="`ranks.budget`"):
        compress_model(model, {"ranks": {"kind": "budget", "budget": 0}}, _batches())
    with pytest.raises(LorankError, match="loss"):
        compress_model(
            model, {"ranks": {"kind": "loss_tolerance", "loss_tolerance": 0.1}}, _batches()
        )
    with pytest.raises(LorankError, match="`svd`"):
        compress_model(model, {"error_propagation": True}, _batches())
