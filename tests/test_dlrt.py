"""DLRT: invariants of both integrators (orthonormal bases, rank bounds, optimizer state that
follows the basis), convergence on least squares, descent on a quadratic, Linear and Conv2d."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import orth_error
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorank.methods as methods
from lorank.core.convert import low_rank_layers
from lorank.core.layers import LowRankConv2d, LowRankLinear
from lorank.core.optim import optimizer_holds_only
from lorank.errors import LorankError
from lorank.methods.dlrt import DLRT, _state_map

INTEGRATORS = ["parallel", "bug", "kls", "retraction"]
DLRT_INTEGRATORS = ["parallel", "bug", "kls"]  # the ones that integrate the DLRT flow


pytestmark = pytest.mark.usefixtures("one_thread")


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 4),
    )


def classification_batch(model_kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if model_kind == "mlp":
        return torch.randn(64, 20, generator=g), torch.randint(0, 3, (64,), generator=g)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def check_invariants(method: DLRT, model: nn.Module, optimizer) -> None:
    for name, layer in low_rank_layers(model).items():
        assert orth_error(layer.U) < 1e-5, name
        assert orth_error(layer.V) < 1e-5, name
        lo, hi = method.rank_bounds(layer.full_rank)
        assert lo <= layer.rank <= hi, (name, layer.rank, lo, hi)
        assert layer.S.shape == (layer.rank, layer.rank)
    assert optimizer_holds_only(optimizer, model)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("integrator", INTEGRATORS)
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_invariants_after_every_step(integrator, adaptive, model_kind, opt):
    torch.manual_seed(0)
    model = mlp() if model_kind == "mlp" else cnn()
    method = methods.build(
        {
            "name": "dlrt",
            "integrator": integrator,
            "adaptive": adaptive,
            "tolerance": 0.05,
            "init_rank": 3,
            "r_min": 2,
            "r_max": 6,
        }
    )
    report = method.prepare(model)
    kinds = {type(m) for m in model.modules()}
    assert (LowRankConv2d if model_kind == "cnn" else LowRankLinear) in kinds
    assert report.layers[-1].status == "kept"  # the output layer stays dense by default
    params = method.parameters(model)
    optimizer = (
        torch.optim.Adam(params, lr=1e-2)
        if opt == "adam"
        else torch.optim.SGD(params, lr=0.05, momentum=0.9)
    )
    batch = classification_batch(model_kind)
    first = None
    for _ in range(8):
        stats = method.train_step(model, optimizer, batch, ce_loss)
        first = float(stats["loss"]) if first is None else first
        check_invariants(method, model, optimizer)
    # The state rotated into the new bases is still used by the optimizer.
    assert any(len(s) for s in optimizer.state.values())
    assert float(ce_loss(model, batch).detach()) < first


@pytest.mark.parametrize("integrator", [*INTEGRATORS, "bug-fixed"])
def test_passes_per_batch_counts_forwards(integrator):
    torch.manual_seed(0)
    model = mlp()
    fixed = integrator.endswith("-fixed")
    integrator = integrator.removesuffix("-fixed")
    method = methods.build(
        {"name": "dlrt", "integrator": integrator, "init_rank": 4, "adaptive": not fixed}
    )
    method.prepare(model)
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-3)
    calls = []

    def counting_loss(m, b):
        calls.append(1)
        return ce_loss(m, b)

    method.train_step(model, optimizer, classification_batch("mlp"), counting_loss)
    metrics = method.epoch_metrics(model)
    # Adaptive BUG takes its S-step gradient from the first backward (the augmented point is
    # W₀); the fixed-rank BUG step evaluates a new point and needs a second pass.
    expected = {"parallel": 1, "retraction": 1, "bug": 2 if fixed else 1, "kls": 3}[integrator]
    assert len(calls) == metrics["passes_per_batch"] == expected
    # The integrator allocates more than the live factors (augmented bases and core).
    live = sum(p.numel() for p in model.parameters())
    assert metrics["params_allocated"] > live


@pytest.mark.parametrize("integrator", INTEGRATORS)
def test_full_rank_tau0_converges_to_least_squares_solution(integrator):
    torch.manual_seed(0)
    n_in, n_out, n = 6, 5, 200
    x = torch.randn(n, n_in)
    w_true, b_true = torch.randn(n_out, n_in), torch.randn(n_out)
    y = x @ w_true.T + b_true + 0.1 * torch.randn(n, n_out)
    design = torch.cat([x, torch.ones(n, 1)], 1)
    solution = torch.linalg.lstsq(design.double(), y.double()).solution.T.float()
    model = nn.Sequential(nn.Linear(n_in, n_out))
    method = methods.build(
        {
            "name": "dlrt",
            "integrator": integrator,
            "tolerance": 0.0,
            "init_rank": 1.0,
            "r_max": 1.0,
            "dense_layers": [],
            "init": "svd",
        }
    )
    method.prepare(model)
    layer = model[0]
    assert layer.rank == min(n_in, n_out)
    optimizer = torch.optim.SGD(method.parameters(model), lr=0.03)

    def mse(m, b):
        return 0.5 * ((m(b[0]) - b[1]) ** 2).sum(1).mean()

    for _ in range(350):
        method.train_step(model, optimizer, (x, y), mse)
    w = torch.cat([layer.weight_matrix().detach(), layer.bias.detach()[:, None]], 1)
    assert layer.rank == min(n_in, n_out)
    assert torch.allclose(w, solution, atol=1e-3), float((w - solution).abs().max())


def test_fixed_rank_kls_step_decreases_a_quadratic_loss():
    torch.manual_seed(1)
    x = torch.randn(128, 12)
    target = torch.randn(128, 10)
    model = nn.Sequential(nn.Linear(12, 10))
    method = methods.build(
        {"name": "dlrt", "integrator": "kls", "adaptive": False, "init_rank": 4, "dense_layers": []}
    )
    method.prepare(model)
    optimizer = torch.optim.SGD(method.parameters(model), lr=0.05)

    def quadratic(m, b):
        return 0.5 * ((m(b[0]) - b[1]) ** 2).sum(1).mean()

    batch = (x, target)
    for _ in range(5):
        before = float(quadratic(model, batch).detach())
        method.train_step(model, optimizer, batch, quadratic)
        after = float(quadratic(model, batch).detach())
        assert after < before
        assert model[0].rank == 4
        assert orth_error(model[0].U) < 1e-5 and orth_error(model[0].V) < 1e-5


@pytest.mark.parametrize("integrator", INTEGRATORS)
def test_state_transform_is_exact_for_a_change_of_bases(integrator):
    """Re-factorizing (U, S, V) → (U X⁻¹, X S Yᵀ, V Y⁻¹) leaves W unchanged; the moments of the
    gradients the integrator feeds the optimizer must transform exactly like the gradients
    themselves. The retraction installs such a change after every step (X = R of the
    Cholesky QR, a general invertible matrix); the DLRT integrators' maps of ∇_K, ∇_S, ∇_L
    are exact for rotations."""
    torch.manual_seed(2)
    layer = LowRankLinear(9, 7, rank=4, core="full")
    x = torch.randn(32, 9)

    def grads() -> dict[str, torch.Tensor]:
        w = layer.weight_matrix()
        grad_w = torch.autograd.grad((torch.tanh(x @ w.T) ** 2).sum(), w)[0]
        U, S, V = layer.U.detach(), layer.S.detach(), layer.V.detach()
        if integrator == "retraction":  # ∇U = ∇W V Sᵀ, ∇V = ∇Wᵀ U S
            return {"U": grad_w @ V @ S.T, "S": U.T @ grad_w @ V, "V": grad_w.T @ U @ S}
        return {"U": grad_w @ V, "S": U.T @ grad_w @ V, "V": grad_w.T @ U}  # ∇K, ∇S, ∇L

    before = grads()
    old = {"U": layer.U, "S": layer.S, "V": layer.V}
    U, S, V = layer.U.detach(), layer.S.detach(), layer.V.detach()
    if integrator == "retraction":
        X = torch.eye(4) + 0.3 * torch.randn(4, 4)
        Y = torch.eye(4) + 0.3 * torch.randn(4, 4)
        mapping = layer.set_factors(U @ torch.linalg.inv(X), X @ S @ Y.T, V @ torch.linalg.inv(Y))
        maps = {"U": X.T, "V": Y.T, "S": (torch.linalg.inv(X).T, torch.linalg.inv(Y))}
    else:
        A = torch.linalg.qr(torch.randn(4, 4))[0]
        B = torch.linalg.qr(torch.randn(4, 4))[0]
        mapping = layer.set_factors(U @ A, A.T @ S @ B, V @ B)
        maps = {"U": B, "V": A, "S": (A.T, B)}
    after = grads()
    transform = _state_map(layer, mapping, maps)
    for slot in ("U", "S", "V"):
        moved = transform("exp_avg", before[slot], old[slot], mapping[old[slot]])
        assert torch.allclose(moved, after[slot], atol=1e-4), slot
        sq = transform("exp_avg_sq", before[slot] ** 2, old[slot], mapping[old[slot]])
        assert (sq >= 0).all()
    assert transform("unknown_state", before["S"], old["S"], mapping[old["S"]]) is None


def test_no_stale_state_survives_a_rank_change():
    torch.manual_seed(3)
    model = mlp()
    method = methods.build({"name": "dlrt", "tolerance": 0.3, "init_rank": 8, "r_max": 8})
    method.prepare(model)
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-2)
    ranks = set()
    for step in range(10):
        method.train_step(model, optimizer, classification_batch("mlp", step), ce_loss)
        ranks |= {layer.rank for layer in low_rank_layers(model).values()}
        live = {id(p) for p in model.parameters()}
        assert all(id(p) in live for p in optimizer.state)
        for p, state in optimizer.state.items():
            assert state["exp_avg"].shape == p.shape == state["exp_avg_sq"].shape
    assert ranks != {8}  # the tolerance really changed ranks


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(2, 14),
    n=st.integers(2, 14),
    init=st.integers(1, 14),
    r_min=st.integers(1, 4),
    r_max=st.integers(1, 14),
    tau=st.sampled_from([0.0, 0.05, 0.2, 0.6]),
    integrator=st.sampled_from(INTEGRATORS),
    adaptive=st.booleans(),
    conv=st.booleans(),
)
def test_shapes_and_ranks_property(m, n, init, r_min, r_max, tau, integrator, adaptive, conv):
    torch.manual_seed(m * 31 + n)
    if conv:  # matrix view C_out × (C_in·3·3)
        model = nn.Sequential(nn.Conv2d(n, m, 3, padding=1))
        x = torch.randn(4, n, 5, 5)
    else:
        model = nn.Sequential(nn.Linear(n, m))
        x = torch.randn(8, n)
    method = methods.build(
        {
            "name": "dlrt",
            "integrator": integrator,
            "adaptive": adaptive,
            "tolerance": tau,
            "init_rank": init,
            "r_min": r_min,
            "r_max": r_max,
            "dense_layers": [],
        }
    )
    method.prepare(model)
    layer = model[0]
    lo, hi = method.rank_bounds(layer.full_rank)
    assert lo <= layer.rank <= hi <= layer.full_rank
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-2)
    target = torch.randn_like(model(x))
    for _ in range(3):
        method.train_step(
            model, optimizer, (x, target), lambda mdl, b: ((mdl(b[0]) - b[1]) ** 2).mean()
        )
        assert lo <= layer.rank <= hi
        assert orth_error(layer.U) < 1e-5 and orth_error(layer.V) < 1e-5
        assert model(x).shape == target.shape
        assert optimizer_holds_only(optimizer, model)


def test_svd_init_reproduces_the_dense_layer_and_options_validate():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(3, 6)
    expected = model(x)
    method = methods.build(
        {"name": "dlrt", "init": "svd", "init_rank": 1.0, "r_max": 1.0, "dense_layers": ["2"]}
    )
    report = method.prepare(model)
    assert [e.name for e in report.converted] == ["0"]
    assert isinstance(model[2], nn.Linear)
    assert torch.allclose(model(x), expected, atol=1e-5)
    with pytest.raises(Exception, match="integrator"):
        methods.build({"name": "dlrt", "integrator": "euler"})
    with pytest.raises(LorankError, match="dense_layers"):
        methods.build({"name": "dlrt", "dense_layers": ["0", "2"]}).prepare(
            nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
        )


def test_state_dict_round_trip():
    method = methods.build({"name": "dlrt"})
    method.step, method.truncations = 7, 5
    other = methods.build({"name": "dlrt"})
    other.load_state_dict(method.state_dict())
    assert (other.step, other.truncations) == (7, 5)


@pytest.mark.slow
def test_mnist_mlp_reaches_accuracy_at_high_compression(tmp_path, data_root):
    from lorank.training.config import load_config
    from lorank.training.trainer import train

    config = load_config(
        "configs/mnist-mlp-dlrt.toml",
        ["train.epochs=2", "train.threads=2"],
    )
    run = train(config, tmp_path / "run", data_dir=data_root, quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    # The shipped config (parallel integrator, τ = 0.15, SGD with weight decay): 96.3% at
    # 90.6% fewer parameters after 2 of its 10 epochs (98.1% at 94.3% fewer after 10).
    assert summary["test_acc"] >= 0.95
    assert summary["compression"] >= 0.88


def test_core_svd_retries_in_float64_when_lapack_returns_nan_vectors(monkeypatch):
    """MKL's float32 SVD can hand back NaN singular vectors without an error (cores with
    singular values near 1e-8): the core SVD must notice and redo it in float64; a core
    that itself holds NaN is a diverged run (FloatingPointError)."""
    import lorank.methods.dlrt as dlrt

    core = torch.diag(torch.tensor([2.0, 1.0, 1e-8]))
    real_svd = torch.linalg.svd
    calls = []

    def flaky_svd(a, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(a.dtype)
        P, sigma, Qt = real_svd(a, *args, **kwargs)
        if a.dtype == torch.float32:
            P = P.clone()
            P[:, -1] = float("nan")
        return P, sigma, Qt

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    P, sigma, Qt = dlrt._svd(core)
    assert calls == [torch.float32, torch.float64]
    assert P.dtype == torch.float32 and torch.isfinite(P).all() and torch.isfinite(Qt).all()
    assert torch.allclose((P * sigma) @ Qt, core, atol=1e-6)
    with pytest.raises(FloatingPointError, match="NaN"):
        dlrt._svd(torch.full((3, 3), float("nan")))
