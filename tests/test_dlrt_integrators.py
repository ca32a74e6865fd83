"""DLRT integrators against what the papers prove: rank growth (augmented BUG and parallel),
invariance of the step to the scale of S, orthonormal bases over long float32 runs,
first-order agreement of the three integrators, the tolerance rule after every adaptive step,
stability where plain factor descent diverges, weight decay acting on W once, and exact
K/L/S gradients from one backward (Linear and Conv2d).

The one-step ``retraction`` (the former default) fails the growth, scale-invariance and
stability properties, which is why it is not a DLRT integrator here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cnn, make_mlp, orth_error
from torch import nn

import lorank.methods as methods
from lorank.core.convert import low_rank_layers
from lorank.core.layers import LowRankConv2d, LowRankLinear
from lorank.models import LeNet5

DLRT = ["parallel", "bug", "kls"]


pytestmark = pytest.mark.usefixtures("one_thread")


def build(integrator: str, model: nn.Module, **options) -> methods.Method:
    method = methods.build({"name": "dlrt", "integrator": integrator, **options})
    method.prepare(model)
    return method


def half_squared_error(model: nn.Module, batch) -> torch.Tensor:
    return 0.5 * ((model(batch[0]) - batch[1]) ** 2).sum(1).mean()


# ---------------------------------------------------------------------- rank growth
def rank16_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with a rank-16 target W* (40×30, singular values 4 … 2), no noise."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(40, 16, generator=g))[0]
    v = torch.linalg.qr(torch.randn(30, 16, generator=g))[0]
    target = u @ torch.diag(torch.linspace(4, 2, 16)) @ v.T
    x = torch.randn(400, 30, generator=g)
    return x, x @ target.T


def fit(integrator: str, opt: str, lr: float, steps: int = 200) -> tuple[int, float, float]:
    x, y = rank16_problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40, bias=False))
    options = {"tolerance": 0.01, "init_rank": 2, "r_min": 2, "r_max": 30, "dense_layers": []}
    method = build(integrator, model, **options)
    params = method.parameters(model)
    optimizer = torch.optim.SGD(params, lr=lr) if opt == "sgd" else torch.optim.Adam(params, lr)
    start = float(half_squared_error(model, (x, y)).detach())
    for _ in range(steps):
        method.train_step(model, optimizer, (x, y), half_squared_error)
    return model[0].rank, start, float(half_squared_error(model, (x, y)).detach())


@pytest.mark.parametrize("integrator", DLRT)
def test_rank_grows_from_2_to_a_rank_16_target_with_sgd(integrator):
    # The former default stayed at rank 2 (loss ≈ 58 here): its core had rank ≤ r.
    rank, start, end = fit(integrator, "sgd", lr=0.3)
    assert rank >= 16, rank
    assert end < 1e-6 * start, (start, end)


@pytest.mark.parametrize("integrator", ["parallel", "bug"])
def test_rank_grows_with_adam_where_the_dense_layer_converges(integrator):
    """Adam's steps are ~η per entry whatever the gradient, so a new direction must clear
    τ‖σ‖ within one step: growth needs η large against τ‖W‖ (at lr 0.01 neither grows on
    this problem). At lr 0.1 the dense layer converges, and so does the low-rank fit, to
    the target's rank: the mean second moment given to new directions keeps noise
    directions (fresh zero moments) from being kept too."""
    x, y = rank16_problem()
    torch.manual_seed(0)
    dense = nn.Linear(30, 40, bias=False)
    optimizer = torch.optim.Adam(dense.parameters(), lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        half_squared_error(dense, (x, y)).backward()
        optimizer.step()
    assert float(half_squared_error(dense, (x, y)).detach()) < 1e-4
    rank, start, end = fit(integrator, "adam", lr=0.1)
    assert 16 <= rank <= 18, rank
    assert end < 1e-5 * start, (start, end)


# ---------------------------------------------------------------------- scale invariance
@pytest.mark.parametrize("integrator", DLRT)
def test_step_is_invariant_to_the_scale_of_S(integrator):
    """One SGD step on the linear loss ⟨G, W⟩ from S = σI moves W by h·‖P(G)‖ (the
    projection onto the tangent space, or onto the augmented bases), whatever σ. The
    one-step retraction (the former default) moves it by 3.4 / 17.0 / 1640 (×h) here for
    σ = 0.1 / 1 / 10."""
    g = torch.Generator().manual_seed(1)
    G = torch.randn(30, 20, generator=g, dtype=torch.float64)
    norms = []
    for sigma in (0.1, 1.0, 10.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 30, bias=False)).double()
        method = build(
            integrator, model, tolerance=0.0, init_rank=4, r_min=1, r_max=20, dense_layers=[]
        )
        layer = model[0]
        with torch.no_grad():
            layer.S.copy_(sigma * torch.eye(4, dtype=torch.float64))
        before = layer.weight_matrix().detach().clone()
        optimizer = torch.optim.SGD(method.parameters(model), lr=1e-2)
        # model(I) = Wᵀ, so the loss is ⟨G, W⟩ and ∇W = G.
        eye = torch.eye(20, dtype=torch.float64)
        method.train_step(model, optimizer, (eye, G.T), lambda m, b: (m(b[0]) * b[1]).sum())
        norms.append(float(torch.linalg.norm(layer.weight_matrix().detach() - before)))
    assert norms[0] > 0
    for n in norms[1:]:
        assert abs(n - norms[0]) <= 1e-5 * norms[0], norms


# ---------------------------------------------------------------------- orthonormality
@pytest.mark.slow
@pytest.mark.parametrize("integrator", DLRT)
def test_bases_stay_orthonormal_over_2000_float32_adam_steps(integrator):
    """784-500-500-10 MLP, Adam lr 1e-3, 2,000 steps in float32 (random teacher data):
    max|UᵀU - I| ≤ 1e-5 for every layer at the end (without re-orthonormalisation KLS
    drifted to 9e-2 after 1,000 steps)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 10))
    model = nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10)
    )
    method = build(integrator, model, tolerance=0.1, init_rank=32, r_max=64)
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        x = torch.randn(32, 784, generator=g)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        method.train_step(model, optimizer, (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    for name, layer in low_rank_layers(model).items():
        assert orth_error(layer.U) <= 1e-5, (name, orth_error(layer.U))
        assert orth_error(layer.V) <= 1e-5, (name, orth_error(layer.V))


# ---------------------------------------------------------------------- one-pass BUG
@pytest.mark.parametrize("make", [lambda: make_mlp(12, 20, 16, 4), make_cnn], ids=["mlp", "cnn"])
def test_one_pass_bug_equals_the_two_pass_form(make):
    """The adaptive BUG step's augmented point Û S̃₀ V̂ᵀ is W₀, so the S-step gradient
    assembled from the first backward (∇_S, ∇_Lᵀ Ṽ, Ũᵀ ∇_K and Ũᵀ ∇W Ṽ from the stashed
    inputs and output gradients; Conv2d by convolutions) must give the update of the second
    forward/backward exactly: same weights, biases, ranks after 6 Adam steps, float64."""
    g = torch.Generator().manual_seed(4)
    cnn = make is make_cnn
    x = torch.randn(32, *((3, 8, 8) if cnn else (12,)), generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (32,), generator=g)

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    def train(one_pass: bool) -> nn.Module:
        model = make().double()
        method = build("bug", model, tolerance=0.0, init_rank=2, r_max=0.5, init="svd")
        method.one_pass_bug = one_pass
        optimizer = torch.optim.Adam(method.parameters(model), lr=3e-2)
        for _ in range(6):
            method.train_step(model, optimizer, (x, y), loss)
        assert method.passes_per_batch() == (1 if one_pass else 2)
        return model

    one, two = train(True), train(False)
    ranks = {name: layer.rank for name, layer in low_rank_layers(one).items()}
    assert ranks == {name: layer.rank for name, layer in low_rank_layers(two).items()}
    assert any(r > 2 for r in ranks.values()), ranks  # the augmented blocks were used
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        if a.shape != b.shape:  # U, V, S in different but equivalent bases: compare W
            continue
        assert torch.allclose(a, b, atol=1e-9), name
    for name, layer in low_rank_layers(one).items():
        other = low_rank_layers(two)[name]
        assert torch.allclose(layer.weight_matrix(), other.weight_matrix(), atol=1e-9), name


# ---------------------------------------------------------------------- batching
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_parallel_step_batched_over_equal_layers_equals_one_layer_at_a_time(adaptive, monkeypatch):
    """The parallel step's small linear algebra and optimizer-state maps run once per group
    of equal-shape layers (issue 21): the same 20 Adam steps taken one layer at a time give
    the same weights and ranks (float64, to round-off), and the batched run really grouped
    the three 32×32 layers."""
    from lorank.methods.dlrt import DLRT as Integrators

    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(6))
    group = Integrators._parallel_lean_group

    def train(batched: bool) -> tuple[nn.Module, list[int]]:
        sizes: list[int] = []

        def spy(self, items, optimizer, adapt):  # noqa: ANN001, ANN202
            sizes.append(len(items))
            return group(self, items, optimizer, adapt)

        with monkeypatch.context() as patch:
            patch.setattr(Integrators, "_parallel_lean_group", spy)
            model = make_mlp(24, 32, 32, 32, 32, 4).double()
            method = build("parallel", model, adaptive=adaptive, tolerance=0.3, init_rank=6)
            method.batch_layers = batched
            optimizer = torch.optim.Adam(method.parameters(model), lr=2e-2)
            for _ in range(20):
                method.train_step(
                    model, optimizer, (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1])
                )
        return model, sizes

    (batched, sizes), (single, single_sizes) = train(True), train(False)
    assert max(sizes) == 3 and max(single_sizes) == 1, (sizes, single_sizes)
    ranks = {name: layer.rank for name, layer in low_rank_layers(batched).items()}
    assert ranks == {name: layer.rank for name, layer in low_rank_layers(single).items()}
    if adaptive:
        assert min(ranks.values()) < 6, ranks  # ranks changed, so groups split by rank
    for name, layer in low_rank_layers(batched).items():
        other = low_rank_layers(single)[name].weight_matrix()
        assert torch.allclose(layer.weight_matrix(), other, atol=1e-10), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lean_parallel_step_equals_the_explicit_one_for_poorly_separated_steps(dtype, monkeypatch):
    """The parallel step's Gram-only path (lean) takes steps whose new directions are weak
    next to the step (squared size 1e-3 of its largest column, inside LEAN_SEPARATION) and
    gives the W of the explicit path (projections and Cholesky QR of the residual): to
    round-off in float64, 1e-5 in float32."""
    import lorank.methods.dlrt as dlrt

    m, n, r = 40, 30, 6
    g = torch.Generator().manual_seed(3)
    U0 = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    basis_v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    outside = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    outside = torch.linalg.qr(outside - U0 @ (U0.T @ outside))[0]
    # ∇W V₀ leaves span(U₀) with column sizes 1 … 10^-1.5 (squared ratio 1e-3)
    G = outside @ torch.diag(torch.logspace(0, -1.5, r, dtype=torch.float64)) @ basis_v.T
    G = G + 0.1 * U0 @ torch.randn(r, n, generator=g, dtype=torch.float64)
    took = []
    lean = dlrt.DLRT._parallel_lean

    def step(separation: float) -> torch.Tensor:
        monkeypatch.setattr(dlrt, "LEAN_SEPARATION", separation)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(n, m, bias=False)).to(dtype)
        method = build("parallel", model, adaptive=False, init_rank=r, dense_layers=[])
        layer = model[0]
        with torch.no_grad():
            layer.U.copy_(U0)
            layer.V.copy_(basis_v)
            layer.S.copy_(torch.diag(torch.linspace(3, 1, r, dtype=torch.float64)))
        method.step = 1  # not a step of the periodic explicit re-orthonormalisation

        def spy(self, steps, optimizer, adapt):  # noqa: ANN001, ANN202
            left = lean(self, steps, optimizer, adapt)
            took.append(len(left) == 0)
            return left

        monkeypatch.setattr(dlrt.DLRT, "_parallel_lean", spy)
        optimizer = torch.optim.SGD(method.parameters(model), lr=0.1)
        eye = torch.eye(n, dtype=dtype)  # model(I) = Wᵀ: the loss is ⟨G, W⟩
        method.train_step(
            model, optimizer, (eye, G.T.to(dtype)), lambda m, b: (m(b[0]) * b[1]).sum()
        )
        return layer.weight_matrix().detach().double()

    lean_w, explicit_w = step(dlrt.LEAN_SEPARATION), step(10.0)
    assert took == [True, False]  # the lean path took it; 10.0 forces the explicit one
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.linalg.norm(lean_w - explicit_w) <= tolerance * torch.linalg.norm(explicit_w)


