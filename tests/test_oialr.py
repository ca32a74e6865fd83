"""OIALR: the switch preserves the function and moves optimizer state; basis updates preserve
U S Vᵀ, truncate by the cutoff rule, and keep the optimizer consistent; stability metric."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorank.core.convert import low_rank_layers
from lorank.core.layers import LowRankLayer
from lorank.core.optim import optimizer_holds_only
from lorank.errors import LorankError
from lorank.methods import build
from lorank.methods.oialr import OIALR, basis_stability

torch.set_num_threads(1)


def mlp() -> nn.Module:
    return make_mlp(12, 10, 9, 3, seed=None)


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 4),
    )


def batch_for(model: nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    classes = model[-1].out_features
    if isinstance(model[1], nn.ReLU) and len(model) == 6:  # the convnet
        return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    inputs = model[0].in_features
    return torch.randn(16, inputs, generator=g), torch.randint(0, classes, (16,), generator=g)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def start(model: nn.Module, opt: str = "adam", **options) -> tuple[OIALR, torch.optim.Optimizer]:
    method = build({"name": "oialr", **options})
    method.prepare(model)
    params = method.parameters(model)
    if opt == "adam":
        optimizer = torch.optim.Adam(params, lr=1e-2)
    else:
        optimizer = torch.optim.SGD(params, lr=5e-2, momentum=0.9)
    return method, optimizer


def train(method, model, optimizer, steps: int, seed: int = 0) -> None:
    for i in range(steps):
        method.train_step(model, optimizer, batch_for(model, seed + i), loss_fn)


def product(layer: LowRankLayer) -> torch.Tensor:
    return (layer.U.double() @ layer.S.double() @ layer.V.double().T).detach()


@pytest.mark.parametrize("factory", [mlp, convnet])
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_switch_preserves_outputs_and_moves_optimizer_state(factory, opt):
    torch.manual_seed(0)
    model = factory()
    method, optimizer = start(model, opt, delay=3, frequency=100)
    train(method, model, optimizer, 2)
    assert not method.switched
    # Take step 3 by hand so the outputs can be compared right around the switch.
    optimizer.zero_grad()
    loss_fn(model, batch_for(model, 2)).backward()
    optimizer.step()
    method.step += 1
    x, _ = batch_for(model, 99)
    with torch.no_grad():
        before = model(x)
    old_weights = {
        n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
    }
    old_biases = {
        n: m.bias for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
    }
    old_state = {
        n: {k: v.clone() for k, v in optimizer.state[w].items()} for n, w in old_weights.items()
    }
    bias_state = {n: optimizer.state[b] for n, b in old_biases.items()}
    method.after_step(model, optimizer)
    assert method.switched and method.switch_step == 3
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)

    layers = low_rank_layers(model)
    last = list(old_weights)[-1]
    assert set(layers) == set(old_weights) - {last}  # the output layer stays dense
    held = {p for g in optimizer.param_groups for p in g["params"]}
    assert optimizer_holds_only(optimizer, model)
    for name, layer in layers.items():
        assert layer.rank == layer.full_rank and layer.core == "full"
        assert not layer.U.requires_grad and not layer.V.requires_grad and layer.S.requires_grad
        assert old_weights[name] not in held and old_weights[name] not in optimizer.state
        assert layer.S in held and layer.U not in held and layer.V not in held
        assert layer.bias is old_biases[name] and optimizer.state[layer.bias] is bias_state[name]
        # S starts as diag(σ) and its first moment is the projected one: Uᵀ m_W V.
        assert torch.count_nonzero(layer.S - torch.diag(torch.diagonal(layer.S))) == 0
        key = "exp_avg" if opt == "adam" else "momentum_buffer"
        m_w = old_state[name][key].flatten(1).double()
        expected = layer.U.double().T @ m_w @ layer.V.double()
        torch.testing.assert_close(
            optimizer.state[layer.S][key].double(), expected, atol=1e-6, rtol=1e-5
        )
        if opt == "adam":
            assert optimizer.state[layer.S]["exp_avg_sq"].min() >= 0
            assert int(optimizer.state[layer.S]["step"]) == 3  # bias correction continues
    # Training continues across the switch without error and changes only S and the rest.
    train(method, model, optimizer, 2, seed=10)
    assert optimizer_holds_only(optimizer, model)


def test_trainable_parameters_after_switch_are_cores_biases_and_dense_layers():
    model = mlp()
    method, optimizer = start(model, delay=1)
    train(method, model, optimizer, 1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # cores 10² + 9², biases 10 + 9, the dense output layer 9·3 + 3
    assert trainable == 100 + 81 + 10 + 9 + 30
    assert method.params_train_after == trainable
    assert method.params_train_before == sum(p.numel() for p in mlp().parameters())


def test_delay_zero_switches_in_prepare_and_reset_mode_gives_fresh_state():
    model = mlp()
    method, optimizer = start(model, delay=0, optimizer_state="reset")
    assert method.switched and len(low_rank_layers(model)) == 2
    assert all(
        not p.requires_grad for layer in low_rank_layers(model).values() for p in (layer.U, layer.V)
    )
    model2 = mlp()
    method2, optimizer2 = start(model2, delay=1, optimizer_state="reset")
    train(method2, model2, optimizer2, 1)
    for layer in low_rank_layers(model2).values():
        assert layer.S not in optimizer2.state


def test_basis_update_preserves_product_and_diagonalises_core():
    torch.manual_seed(1)
    model = mlp()
    method, optimizer = start(model, delay=1, frequency=1000, cutoff=0.0)
    train(method, model, optimizer, 6)  # S is no longer diagonal
    layers = low_rank_layers(model)
    before = {n: product(layer) for n, layer in layers.items()}
    x, _ = batch_for(model, 5)
    with torch.no_grad():
        out_before = model(x)
    method.update_bases(model, optimizer)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_before, atol=1e-5, rtol=1e-5)
    for name, layer in low_rank_layers(model).items():
        torch.testing.assert_close(product(layer), before[name], atol=1e-6, rtol=1e-6)
        s = layer.S.detach()
        assert torch.count_nonzero(s - torch.diag(torch.diagonal(s))) == 0
        eye = torch.eye(layer.rank, dtype=torch.float64)
        torch.testing.assert_close(layer.U.double().T @ layer.U.double(), eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.V.double().T @ layer.V.double(), eye, atol=1e-5, rtol=0)
    assert optimizer_holds_only(optimizer, model)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 9), n=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_basis_update_identity_property(m, n, seed):
    """For any shape and any trained core, the rotation leaves U S Vᵀ unchanged."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m), nn.Linear(m, 2))
    method = build({"name": "oialr", "delay": 0, "cutoff": 0.0})
    method.prepare(model)
    layer = model[0]
    with torch.no_grad():
        layer.S.add_(torch.randn_like(layer.S))
    before = product(layer)
    method.update_bases(model, optimizer=None)
    torch.testing.assert_close(product(layer), before, atol=1e-5, rtol=1e-5)


