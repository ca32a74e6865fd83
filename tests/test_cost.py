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
    # Dense costs 100; rank r costs 3r: faster up to r = 33, and 5% faster up to r = 31.
    formula = lambda key: 100.0 if key.rank is None else 3.0 * key.rank  # noqa: E731
    assert FakeCosts(formula, margin=0).break_even_rank(nn.Linear(64, 64), (8, 64)) == 33
    assert FakeCosts(formula).break_even_rank(nn.Linear(64, 64), (8, 64)) == 31
    never = FakeCosts(lambda key: 1.0 if key.rank is None else 2.0)
    assert never.break_even_rank(nn.Linear(64, 64), (8, 64)) is None
    with pytest.raises(LorankError, match="margin"):
        CostModel(margin=1.0)


def test_a_layer_measured_within_the_margin_stays_dense():
    """Timings of one call vary by a few percent, so a layer 2% faster low-rank is left
    dense by default (5% margin) and converted only with latency_margin = 0; the same rule
    decides the export's dense-or-factorized choice."""

    def formula(key):
        dense = float(key.out_features * key.in_features)
        return dense if key.rank is None else 0.98 * dense

    x = torch.randn(8, 64)
    for margin, status in ((0.05, "skipped"), (0.0, "converted")):
        config = lorank.LowRankConfig(rank=8, objective="latency", latency_margin=margin)
        costs = FakeCosts(formula, margin=margin)
        report = lorank.convert(net(), config, example_input=x, cost_model=costs)
        timed = [e for e in report.layers if e.status != "kept"]  # the classifier stays dense
        assert len(timed) == 2 and {e.status for e in timed} == {status}, report.layers
    skipped = lorank.convert(
        net(), lorank.LowRankConfig(rank=8, objective="latency"), example_input=x
    )  # the default cost model takes config.latency_margin
    assert all(e.dense_ms is not None for e in skipped.layers if e.status != "kept")
    with pytest.raises(ValueError, match="latency_margin"):
        lorank.LowRankConfig(latency_margin=-0.1)


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


# ---------------------------------------------------------------- CompressConfig(objective=...)
def mlp4():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def calibration():
    return [(torch.randn(16, 64), torch.zeros(16, dtype=torch.long))]


def flop_like(slow=(), slow_ranks=()):
    """Dense m·n, low rank r·(m+n): faster below mn/(m+n), except layers whose shape is in
    ``slow`` (never faster) and ranks in ``slow_ranks`` (slower than dense)."""

    def formula(key):
        dense = float(key.out_features * key.in_features)
        if key.rank is None:
            return dense
        if (key.out_features, key.in_features) in slow or key.rank in slow_ranks:
            return 2 * dense
        return float(key.rank * (key.out_features + key.in_features))

    return formula


def compress_latency(model, costs, **fields):
    from lorank.compress import compress_model

    config = {"objective": "latency", **fields}
    return compress_model(model, config, calibration(), progress=False, cost_model=costs)


def test_compress_latency_keeps_a_layer_dense_where_low_rank_measures_slower():
    costs = FakeCosts(flop_like(slow={(64, 64)}), core="diag")
    model = mlp4()
    report = compress_latency(model, costs, ranks={"kind": "rule", "rule": "rank=8"})
    rows = {r["name"]: r for r in report.layers}
    assert rows["0"]["form"] == "dense" and "not faster" in rows["0"]["latency"]
    assert isinstance(model[0], nn.Linear) and rows["0"]["rank"] == 64
    for name in ("2", "4"):
        assert rows[name]["form"] == "low-rank" and rows[name]["rank"] == 8
        assert rows[name]["low_rank_ms"] < rows[name]["dense_ms"]
    assert isinstance(model[2], lorank.LowRankLinear)
    # the output layer (10x128): rank 8 is faster in this fake world too
    assert rows["6"]["form"] == "low-rank"
    assert report.latency["layers_kept_dense"] == ["0"]
    assert report.latency["predicted_speedup"] > 1
    assert report.latency["model_dense_ms"] > 0 and report.latency["model_ms"] > 0
    # the same rule with objective params converts the slow layer too
    from lorank.compress import compress_model

    params = compress_model(mlp4(), {"ranks": {"kind": "rule", "rule": "rank=8"}}, progress=False)
    assert {r["name"]: r["status"] for r in params.layers}["0"] == "converted"


