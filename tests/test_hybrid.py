"""hybrid: both switch directions keep the network's function (at full rank), leave the
optimizer holding exactly the live parameters, and fire on their triggers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_mlp
from torch import nn

from lorank.core.convert import low_rank_layers
from lorank.core.optim import optimizer_holds_only
from lorank.errors import LorankError
from lorank.methods import build
from lorank.methods.hybrid import Hybrid, stable_rank_of
from lorank.training.config import validate_config

torch.set_num_threads(1)


def mlp() -> nn.Module:
    return make_mlp(12, 10, 9, 3)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)


def loss_fn(model: nn.Module, b) -> torch.Tensor:
    x, y = b
    return F.cross_entropy(model(x), y)


def start(model: nn.Module, **options) -> tuple[Hybrid, torch.optim.Optimizer]:
    method = build({"name": "hybrid", **options})
    method.attach(loss_fn=loss_fn, epochs=10)
    method.prepare(model)
    return method, torch.optim.Adam(method.parameters(model), lr=1e-2)


def train(method, model, optimizer, steps: int, seed: int = 0) -> None:
    for i in range(steps):
        method.train_step(model, optimizer, batch(seed + i), loss_fn)


def held(optimizer) -> set:
    return {p for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize(
    "inner, options",
    [("factorized", {"rank": 4}), ("svd", {"rank": 2, "prune_at_end": False})],
)
def test_lowrank_to_dense_keeps_outputs_and_swaps_optimizer(inner, options):
    model = mlp()
    method, optimizer = start(
        model, direction="lowrank_to_dense", threshold=0.1, lowrank_method=inner, lowrank=options
    )
    layers = low_rank_layers(model)
    assert set(layers) == {"0", "2"}  # the classifier stays dense (inner default)
    train(method, model, optimizer, 4)
    method.on_epoch_end(model, optimizer, 1, {"loss_task": 1.0})
    assert method.lowrank_phase  # no previous epoch: no trigger yet
    factors = [p for layer in layers.values() for p in (layer.U, layer.S, layer.V) if p is not None]
    biases = {n: layer.bias for n, layer in layers.items()}
    bias_state = {n: optimizer.state[b] for n, b in biases.items()}
    x, _ = batch(99)
    with torch.no_grad():
        before = model(x)
    method.on_epoch_end(model, optimizer, 2, {"loss_task": 0.95})  # 5% < 10%: switch
    assert not method.lowrank_phase and not low_rank_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert optimizer_holds_only(optimizer, model)
    assert not any(p in held(optimizer) or p in optimizer.state for p in factors)
    for name in ("0", "2"):
        dense = model.get_submodule(name)
        assert isinstance(dense, nn.Linear)
        assert dense.weight in held(optimizer) and dense.weight not in optimizer.state  # fresh
        assert dense.bias is biases[name] and optimizer.state[dense.bias] is bias_state[name]
    metrics = method.epoch_metrics(model)
    assert metrics["hybrid_phase"] == "dense" and metrics["hybrid_switch_epoch"] == 2
    assert metrics["hybrid_switch_trigger"] == pytest.approx(0.05)
    assert metrics["hybrid_params_train_after"] == sum(p.numel() for p in mlp().parameters())
    assert metrics["hybrid_params_train_before"] < metrics["hybrid_params_train_after"]
    train(method, model, optimizer, 3, seed=50)  # dense training continues
    assert optimizer_holds_only(optimizer, model)
    summary = method.summary()
    assert summary["hybrid_switch_epoch"] == 2 and summary["hybrid_switch_reason"] == "trigger"
    assert [t["epoch"] for t in summary["hybrid_triggers"]] == [1, 2]


def test_switch_epoch_forces_the_switch():
    model = mlp()
    method, optimizer = start(
        model, direction="lowrank_to_dense", threshold=0.01, switch_epoch=2, lowrank={"rank": 3}
    )
    for epoch, loss in ((1, 1.0), (2, 0.5)):  # still falling fast
        method.on_epoch_end(model, optimizer, epoch, {"loss_task": loss})
    assert method.switch_record["hybrid_switch_reason"] == "switch_epoch"
    assert method.switch_record["hybrid_switch_trigger"] == pytest.approx(0.5)
    assert not low_rank_layers(model)


def test_dense_to_lowrank_at_full_rank_keeps_outputs():
    model = mlp()
    method, optimizer = start(
        model,
        direction="dense_to_lowrank",
        switch_epoch=1,
        rank_rule="fraction=1.0",
        lowrank={"skip_if_no_savings": False},
    )
    assert not low_rank_layers(model)
    train(method, model, optimizer, 4)
    weights = {n: model.get_submodule(n).weight for n in ("0", "2", "4")}
    biases = {n: model.get_submodule(n).bias for n in ("0", "2")}
    bias_state = {n: optimizer.state[b] for n, b in biases.items()}
    x, _ = batch(99)
    with torch.no_grad():
        before = model(x)
    method.on_epoch_end(model, optimizer, 1, {"loss_task": 1.0})
    layers = low_rank_layers(model)
    assert set(layers) == {"0", "2"} and all(lr.rank == lr.full_rank for lr in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert optimizer_holds_only(optimizer, model)
    for name, layer in layers.items():
        assert weights[name] not in held(optimizer) and weights[name] not in optimizer.state
        assert layer.U in held(optimizer) and layer.V in held(optimizer)
        assert layer.bias is biases[name] and optimizer.state[layer.bias] is bias_state[name]
    assert weights["4"] in held(optimizer)  # the dense classifier keeps training
    train(method, model, optimizer, 3, seed=40)  # low-rank training continues
    assert optimizer_holds_only(optimizer, model)
    for layer in low_rank_layers(model).values():
        assert optimizer.state[layer.U]["exp_avg"].shape == layer.U.shape
    metrics = method.epoch_metrics(model)
    assert metrics["hybrid_switch_ranks"] == {"0": 10, "2": 9}


def test_dense_to_lowrank_scaled_stable_rank_is_eckart_young_truncation():
    model = mlp()
    method, optimizer = start(
        model, direction="dense_to_lowrank", switch_epoch=1, lowrank={"skip_if_no_savings": False}
    )
    # Give layer "0" a known spectrum: σ = (4, 2, 1, 1, 0, ...) → srank = 22/16.
    layer0 = model[0]
    u, _ = torch.linalg.qr(torch.randn(10, 10))
    v, _ = torch.linalg.qr(torch.randn(12, 10))
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0] + [0.0] * 6)
    with torch.no_grad():
        layer0.weight.copy_(u @ torch.diag(sigma) @ v.T)
    initial = method.stable_ranks["0"][0]
    expected0 = math.ceil(22 / 16 * 10 / initial)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("0", "2"):
            w = reference.get_submodule(name).weight
            uu, ss, vh = torch.linalg.svd(w.double(), full_matrices=False)
            k = expected0 if name == "0" else 9  # "2" is unchanged since init: full rank
            w.copy_((uu[:, :k] * ss[:k]) @ vh[:k])
    method.on_epoch_end(model, optimizer, 1, {"loss_task": 1.0})
    ranks = method.switch_record and method.epoch_metrics(model)["hybrid_switch_ranks"]
    assert ranks == {"0": expected0, "2": 9}
    x, _ = batch(7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_stable_rank_trigger_waits_for_a_settled_window():
    model = mlp()
    method, optimizer = start(
        model, direction="dense_to_lowrank", threshold=0.05, window=2, rank_rule="rank=2"
    )
    metrics = {"loss_task": 1.0}
    method.on_epoch_end(model, optimizer, 1, metrics)  # history: s0, s0 → window not full
    assert method.triggers[-1]["trigger"] is None and not method.lowrank_phase
    with torch.no_grad():  # change layer 0's spectrum: its stable rank moves a lot
        model[0].weight[0].mul_(5.0)
    s_before, s_after = method.stable_ranks["0"][-1], stable_rank_of(model[0])
    method.on_epoch_end(model, optimizer, 2, metrics)
    expected = abs(s_after - s_before) / s_before
    assert method.triggers[-1]["trigger"] == pytest.approx(expected)
    assert expected > 0.05 and not method.lowrank_phase
    method.on_epoch_end(model, optimizer, 3, metrics)  # the big change is still in the window
    assert not method.lowrank_phase
    method.on_epoch_end(model, optimizer, 4, metrics)  # two unchanged epochs: settled
    assert method.triggers[-1]["trigger"] == pytest.approx(0.0, abs=1e-9)
    assert method.lowrank_phase and method.switch_record["hybrid_switch_epoch"] == 4
    assert {lr.rank for lr in low_rank_layers(model).values()} == {2}


def test_state_dict_round_trip_after_switch():
    model = mlp()
    method, optimizer = start(
        model, direction="dense_to_lowrank", switch_epoch=1, rank_rule="rank=3"
    )
    method.on_epoch_end(model, optimizer, 1, {"loss_task": 1.0})
    clone = build(
        {
            "name": "hybrid",
            "direction": "dense_to_lowrank",
            "switch_epoch": 1,
            "rank_rule": "rank=3",
        }
    )
    clone.load_state_dict(json.loads(json.dumps(method.state_dict())))
    assert clone.lowrank_phase and clone.inner is not None
    assert clone.switch_record == method.switch_record


def test_config_errors_name_the_inner_option():
    with pytest.raises(LorankError, match="lowrank.rnak"):
        validate_config({"method": {"name": "hybrid", "lowrank": {"rnak": 3}}})
    with pytest.raises(LorankError, match="direction"):
        validate_config({"method": {"name": "hybrid", "direction": "sideways"}})
    with pytest.raises(LorankError, match="rank_rule"):
        validate_config({"method": {"name": "hybrid", "rank_rule": "bogus=1"}})


def test_trainer_records_the_switch(tmp_path):
    from lorank.training.trainer import train as run_training

    config = validate_config(
        {
            "data": {
                "name": "synthetic",
                "batch_size": 64,
                "synthetic_train": 256,
                "synthetic_test": 64,
            },
            "model": {"name": "mlp", "hidden": [16, 16]},
            "method": {
                "name": "hybrid",
                "direction": "lowrank_to_dense",
                "switch_epoch": 2,
                "lowrank": {"rank": 4},
            },
            "train": {"epochs": 3, "threads": 1},
        }
    )
    out = run_training(config, tmp_path / "run", quiet=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["hybrid_phase"] for r in records] == ["lowrank", "lowrank", "dense", "dense"]
    assert records[2]["hybrid_switch_epoch"] == 2 and records[2]["ranks"] == {}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hybrid_switch_epoch"] == 2
    assert summary["hybrid_params_eval_after"] == summary["params_dense"]