def test_truncation_follows_cutoff_and_slices_optimizer_state():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    method, optimizer = start(model, delay=1, frequency=1000, cutoff=0.3, max_cut_fraction=1.0)
    train(method, model, optimizer, 3)
    layer = model[0]
    # A core with a known spectrum in a random rotation: σ = 10, 9, ..., 1.
    rank = layer.rank
    sigma = torch.arange(rank, 0, -1, dtype=torch.float64)
    p, _ = torch.linalg.qr(torch.randn(rank, rank, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(rank, rank, dtype=torch.float64))
    with torch.no_grad():
        layer.S.copy_(p @ torch.diag(sigma) @ q.T)
    before = product(layer)
    old_u, old_v = layer.U.detach().double(), layer.V.detach().double()
    state = {k: v.clone() for k, v in optimizer.state[layer.S].items()}
    record = method.update_bases(model, optimizer)
    kept = int((sigma >= 0.3 * sigma[0]).sum())
    assert layer.rank == kept == record["layers"]["0"]["rank"]
    # The kept factors are the best rank-k approximation: spectral error σ_{k+1}.
    err = torch.linalg.matrix_norm(product(layer) - before, ord=2)
    assert math.isclose(float(err), float(sigma[kept]), rel_tol=1e-5)
    new_state = optimizer.state[layer.S]
    assert new_state["exp_avg"].shape == new_state["exp_avg_sq"].shape == (kept, kept)
    # First moment rotated into the new basis and sliced: P_kᵀ m Q_k, where U_new = U P_k.
    p_used = old_u.T @ layer.U.detach().double()
    q_used = old_v.T @ layer.V.detach().double()
    expected = p_used.T @ state["exp_avg"].double() @ q_used
    torch.testing.assert_close(new_state["exp_avg"].double(), expected, atol=1e-6, rtol=1e-5)
    assert new_state["exp_avg_sq"].min() >= 0
    assert optimizer_holds_only(optimizer, model)
    train(method, model, optimizer, 2, seed=20)  # keeps training at the new shapes
    assert optimizer_holds_only(optimizer, model)


def test_max_cut_fraction_and_r_min_bound_each_update():
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 3))
    method = build(
        {"name": "oialr", "delay": 0, "cutoff": 1.0, "max_cut_fraction": 0.3, "r_min": 4}
    )
    method.prepare(model)
    ranks = []
    for _ in range(5):
        method.update_bases(model, optimizer=None)
        ranks.append(model[0].rank)
    # β = 1 keeps only σ_max, but each update removes at most ⌊0.3 r⌋ and never goes below 4.
    assert ranks == [7, 5, 4, 4, 4]


def test_full_rank_second_moment_mapping_preserves_its_sum():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    method, optimizer = start(model, delay=1, frequency=1000, cutoff=0.0)
    train(method, model, optimizer, 4)
    layer = model[0]
    v = optimizer.state[layer.S]["exp_avg_sq"].clone()
    method.update_bases(model, optimizer)
    v_new = optimizer.state[layer.S]["exp_avg_sq"]
    assert math.isclose(float(v_new.sum()), float(v.sum()), rel_tol=1e-5)


