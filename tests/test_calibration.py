"""Calibration statistics, activation-aware truncated SVD and rank allocation under a budget."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorank.compress.allocation import allocate, budget_search, weight_params
from lorank.compress.calibration import (
    activation_layer_spectra,
    activation_spectra,
    activation_svd,
    collect_second_moments,
    damped_cholesky,
    layer_input_rows,
    read_calibration_file,
)
from lorank.core.layers import LowRankConv2d, LowRankLinear
from lorank.core.search import layer_spectra
from lorank.errors import LorankError


@pytest.fixture(autouse=True)
def float64():
    # Exact identities are checked to float64 precision; restore the default for other files.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _anisotropic_inputs(rows, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, n, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    return (torch.randn(rows, n, generator=g) * scales) @ mix.T


def _truncate(u, sigma, v, r):
    return (u[:, :r] * sigma[:r]) @ v[:, :r].T


def _plain_truncation(w, r):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return _truncate(u, s, vh.T, r)


def test_activation_factors_reproduce_w_and_minimise_the_activation_error():
    g = torch.Generator().manual_seed(1)
    m, n, r = 12, 10, 3
    w = torch.randn(m, n, generator=g)
    x = _anisotropic_inputs(500, n)
    c = x.T @ x / len(x)
    u, sigma, v = activation_svd(w, c, damping=0.0)
    torch.testing.assert_close(_truncate(u, sigma, v, n), w)  # full rank: exact W
    act = _truncate(u, sigma, v, r)
    plain = _plain_truncation(w, r)
    err_act = torch.linalg.norm((w - act) @ x.T)
    err_plain = torch.linalg.norm((w - plain) @ x.T)
    assert err_act < 0.7 * err_plain  # the constructed case where they differ a lot
    # The error is the tail of the activation-weighted spectrum.
    torch.testing.assert_close(err_act**2 / len(x), sigma[r:].pow(2).sum())
    # Closed form with the symmetric square root: W_r = [W C^½]_r C^-½ (independent of L).
    evals, evecs = torch.linalg.eigh(c)
    root = (evecs * evals.sqrt()) @ evecs.T
    inv_root = (evecs / evals.sqrt()) @ evecs.T
    torch.testing.assert_close(act, _plain_truncation(w @ root, r) @ inv_root)
    # And no other rank-r matrix does better: random perturbations of the optimum.
    for _ in range(20):
        du = torch.randn(m, r, generator=g) * 1e-2
        other = act + du @ torch.randn(r, n, generator=g) * 1e-2
        other = _plain_truncation(other, r)
        assert torch.linalg.norm((w - other) @ x.T) >= err_act - 1e-9


def test_identity_second_moment_is_plain_svd():
    w = torch.randn(7, 9, generator=torch.Generator().manual_seed(2))
    u, sigma, v = activation_svd(w, torch.eye(9), damping=0.0)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(w))
    for r in (1, 3, 6):
        torch.testing.assert_close(_truncate(u, sigma, v, r), _plain_truncation(w, r))


def test_low_rank_layer_never_forming_w_matches_its_dense_matrix():
    torch.manual_seed(3)
    layer = LowRankLinear.from_linear(nn.Linear(10, 14), rank=6, core="full")
    x = _anisotropic_inputs(300, 10, seed=3)
    c = x.T @ x / len(x)
    u1, s1, v1 = activation_svd(layer, c)
    u2, s2, v2 = activation_svd(layer.weight_matrix().detach(), c)
    torch.testing.assert_close(s1, s2[:6])
    for r in (2, 5):
        torch.testing.assert_close(_truncate(u1, s1, v1, r), _truncate(u2, s2, v2, r))


def test_singular_second_moment_is_damped():
    x = torch.randn(3, 8)  # rank 3 < n = 8
    c = x.T @ x
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(c)
    chol, lam = damped_cholesky(c, 1e-4)
    assert lam > 0
    torch.testing.assert_close(chol @ chol.T, c + lam * torch.eye(8))
    u, sigma, v = activation_svd(torch.randn(5, 8), c)
    assert torch.isfinite(u).all() and torch.isfinite(v).all() and torch.isfinite(sigma).all()


def test_hooks_accumulate_exactly_xtx_and_are_removed():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    batches = [(torch.randn(3, 7, 6), None), (torch.randn(2, 7, 6), None)]  # tokens are rows
    stats = collect_second_moments(model, {"0": model[0], "2": model[2]}, batches)
    x0 = torch.cat([b[0].reshape(-1, 6) for b in batches])
    x2 = torch.relu(model[0](x0))
    torch.testing.assert_close(stats["0"].xtx, x0.T @ x0)
    torch.testing.assert_close(stats["2"].xtx, x2.T @ x2)
    assert stats["0"].rows == stats["2"].rows == 35
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_hooks_are_removed_when_the_forward_fails():
    model = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(RuntimeError):
        collect_second_moments(model, {"0": model[0]}, [(torch.randn(2, 3), None)])
    assert not model[0]._forward_pre_hooks


def test_chunked_accumulation_equals_one_matmul():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(9, 2))
    x = torch.randn(1000, 9)
    stats = collect_second_moments(model, {"0": model[0]}, [(x, None)], chunk_rows=64)
    torch.testing.assert_close(stats["0"].xtx, x.T @ x)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
        dict(kernel_size=4, padding="same"),
        dict(kernel_size=3, padding="valid"),
    ],
)
def test_conv_rows_are_the_unfolded_patches_of_the_weight_matrix(kwargs):
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 5, **kwargs)
    x = torch.randn(2, 3, 9, 8)
    rows = layer_input_rows(conv, x)
    out = conv(x)  # B×C_out×H×W: every output pixel is W·patch + bias
    expected = out.permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(rows @ conv.weight.flatten(1).T + conv.bias, expected)
    stats = collect_second_moments(nn.Sequential(conv), {"0": conv}, [(x, None)])
    torch.testing.assert_close(stats["0"].xtx, rows.T @ rows)


def test_low_rank_conv_rows_match_its_weight_matrix():
    torch.manual_seed(7)
    layer = LowRankConv2d.from_conv(nn.Conv2d(3, 6, 3, stride=2, padding=1), rank=4)
    x = torch.randn(2, 3, 8, 8)
    rows = layer_input_rows(layer, x)
    expected = layer(x).permute(0, 2, 3, 1).reshape(-1, 6)
    torch.testing.assert_close(rows @ layer.weight_matrix().T + layer.bias, expected)


def test_activation_spectra_of_a_conv_net_lower_the_output_error():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
    x = torch.randn(16, 3, 10, 10) * torch.tensor([3.0, 1.0, 0.05]).view(1, 3, 1, 1)
    layers = {"0": model[0], "2": model[2]}
    plain = layer_spectra(model, layers)
    act = activation_spectra(plain, collect_second_moments(model, layers, [(x, None)]))
    rows = layer_input_rows(model[0], x)
    w = model[0].weight.flatten(1).detach()
    for r in (1, 2, 4):
        e_act = torch.linalg.norm((w - _truncate(act[0].u, act[0].sigma, act[0].v, r)) @ rows.T)
        e_plain = torch.linalg.norm(
            (w - _truncate(plain[0].u, plain[0].sigma, plain[0].v, r)) @ rows.T
        )
        assert e_act <= e_plain + 1e-9


def test_unknown_layer_cannot_be_calibrated():
    with pytest.raises(LorankError, match="cannot calibrate a ConvTranspose2d"):
        layer_input_rows(nn.ConvTranspose2d(3, 4, 2), torch.zeros(1, 3, 4, 4))
    with pytest.raises(LorankError, match="depthwise"):
        layer_input_rows(nn.Conv2d(3, 3, 3, groups=3), torch.zeros(1, 3, 4, 4))


def test_embedding_rows_are_one_hot():
    # y = W x with W = Eᵀ and x the one-hot row of each id: XᵀX counts the tokens.
    emb = nn.Embedding(5, 3)
    ids = torch.tensor([[0, 2, 2], [4, 0, 0]])
    rows = layer_input_rows(emb, ids)
    assert rows.shape == (6, 5)
    torch.testing.assert_close(rows @ emb.weight, emb(ids).reshape(6, 3))
    torch.testing.assert_close(torch.diagonal(rows.T @ rows), torch.tensor([3.0, 0, 2, 0, 1]))


# ---------------------------------------------------------------------- allocation


def _spectra(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(n, m) for m, n in shapes])
    for layer in model:
        with torch.no_grad():
            layer.weight.mul_(torch.rand(1, generator=g) * 3)
    return layer_spectra(model)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(2, 24), st.integers(2, 24)), min_size=1, max_size=4),
    budget=st.floats(0.3, 1.0),
    method=st.sampled_from(["greedy", "uniform"]),
    seed=st.integers(0, 100),
)
def test_allocation_respects_the_budget_and_never_increases_a_rank(shapes, budget, method, seed):
    spectra = _spectra(shapes, seed)
    before = sum(weight_params(s, s.full_rank) for s in spectra)
    try:
        ranks = allocate(spectra, budget, method)
    except LorankError as e:  # only when rank 1 everywhere is still too big
        assert "cannot be met" in str(e)
        assert sum(weight_params(s, 1) for s in spectra) > budget * before
        return
    assert sum(weight_params(s, ranks[s.name]) for s in spectra) <= budget * before
    for s in spectra:
        assert 1 <= ranks[s.name] <= s.full_rank
        assert ranks[s.name] == s.full_rank or ranks[s.name] <= s.max_rank


def test_greedy_takes_rank_from_the_layer_with_the_flat_spectrum_last():
    # Layer a is exactly rank 2, layer b is isotropic: greedy removes a's zero directions first.
    a = nn.Linear(20, 20, bias=False)
    b = nn.Linear(20, 20, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.randn(20, 2) @ torch.randn(2, 20))
        b.weight.copy_(torch.linalg.qr(torch.randn(20, 20))[0])
    spectra = layer_spectra(nn.Sequential(a, b))
    ranks = allocate(spectra, 0.5, "greedy")
    assert ranks["0"] <= 2
    assert ranks["1"] > ranks["0"]
    assert allocate(spectra, 1.0, "greedy") == {"0": 20, "1": 20}


def test_bad_budget_is_an_error():
    spectra = _spectra([(4, 4)], 0)
    with pytest.raises(LorankError, match="budget"):
        allocate(spectra, 0.0)
    with pytest.raises(LorankError, match="allocation"):
        allocate(spectra, 0.5, "random")  # type: ignore[arg-type]


def test_conv_layer_patches_match_functional_unfold():
    x = torch.randn(1, 2, 5, 5)
    conv = nn.Conv2d(2, 3, 2)
    rows = layer_input_rows(conv, x)
    torch.testing.assert_close(rows, F.unfold(x, 2).transpose(1, 2).reshape(-1, 8))


@pytest.mark.parametrize("method", ["greedy", "uniform"])
def test_budget_search_returns_the_smallest_feasible_budget_and_restores_the_model(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    x = _anisotropic_inputs(256, 16)
    target = model(x).detach()
    batches = [(x[i : i + 64], target[i : i + 64]) for i in range(0, 256, 64)]

    def loss(m, batch):
        return F.mse_loss(m(batch[0]), batch[1])

    state = {k: v.clone() for k, v in model.state_dict().items()}
    spectra = layer_spectra(model)
    eps, precision = 1e-2, 0.02
    result = budget_search(model, batches, loss, eps, spectra, method, precision)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])  # trials only
    assert result.loss_before == 0.0 and abs(result.loss_after) < eps
    assert result.ranks == allocate(spectra, result.budget, method)
    assert 0 < result.budget < 1
    # The bisection's last infeasible budget is within the precision below the answer.
    infeasible = [t["budget"] for t in result.trials if not t["feasible"]]
    assert infeasible and 0 < result.budget - max(infeasible) <= precision
    with pytest.raises(LorankError, match="loss tolerance"):
        budget_search(model, batches, loss, 0.0, spectra, method)


def test_calibration_file_formats(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    x = torch.arange(6.0).reshape(2, 3)
    torch.save((x, torch.zeros(2)), tmp_path / "pair.pt")
    torch.save({"input_ids": x.long()}, tmp_path / "dict.pth")
    save_file({"x": x.float()}, tmp_path / "x.safetensors")
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "t.txt").write_text("to be")
    assert torch.equal(read_calibration_file(tmp_path / "pair.pt"), x)
    assert torch.equal(read_calibration_file(tmp_path / "dict.pth"), x.long())
    assert torch.equal(read_calibration_file(tmp_path / "x.safetensors"), x.float())
    assert torch.equal(read_calibration_file(tmp_path / "x.npy"), x)
    assert read_calibration_file(tmp_path / "t.txt") == "to be"
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp_path / "empty.txt").write_text("")
    for name, message in [
        ("missing.pt", "not found"),
        ("latin1.txt", "UTF-8"),
        ("empty.txt", "empty"),
    ]:
        with pytest.raises(LorankError, match=message):
            read_calibration_file(tmp_path / name)


def _decaying_layer(decay, n, g):
    q1 = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    q2 = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    layer = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(q1 @ torch.diag(decay ** torch.arange(n, dtype=torch.float64)) @ q2.T)
    return layer


def _relative_error(spectra, ranks):
    return sum(float(s.sigma[ranks[s.name] :].pow(2).sum() / s.sigma.pow(2).sum()) for s in spectra)


@pytest.mark.parametrize("budget", [0.75, 0.5, 0.3])
def test_greedy_prices_a_dense_layers_first_cut_by_its_best_jump(budget):
    # Square dense layers: factorizing at max_rank saves almost nothing (63·256 vs 128²), so a
    # greedy that priced the first cut as that jump stripped one layer (to rank 1 at budget
    # 0.5) and left the others dense, with twice the uniform allocation's error. With the
    # look-ahead, refill and exchange no layer is stripped, the budget is filled, and the
    # estimated error is below the uniform allocation's.
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[_decaying_layer(d, 128, g) for d in (0.97, 0.98, 0.99)])
    spectra = layer_spectra(model)
    ranks = allocate(spectra, budget, "greedy")
    uniform = allocate(spectra, budget, "uniform")
    assert all(8 <= ranks[s.name] for s in spectra)
    used = sum(weight_params(s, ranks[s.name]) for s in spectra)
    assert budget * 3 * 128 * 128 - 256 < used <= budget * 3 * 128 * 128
    assert _relative_error(spectra, ranks) <= _relative_error(spectra, uniform)


def _whitened_error(w, w_r, c):
    e = (w - w_r).double()
    return float(torch.trace(e @ c @ e.T))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_float32_svd_of_the_whitened_matrix_matches_float64(shape):
    # The SVD runs in float32 for a float32 weight (Cholesky and solve stay float64): the
    # rank-r factors must minimise the activation error as well as the float64 ones do.
    m, n = shape
    g = torch.Generator().manual_seed(11)
    w = torch.randn(m, n, generator=g).float()
    x = _anisotropic_inputs(2000, n, seed=11)
    c = x.T @ x / len(x)
    u32, s32, v32 = activation_svd(w, c, svd_dtype=torch.float32)
    u64, s64, v64 = activation_svd(w.double(), c, svd_dtype=torch.float64)
    assert u32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), s64, rtol=1e-5, atol=1e-6 * float(s64[0]))
    for r in (1, 5, 12):
        e32 = _whitened_error(w, _truncate(u32, s32, v32, r), c)
        e64 = _whitened_error(w, _truncate(u64, s64, v64, r), c)
        assert e32 == pytest.approx(e64, rel=1e-4, abs=1e-9 * float(s64[0]) ** 2)


def test_spectra_straight_from_the_layers_equal_those_from_plain_spectra():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))
    layers = {"0": model[0], "2": model[2]}
    batches = [(torch.randn(64, 12),) for _ in range(3)]
    moments = collect_second_moments(model, layers, batches)
    direct = activation_layer_spectra(layers, moments)
    via_plain = activation_spectra(layer_spectra(model, layers), moments)
    for a, b in zip(direct, via_plain, strict=True):
        assert (a.name, a.max_rank) == (b.name, b.max_rank)
        torch.testing.assert_close(a.sigma, b.sigma)
        torch.testing.assert_close(_truncate(a.u, a.sigma, a.v, 4), _truncate(b.u, b.sigma, b.v, 4))
