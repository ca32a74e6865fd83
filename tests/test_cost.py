"""The measured cost model and latency-aware conversion, with fake timers so that every
decision is deterministic."""

import pytest
import torch
from torch import nn

import lorank
from lorank.core.cost import CostModel, layer_input_shapes
from lorank.errors import LorankError


class FakeCosts(CostModel):
    """Times from a formula of the key instead of a clock; counts the measurements."""

    def __init__(self, formula, **kw):
        super().__init__(**kw)
        self.formula, self.calls = formula, []

    def measure(self, key, run):
        self.calls.append(key)
        return self.formula(key)


def test_the_cache_key_covers_device_dtype_shape_rank_and_mode():
    costs = FakeCosts(lambda key: 1.0)
    a, b = nn.Linear(32, 16), nn.Linear(32, 16).double()
    keys = {
        costs.key(a, (8, 32), None, "forward"),
        costs.key(b, (8, 32), None, "forward"),  # dtype
        costs.key(a, (16, 32), None, "forward"),  # input shape
        costs.key(a, (8, 32), 4, "forward"),  # rank
        costs.key(a, (8, 32), None, "train"),  # mode
        costs.key(nn.Linear(32, 17), (8, 32), None, "forward"),  # layer shape
        costs.key(nn.Conv2d(32, 16, 3), (8, 32, 8, 8), None, "forward"),  # layer kind
    }
    assert len(keys) == 7
    assert all(k.device == "cpu" for k in keys)
    costs.time(a, (8, 32))
    costs.time(nn.Linear(32, 16), (8, 32))  # same key: measured once
    assert len(costs.calls) == 1


def test_the_cache_file_survives_a_new_cost_model(tmp_path):
    cache = tmp_path / "costs.json"
    first = FakeCosts(lambda key: 2.0, cache_file=cache)
    first.time(nn.Linear(8, 8), (4, 8), 2)
    second = FakeCosts(lambda key: 3.0, cache_file=cache)
    assert second.time(nn.Linear(8, 8), (4, 8), 2) == 2.0 and second.calls == []
    cache.write_text("not json")
    assert FakeCosts(lambda key: 5.0, cache_file=cache).time(nn.Linear(8, 8), (4, 8), 2) == 5.0


def test_break_even_rank_is_the_largest_faster_rank():
    # Dense costs 100; rank r costs 3r: faster up to r = 33.
    costs = FakeCosts(lambda key: 100.0 if key.rank is None else 3.0 * key.rank)
    assert costs.break_even_rank(nn.Linear(64, 64), (8, 64)) == 33
    never = FakeCosts(lambda key: 1.0 if key.rank is None else 2.0)
    assert never.break_even_rank(nn.Linear(64, 64), (8, 64)) is None


def test_ranks_are_rounded_only_when_the_measurement_says_it_helps():
    aligned = FakeCosts(lambda key: 0.5 if key.rank is not None and key.rank % 8 == 0 else 1.0)
    assert aligned.fastest_rank_near(nn.Linear(128, 128), (8, 128), 61) == 64
    flat = FakeCosts(lambda key: 1.0 if key.rank is None else float(key.rank))
    assert flat.fastest_rank_near(nn.Linear(128, 128), (8, 128), 61) == 61
    # never below the asked rank, never above full rank
    assert aligned.fastest_rank_near(nn.Linear(60, 60), (8, 60), 59) == 59


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def test_latency_objective_leaves_a_layer_dense_where_low_rank_measures_slower():
    # Low rank is slower for the 64-wide input layer, faster for the 256-wide one.
    def formula(key):
        if key.rank is None:
            return float(key.out_features * key.in_features)
        overhead = 10_000.0 if key.in_features == 64 and key.out_features == 64 else 0.0
        return overhead + key.rank * (key.out_features + key.in_features)

    model, x = net(), torch.randn(8, 64)
    config = lorank.LowRankConfig(rank=8, objective="latency")
    report = lorank.convert(model, config, example_input=x, cost_model=FakeCosts(formula))
    status = {e.name: e.status for e in report.layers}
    assert status["0"] == "skipped" and "not faster" in report.layers[0].reason
    assert status["2"] == "converted"
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], lorank.LowRankLinear)
    assert report.layers[1].low_rank_ms < report.layers[1].dense_ms


def test_latency_objective_needs_an_example_input():
    with pytest.raises(LorankError, match="example_input"):
        lorank.convert(net(), lorank.LowRankConfig(objective="latency"))


def test_layer_input_shapes_come_from_one_forward():
    shapes = layer_input_shapes(net(), torch.randn(3, 64))
    assert shapes == {"0": (3, 64), "2": (3, 64), "4": (3, 256)}


def test_the_real_timer_measures_something():
    costs = CostModel()
    assert costs.time(nn.Linear(16, 16), (4, 16)) > 0
    assert costs.time(nn.Conv2d(4, 8, 3), (2, 4, 8, 8), 2, "train") > 0


def test_profile_command_on_a_config_and_on_a_run(tmp_path, capsys, run_config):
    import json

    from conftest import SYNTHETIC_DATA

    from lorank.cli import main

    config = tmp_path / "c.toml"
    config.write_text(
        '[data]\nname = "synthetic"\nsynthetic_shape = [16]\nbatch_size = 32\n'
        '[model]\nname = "mlp"\nhidden = [48, 48]\n'
    )
    assert main(["profile", str(config), "--rank", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["layers.0", "layers.2", "layers.4"]
    assert rows[0]["input_shape"] == [32, 16] and rows[0]["rank"] == 4
    assert all(r["dense_ms"] > 0 and r["low_rank_ms"] > 0 for r in rows)
    run = run_config(
        {
            "data": SYNTHETIC_DATA,
            "model": {"name": "mlp", "hidden": [48, 48]},
            "method": {"name": "factorized", "rank": 6},
            "train": {"epochs": 1, "threads": 1},
        }
    )
    assert main(["profile", str(run.path)]) == 0
    text = capsys.readouterr().out
    assert "layers.0" in text and "layers.2" in text and "layers.4" not in text  # classifier dense
    assert "break-even" in text and "total: dense" in text


def test_export_keeps_the_faster_form_of_each_layer_and_the_same_function(tmp_path, run_config):
    from conftest import SYNTHETIC_DATA

    from lorank.experiments.export import export

    run = run_config(
        {
            "data": SYNTHETIC_DATA,
            "model": {"name": "mlp", "hidden": [48, 48]},
            "method": {"name": "factorized", "rank": 6},
            "train": {"epochs": 1, "threads": 1},
        }
    )
    # Fake device: layers.0 (16 inputs) is slower factorized, layers.2 faster.
    costs = FakeCosts(
        lambda key: 1.0 if key.rank is None else (2.0 if key.in_features == 16 else 0.5)
    )
    summary = export(run.path, tmp_path / "exported", "latency", costs=costs)
    forms = {r["layer"]: r["form"] for r in summary["layers"]}
    assert forms == {"layers.0": "dense", "layers.2": "low-rank"}
    before, after = lorank.load(run.path / "model"), lorank.load(tmp_path / "exported" / "model")
    assert isinstance(after.layers[0], nn.Linear)
    assert isinstance(after.layers[2], lorank.LowRankLinear)
    x = torch.randn(5, 16)
    torch.testing.assert_close(after(x), before(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(LorankError, match="another --out"):
        export(run.path, run.path)