def test_sgd_momentum_trajectory_unchanged_by_basis_updates():
    """With SGD + momentum and no truncation the transformed state makes basis updates
    invisible: the product U S Vᵀ follows exactly the trajectory without updates."""
    torch.manual_seed(4)
    plain = mlp()
    rotated = copy.deepcopy(plain)
    m_plain, o_plain = start(plain, "sgd", delay=1, frequency=10_000, cutoff=0.0)
    m_rot, o_rot = start(rotated, "sgd", delay=1, frequency=1, cutoff=0.0)
    train(m_plain, plain, o_plain, 8)
    train(m_rot, rotated, o_rot, 8)
    assert len(m_rot.updates) == 7 and not m_plain.updates
    for name, layer in low_rank_layers(plain).items():
        other = low_rank_layers(rotated)[name]
        torch.testing.assert_close(product(other), product(layer), atol=1e-5, rtol=1e-4)


def test_stability_is_one_without_change_and_below_one_after_rotation():
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 3))
    method = build({"name": "oialr", "delay": 0, "cutoff": 0.0})
    method.prepare(model)
    record = method.update_bases(model, optimizer=None)  # S = diag(σ) already: nothing moves
    assert record["layers"]["0"]["stability"] == pytest.approx(1.0, abs=1e-6)
    layer = model[0]
    angle = torch.tensor(0.6)
    rotation = torch.eye(layer.rank)
    rotation[:2, :2] = torch.tensor([[angle.cos(), -angle.sin()], [angle.sin(), angle.cos()]])
    with torch.no_grad():
        layer.S.copy_(torch.diag(torch.full((layer.rank,), 1.0).cumsum(0).flip(0)) @ rotation)
    record = method.update_bases(model, optimizer=None)
    stability = record["layers"]["0"]
    assert stability["stability_v"] < 1.0 - 1e-3 and stability["stability"] < 1.0
    assert stability["stability_u"] == pytest.approx(1.0, abs=1e-6)  # only V was rotated
    # The helper itself: identical bases give 1, sign flips too, a rotation less.
    a = torch.linalg.qr(torch.randn(6, 3))[0]
    assert basis_stability(a, a) == pytest.approx(1.0)
    assert basis_stability(a, -a) == pytest.approx(1.0)
    assert basis_stability(a, a @ torch.linalg.qr(torch.randn(3, 3))[0]) < 1.0


def test_epoch_metrics_summary_and_state_dict():
    model = mlp()
    method, optimizer = start(model, delay=2, frequency=2, cutoff=0.2)
    assert method.epoch_metrics(model) == {"oialr_switched": False}
    train(method, model, optimizer, 7)
    method.on_epoch_end(model, optimizer, 1, {})
    metrics = method.epoch_metrics(model)
    assert metrics["oialr_switched"] and metrics["oialr_updates"] == 2
    assert set(metrics["oialr_stability"]) == {"0", "2"}
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in metrics["oialr_stability"].values())
    summary = method.summary()
    assert summary["oialr_switch_step"] == 2 and summary["oialr_switch_epoch"] == 1
    assert [u["step"] for u in summary["oialr_updates"]] == [4, 6]
    clone = build({"name": "oialr", "delay": 2, "frequency": 2})
    clone.load_state_dict(method.state_dict())
    assert clone.switched and clone.step == 7 and clone.summary() == summary


def test_config_errors():
    with pytest.raises(Exception, match="frequency"):
        build({"name": "oialr", "frequency": 0})
    with pytest.raises(Exception, match="cutoff"):
        build({"name": "oialr", "cutoff": 1.5})
    with pytest.raises(LorankError):
        build({"name": "oialr_typo"})


@pytest.mark.slow
def test_mnist_end_to_end_switches_prunes_and_learns(tmp_path, data_root):
    """Real MNIST (a 12k-sample subset, 5 short epochs): OIALR switches, prunes to a small
    trainable core and still classifies well; the run files carry the switch and stability."""
    import json

    from lorank.training.config import validate_config
    from lorank.training.trainer import train as run_training

    config = validate_config(
        {
            "data": {
                "name": "mnist",
                "batch_size": 256,
                "train_subset": 12288,
                "test_subset": 2000,
            },
            "model": {"name": "mlp", "hidden": [256, 256]},
            "method": {"name": "oialr", "delay": 96, "frequency": 24, "cutoff": 0.3},
            "optim": {"name": "adamw", "lr": 3e-3},
            "train": {"epochs": 5, "seed": 0, "threads": 1},
        }
    )
    out = run_training(config, tmp_path / "run", data_dir=data_root, quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Dense reaches 94.5% in this setting (first 2000 test images, the harder half).
    assert summary["oialr_switch_step"] == 96 and summary["oialr_switch_epoch"] == 2
    assert summary["test_acc"] >= 0.92
    assert summary["params_train"] <= 0.2 * summary["params_dense"]
    assert all(r < 256 for r in summary["ranks"].values())
    assert "oialr_stability" in records[-1] and records[-1]["oialr_switched"]