def test_compress_latency_rounds_a_rank_only_when_measured_faster():
    def aligned(key):
        if key.rank is None:
            return 1e6
        return float(key.rank) if key.rank % 16 else key.rank / 2  # multiples of 16 fast

    rows = {
        r["name"]: r
        for r in compress_latency(
            mlp4(), FakeCosts(aligned, core="diag"), ranks={"kind": "rule", "rule": "rank=13"}
        ).layers
    }
    assert rows["2"]["rank"] == 16 and rows["4"]["rank"] == 16
    flat = FakeCosts(flop_like(), core="diag")
    rows = {
        r["name"]: r
        for r in compress_latency(mlp4(), flat, ranks={"kind": "rule", "rule": "rank=13"}).layers
    }
    assert rows["2"]["rank"] == 13 and rows["4"]["rank"] == 13


def budget_weights(model):
    return sum(
        m.params_eval - (m.bias.numel() if m.bias is not None else 0)
        if isinstance(m, lorank.LowRankLinear)
        else m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.Linear | lorank.LowRankLinear)
    )


@pytest.mark.parametrize("allocation", ["greedy", "uniform"])
def test_compress_latency_spends_a_budget_on_the_layers_where_low_rank_is_faster(allocation):
    full = budget_weights(mlp4())
    ranks = {"kind": "budget", "budget": 0.5, "allocation": allocation}
    costs = FakeCosts(flop_like(slow={(256, 64)}), core="diag")
    model = mlp4()
    report = compress_latency(model, costs, ranks=ranks)
    rows = {r["name"]: r for r in report.layers}
    assert rows["2"]["form"] == "dense" and isinstance(model[2], nn.Linear)
    assert "no rank measured faster" in rows["2"]["latency"]
    assert budget_weights(model) <= 0.5 * full  # the slow layer's share cut elsewhere
    for row in report.layers:
        if row["form"] == "low-rank":
            assert row["low_rank_ms"] < row["dense_ms"]
            assert row["rank"] <= row["break_even_rank"]
    # objective params may cut the slow layer, and cuts the others no deeper
    from lorank.compress import compress_model

    params = compress_model(mlp4(), {"ranks": ranks}, progress=False)
    by_name = {r["name"]: r for r in params.layers}
    if allocation == "uniform":  # every layer keeps the same fraction
        assert by_name["2"]["status"] == "converted"
    assert by_name["4"]["rank"] >= rows["4"]["rank"]


def test_compress_latency_reallocates_when_a_chosen_rank_measures_slower():
    ranks = {"kind": "budget", "budget": 0.5, "allocation": "uniform"}
    first = compress_latency(mlp4(), FakeCosts(flop_like(), core="diag"), ranks=ranks)
    chosen = {r["name"]: r["rank"] for r in first.layers}
    costs = FakeCosts(flop_like(slow_ranks={chosen["2"]}), core="diag")
    report = compress_latency(mlp4(), costs, ranks=ranks)
    rows = {r["name"]: r for r in report.layers}
    assert rows["2"]["rank"] != chosen["2"]
    assert all(r["low_rank_ms"] < r["dense_ms"] for r in rows.values() if r["form"] == "low-rank")


def test_compress_latency_refuses_a_budget_only_slow_layers_could_meet():
    never = FakeCosts(lambda key: 1.0 if key.rank is None else 2.0, core="diag")
    with pytest.raises(LorankError, match="objective latency.*0 of the 4"):
        compress_latency(mlp4(), never, ranks={"kind": "budget", "budget": 0.5})


def test_compress_latency_needs_a_batch():
    from lorank.compress import compress_model

    with pytest.raises(LorankError, match="objective.*calibration"):
        compress_model(mlp4(), {"objective": "latency"}, progress=False)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.conv(h.transpose(1, 2)).mean(-1))


