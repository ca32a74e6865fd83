"""The ``svd`` method (Yang et al.): loss terms, pruning with optimizer-state slicing, the
fine-tune phase, per-epoch loss-bounded selection, and save/load after rank changes."""

import pytest
import torch
import torch.nn.functional as F
from conftest import SYNTHETIC_DATA

import lorank
from lorank.core.metrics import ranks
from lorank.core.optim import optimizer_holds_only
from lorank.core.regularizers import hoyer, orthogonality
from lorank.errors import LorankError
from lorank.methods import build
from lorank.models import MLP, MLPConfig
from lorank.training.config import validate_config
from lorank.training.evaluate import task_loss


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(MLPConfig(hidden=[24, 16]), 12, 4)


def batch(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def prepared(epochs=None, **options):
    model = small_mlp()
    method = build({"name": "svd", **options})
    method.attach(loss_fn=task_loss, calibration=lambda n: [batch(min(n, 128))], epochs=epochs)
    method.prepare(model)
    return model, method


def adam_after_steps(model, method, steps=3):
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-2)
    for _ in range(steps):
        method.train_step(model, optimizer, batch(), task_loss)
    return optimizer


def test_starts_at_full_rank_with_diagonal_core():
    model, _ = prepared()
    assert ranks(model) == {"layers.0": 12, "layers.2": 16}
    assert all(layer.core == "diag" for layer in lorank.low_rank_layers(model).values())


def test_regularization_terms_are_the_weighted_sums():
    model, method = prepared(lambda_orth=0.5, lambda_sparsity=0.2, sparsity="hoyer")
    layers = list(lorank.low_rank_layers(model).values())
    terms = method.regularization(model)
    assert set(terms) == {"orth", "sparsity"}
    # random init has orthonormal U and V, so the orthogonality term starts at zero
    assert float(terms["orth"].detach()) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        layers[0].U.mul_(1.1)
    terms = method.regularization(model)
    expected_orth = 0.5 * sum(orthogonality(lr.U, lr.V) for lr in layers)
    torch.testing.assert_close(terms["orth"], expected_orth)
    torch.testing.assert_close(terms["sparsity"], 0.2 * sum(hoyer(lr.S) for lr in layers))
    stats = method.train_step(
        model, torch.optim.SGD(method.parameters(model), lr=0.0), batch(), task_loss
    )
    assert {"loss", "loss_task", "loss_orth", "loss_sparsity"} <= set(stats)


def test_no_sparsity_term_when_disabled():
    model, method = prepared(sparsity="none")
    assert set(method.regularization(model)) == {"orth"}


def test_prune_slices_factors_and_optimizer_state():
    model, method = prepared(rule="energy=0.01")
    optimizer = adam_after_steps(model, method)
    layer = model.layers[0]
    keep = torch.tensor([1, 4, 7])
    with torch.no_grad():  # make three singular values carry all the energy
        mask = torch.ones(layer.rank, dtype=torch.bool)
        mask[keep] = False
        layer.S[mask] = 1e-6
        layer.S[keep] = torch.tensor([3.0, -2.0, 1.0])
    old = {"U": layer.U, "S": layer.S, "V": layer.V}
    old_state = {k: {n: v.clone() for n, v in optimizer.state[p].items()} for k, p in old.items()}
    x = batch()[0]
    method.prune(model, optimizer, method.config.rule)
    assert layer.rank == 3
    assert optimizer_holds_only(optimizer, model)
    torch.testing.assert_close(layer.S.detach(), torch.tensor([3.0, -2.0, 1.0]))
    for name, dim in (("U", 1), ("S", 0), ("V", 1)):
        new = getattr(layer, name)
        assert new is not old[name]
        for key in ("exp_avg", "exp_avg_sq"):
            expected = old_state[name][key].index_select(dim, keep)
            torch.testing.assert_close(optimizer.state[new][key], expected)
        assert optimizer.state[new]["step"] == old_state[name]["step"]  # bias correction goes on
    assert model(x).shape == (64, 4)
    method.train_step(model, optimizer, batch(), task_loss)  # and training continues
    assert optimizer_holds_only(optimizer, model)


def test_pruning_zero_singular_values_keeps_the_function():
    model, method = prepared(rule="cutoff=0.001")
    with torch.no_grad():
        model.layers[2].S[::2] = 0.0
    x = batch()[0]
    before = model(x)
    method.prune(model, None, method.config.rule)
    assert model.layers[2].rank == 8
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-5)