# ---------------------------------------------------------------------- first order
@pytest.mark.parametrize("mode", ["fixed", "adaptive-to-r", "adaptive-growing"])
def test_integrators_agree_to_first_order(mode):
    """For a step h, the W-updates of bug, parallel and kls agree to O(h²): halving h
    divides their difference by ≈ 4, while each update is ≈ -h P_T(G) (P_T: projection on
    the tangent space at W₀). bug and kls are the same algorithm (∇_K, ∇_L from one custom
    backward or from two autograd passes) and agree to round-off (1e-7 relative). When the
    rank may grow (τ = 0, r_max = 2r), BUG's Galerkin step also keeps the normal component
    of G within the augmented bases, an O(h) term that is what lets its rank grow at first
    order; its tangent part still agrees with the parallel step to O(h²)."""
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randn(64, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(m, b):
        return 0.5 * ((torch.tanh(m(b[0])) - b[1]) ** 2).sum(1).mean()

    def update(integrator: str, h: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 10)).double()
        r_max = 6 if mode == "adaptive-growing" else 3
        method = build(
            integrator,
            model,
            adaptive=mode != "fixed",
            tolerance=0.0,
            init_rank=3,
            r_min=1,
            r_max=r_max,
            dense_layers=[],
        )
        layer = model[0]
        U0, V0 = layer.U.detach().clone(), layer.V.detach().clone()
        before = layer.weight_matrix().detach().clone()
        optimizer = torch.optim.SGD(method.parameters(model), lr=h)
        method.train_step(model, optimizer, (x, y), loss)
        return layer.weight_matrix().detach() - before, U0, V0

    def tangent(d: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        pu, pv = U @ U.T, V @ V.T
        return pu @ d + d @ pv - pu @ d @ pv

    diffs = []
    for h in (1e-2, 5e-3):
        (par, U0, V0), (bug, _, _), (kls, _, _) = (update(i, h) for i in DLRT)
        # The same algorithm: round-off apart (bug takes its new directions from Gram
        # matrices, error ~κ²·eps; kls projects twice), far below the O(h) differences below.
        assert torch.linalg.norm(bug - kls) <= 1e-7 * torch.linalg.norm(bug)
        if mode == "adaptive-growing":
            # Untruncated, the parallel step lies exactly in the tangent space.
            assert torch.linalg.norm(par - tangent(par, U0, V0)) <= 1e-6 * torch.linalg.norm(par)
            bug = tangent(bug, U0, V0)
        diffs.append(float(torch.linalg.norm(par - bug) / torch.linalg.norm(par)))
    if mode == "adaptive-growing":  # one SGD step: both tangent parts are -h P_T(G) exactly
        assert max(diffs) < 1e-6, diffs
        return
    # relative difference O(h): the absolute difference O(h²)
    assert 0 < diffs[0] < 0.1, diffs
    assert 1.5 < diffs[0] / diffs[1] < 2.5, diffs


# ---------------------------------------------------------------------- truncation
@pytest.mark.parametrize("integrator", DLRT)
def test_tolerance_rule_holds_after_every_adaptive_step(integrator):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU())
    tau = 0.2
    method = build(integrator, model, tolerance=tau, init_rank=4, r_min=1, r_max=8, dense_layers=[])
    optimizer = torch.optim.Adam(method.parameters(model), lr=3e-2)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 20, generator=g), torch.randn(64, 12, generator=g)
    for _ in range(15):
        method.train_step(model, optimizer, (x, y), half_squared_error)
        layers = low_rank_layers(model)
        assert set(method.last_spectra) == set(layers)
        for name, (sigma, r) in method.last_spectra.items():
            layer = layers[name]
            assert layer.rank == r
            norm = float(torch.linalg.norm(sigma))
            tail = float(torch.linalg.norm(sigma[r:]))
            if r < 8:  # not clamped at r_max
                assert tail <= tau * norm + 1e-6, (name, tail, norm)
            if r > 1:  # the smallest such rank
                assert float(torch.linalg.norm(sigma[r - 1 :])) > tau * norm
            # What is installed is the truncated core itself.
            torch.testing.assert_close(layer.singular_values(), sigma[:r], rtol=1e-4, atol=1e-5)
            assert orth_error(layer.U) < 1e-5 and orth_error(layer.V) < 1e-5