def test_latency_convert_times_attention_projections_and_keeps_untimed_kinds_dense():
    import warnings

    x = torch.randn(4, 6, 32)
    never = FakeCosts(lambda key: 1.0 if key.rank is None else 2.0)
    config = lorank.LowRankConfig(rank=4, objective="latency")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lorank.convert(Attn(), config, example_input=x, cost_model=never)
    assert report.layers and not report.converted
    timed = [e for e in report.layers if e.dense_ms is not None]
    assert {e.name for e in timed} >= {"attn.in_proj", "attn.out_proj"}
    always = FakeCosts(lambda key: 2.0 if key.rank is None else 1.0)
    report = lorank.convert(Attn(), config, example_input=x, cost_model=always)
    status = {e.name: (e.status, e.reason) for e in report.layers}
    assert status["attn.in_proj"][0] == "converted" and status["attn.out_proj"][0] == "converted"
    assert status["conv"][0] == "skipped" and "not timed" in status["conv"][1]


def test_compress_latency_keeps_layers_it_cannot_time_dense():
    from lorank.compress import compress_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 32, 3), nn.Flatten(), nn.Linear(32 * 6, 64))
    batches = [(torch.randn(4, 8, 8),)]
    always = FakeCosts(lambda key: 2.0 if key.rank is None else 1.0, core="diag")
    config = {"objective": "latency", "ranks": {"kind": "rule", "rule": "rank=4"}}
    report = compress_model(model, config, batches, progress=False, cost_model=always)
    rows = {r["name"]: r for r in report.layers}
    assert rows["0"]["form"] == "dense" and "not timed" in rows["0"]["latency"]
    assert isinstance(model[0], nn.Conv1d)
    assert rows["2"]["form"] == "low-rank" and isinstance(model[2], lorank.LowRankLinear)


def test_train_timings_know_which_layers_pass_an_input_gradient_on():
    from lorank.core.cost import layer_inputs

    model, x = net(), torch.randn(8, 64)
    inputs = layer_inputs(model, x)
    assert {n: (i.shape, i.needs_grad) for n, i in inputs.items()} == {
        "0": ((8, 64), False),
        "2": ((8, 64), True),
        "4": ((8, 256), True),
    }
    assert model.training  # restored
    costs = FakeCosts(lambda key: 1.0)
    assert costs.key(model[0], (8, 64), 4, "train", False) != costs.key(
        model[0], (8, 64), 4, "train", True
    )
    assert costs.key(model[0], (8, 64), 4, "forward", True).input_grad is False

    # low rank is faster only where the backward also computes the input gradient
    def formula(key):
        return 100.0 if key.rank is None else (50.0 if key.input_grad else 150.0)

    config = lorank.LowRankConfig(rank=8, objective="latency", latency_mode="train")
    report = lorank.convert(model, config, example_input=x, cost_model=FakeCosts(formula))
    status = {e.name: e.status for e in report.layers}
    assert status == {"0": "skipped", "2": "converted", "4": "kept"}


def test_compress_latency_in_train_mode_times_the_backward_too():
    costs = FakeCosts(flop_like(slow={(64, 64)}), core="diag")
    report = compress_latency(
        mlp4(), costs, latency_mode="train", ranks={"kind": "rule", "rule": "rank=8"}
    )
    assert report.latency["mode"] == "train" and report.latency["model_ms"] > 0
    assert {k.mode for k in costs.calls} == {"train"}
    # the first layer's input needs no gradient inside the network, the others' do
    assert {k.input_grad for k in costs.calls if k.in_features == 64 and k.out_features == 64} == {
        False
    }
    assert {k.input_grad for k in costs.calls if k.out_features == 128} == {True}
    assert "latency (train)" in str(report)


def test_a_channels_last_input_is_timed_in_channels_last():
    from lorank.core.cost import layer_inputs

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    x = torch.randn(2, 3, 12, 12)
    assert not any(i.channels_last for i in layer_inputs(model, x).values())
    model.to(memory_format=torch.channels_last)
    inputs = layer_inputs(model, x.contiguous(memory_format=torch.channels_last))
    assert inputs["0"].channels_last and inputs["2"].channels_last
    costs = FakeCosts(lambda key: 1.0)
    conv = nn.Conv2d(16, 16, 3)
    keys = {costs.key(conv, (2, 16, 10, 10), 4, "forward", channels_last=c) for c in (0, 1)}
    assert len(keys) == 2
    costs.time(conv, (2, 16, 10, 10), None, "train", channels_last=True)
    assert conv.weight.is_contiguous()  # the caller's layer is not changed
    assert CostModel().time(conv, (2, 16, 10, 10), 4, "train", channels_last=True) > 0