def test_schedule_prunes_then_finetunes_without_sparsity():
    model, method = prepared(
        epochs=5, prune_epochs=[1], finetune_epochs=2, prune_at_end=True, rule="rank=6"
    )
    optimizer = adam_after_steps(model, method, steps=1)
    phases = []
    for epoch in range(1, 6):
        if epoch == 2:
            method.config = method.config.model_copy(
                update={"rule": lorank.RankRule.parse("rank=5")}
            )
        if epoch == 4:
            method.config = method.config.model_copy(
                update={"rule": lorank.RankRule.parse("rank=3")}
            )
        method.on_epoch_end(model, optimizer, epoch, {})
        phases.append(method.epoch_metrics(model)["svd_phase"])
        assert optimizer_holds_only(optimizer, model)
    events = [(e["epoch"], e["event"]) for e in method.events]
    # prune_epochs=[1], the fine-tune start E - N = 3, and the end E = 5
    assert events == [(1, "prune"), (3, "prune"), (3, "finetune_start"), (5, "prune")]
    assert phases == ["train", "train", "finetune", "finetune", "finetune"]
    assert ranks(model) == {"layers.0": 3, "layers.2": 3}
    assert float(method.regularization(model)["sparsity"]) == 0.0
    assert method.summary()["finetune_start_epoch"] == 3
    state = method.state_dict()
    fresh = build(method.config.model_dump())
    fresh.load_state_dict(state)
    assert fresh.finetuning and fresh.events == method.events


def test_finetune_needs_fewer_epochs_than_the_run():
    with pytest.raises(LorankError, match="finetune_epochs=3 must be smaller"):
        prepared(epochs=3, finetune_epochs=3)
    model = small_mlp()
    with pytest.raises(LorankError, match="attach"):
        build({"name": "svd", "finetune_epochs": 1}).prepare(model)


def test_bad_prune_epochs_are_config_errors():
    with pytest.raises(LorankError, match="prune_epochs"):
        validate_config({"method": {"name": "svd", "prune_epochs": [0]}})
    with pytest.raises(LorankError, match="rule"):
        validate_config({"method": {"name": "svd", "rule": "energy=2"}})


def test_per_epoch_loss_bounded_selection_keeps_the_loss_within_tolerance():
    model, method = prepared(loss_tolerance=0.05, search_precision=0.02)
    optimizer = adam_after_steps(model, method, steps=5)
    calibration = method.calibration(128)
    loss_before = float(task_loss(model, calibration[0]).detach())
    method.on_epoch_end(model, optimizer, 1, {})
    loss_after = float(task_loss(model, calibration[0]).detach())
    assert abs(loss_after - loss_before) < 0.05
    assert sum(ranks(model).values()) < 12 + 16
    metrics = method.epoch_metrics(model)
    assert 0 < metrics["search_delta"] <= 1 and metrics["search_loss_change"] < 0.05
    assert optimizer_holds_only(optimizer, model)
    method.train_step(model, optimizer, batch(), task_loss)


def test_save_load_round_trip_after_pruning(tmp_path):
    model, method = prepared(rule="rank=5")
    method.prune(model, None, method.config.rule)
    model.layers[2].truncate(2)
    x = batch()[0]
    lorank.save(model, tmp_path / "model")
    loaded = lorank.load(tmp_path / "model", small_mlp(seed=1))
    assert ranks(loaded) == {"layers.0": 5, "layers.2": 2}
    torch.testing.assert_close(loaded(x), model(x))


def test_trains_prunes_and_finetunes_end_to_end(run_config):
    trained = run_config(
        {
            "data": SYNTHETIC_DATA,
            "model": {"name": "mlp", "hidden": [32, 32]},
            "method": {
                "name": "svd",
                "lambda_sparsity": 0.05,
                "finetune_epochs": 1,
                "rule": "energy=0.05",
                "prune_at_end": False,
            },
            "optim": {"lr": 3e-3},
            "train": {"epochs": 3, "threads": 1},
        }
    )
    run, records, summary = trained.path, trained.records, trained.summary
    assert "loss_orth" in records[1] and "loss_sparsity" in records[1]
    assert records[3]["loss_sparsity"] == 0.0  # the fine-tune epoch
    # pruned once, at the start of the fine-tune phase (end of epoch 2)
    assert records[2]["pruned"] and "pruned" not in records[3]
    assert records[2]["ranks"] == summary["ranks"]
    assert sum(summary["ranks"].values()) < 16 + 32
    assert summary["params_eval"] == records[-1]["params_eval"]
    loaded = lorank.load(run / "model")
    x = torch.randn(8, 16)
    assert ranks(loaded) == summary["ranks"]
    assert F.softmax(loaded(x), -1).shape == (8, 4)