# ---------------------------------------------------------------------- stability
@pytest.mark.parametrize("integrator", DLRT)
def test_batch_one_sgd_stays_finite(integrator):
    """128-96-64-10 MLP, SGD lr 0.05, batch 1, 1,000 steps on inputs of scale 3 (so the
    gradients are large): the one-step retraction (the former default) reaches NaN at step
    68 here; dense training and the DLRT integrators stay finite."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    method = build(integrator, model)
    optimizer = torch.optim.SGD(method.parameters(model), lr=0.05)
    g = torch.Generator().manual_seed(0)
    xs = 3 * torch.randn(1000, 128, generator=g)
    ys = torch.randint(0, 10, (1000,), generator=g)
    for i in range(1000):
        stats = method.train_step(
            model,
            optimizer,
            (xs[i : i + 1], ys[i : i + 1]),
            lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        )
        assert math.isfinite(float(stats["loss"])), i
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------- weight decay
@pytest.mark.parametrize("integrator", [*DLRT, "retraction"])
def test_adamw_weight_decay_shrinks_W_once(integrator):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 10))
    method = build(integrator, model, init_rank=3, tolerance=0.0, r_max=3, dense_layers=[])
    before = model[0].weight_matrix().detach().clone()
    optimizer = torch.optim.AdamW(method.parameters(model), lr=0.1, weight_decay=0.5)
    x = torch.randn(8, 12)
    # A loss with zero gradient: Adam's update is 0, only the decay acts.
    method.train_step(model, optimizer, (x,), lambda m, b: 0.0 * m(b[0]).sum())
    after = model[0].weight_matrix().detach()
    torch.testing.assert_close(after, (1 - 0.1 * 0.5) * before, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- gradients, conv
@pytest.mark.parametrize(
    "make",
    [
        lambda: (LowRankLinear(9, 7, 4, core="full"), torch.randn(5, 3, 9)),
        lambda: (
            LowRankConv2d(3, 6, 3, 4, stride=2, padding=1, core="full"),
            torch.randn(2, 3, 9, 9),
        ),
        lambda: (
            LowRankConv2d(3, 6, (2, 3), 4, padding="same", dilation=(1, 2), core="full"),
            torch.randn(2, 3, 8, 9),
        ),
    ],
)
def test_kls_gradients_are_exact(make):
    """The K/L/S gradient mode gives ∇W V, ∇Wᵀ U, Uᵀ ∇W V and the usual input and bias
    gradients, checked against the dense layer in float64."""
    torch.manual_seed(7)
    layer, x = make()
    layer, x = layer.double(), x.double().requires_grad_()
    with torch.no_grad():
        layer.S.add_(0.3 * torch.randn_like(layer.S))
    dense = layer.to_dense().double()
    (dense(x) ** 3).sum().backward()
    grad_x, grad_w = x.grad.clone(), dense.weight.grad.flatten(1)
    x.grad = None
    U, V = layer.U.detach(), layer.V.detach()
    layer.kls_gradients = True
    y = layer(x)
    torch.testing.assert_close(y, dense(x))
    (y**3).sum().backward()
    torch.testing.assert_close(layer.U.grad, grad_w @ V)
    torch.testing.assert_close(layer.V.grad, grad_w.T @ U)
    torch.testing.assert_close(layer.S.grad, U.T @ grad_w @ V)
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)


@pytest.mark.parametrize("integrator", [*DLRT, "retraction"])
def test_lenet5_trains_with_every_integrator(integrator):
    torch.manual_seed(8)
    model = LeNet5((1, 28, 28), 10)
    method = build(integrator, model, tolerance=0.1)
    assert any(isinstance(m, LowRankConv2d) for m in model.modules())
    optimizer = torch.optim.Adam(method.parameters(model), lr=3e-3)
    g = torch.Generator().manual_seed(9)
    batch = (torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))

    def ce(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    first = float(ce(model, batch).detach())
    for _ in range(6):
        method.train_step(model, optimizer, batch, ce)
    assert float(ce(model, batch).detach()) < first
    for layer in low_rank_layers(model).values():
        assert orth_error(layer.U) < 1e-5 and orth_error(layer.V) < 1e-5
