"""Forecasting: the ``forecast`` dataset kind (split, normalisation, windows, missing values),
the forecasters of the zoo, every training method on the transformer, and a run through the
CLI (train, eval, compress, report) end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorank
from lorank.cli import main
from lorank.core.layers import LowRankLinear
from lorank.core.optim import optimizer_holds_only
from lorank.data import DataConfig, DatasetInfo, load_dataset
from lorank.data.forecast import ForecastConfig, load_series, make_windows, split_series
from lorank.errors import LorankError
from lorank.methods import build
from lorank.models import (
    ForecastTransformer,
    ForecastTransformerConfig,
    LinearForecaster,
    LinearForecasterConfig,
    build_model,
)
from lorank.training.evaluate import evaluate, task_loss

TEMPS = "timeseries/temps-2010-hourly.csv"
CITIES = ["seattle_temp_f", "san_francisco_temp_f"]


def write_csv(path: Path, values: np.ndarray, names: list[str]) -> Path:
    """A CSV like the shared ones: a date column, then the values (NaN as an empty cell)."""
    lines = ["date," + ",".join(names)]
    for i, row in enumerate(values):
        cells = ["" if np.isnan(v) else repr(float(v)) for v in row]
        lines.append(f"2020-01-01 {i:05d}," + ",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def forecast_data(file: str, **forecast) -> DataConfig:
    return DataConfig(name="forecast", forecast=ForecastConfig(file=file, **forecast))


# --------------------------------------------------------------------------------------------
# Data


def test_normalisation_uses_the_training_part_only(tmp_path, data_root):
    """Replacing everything after the training part must change nothing of training: the
    statistics and every training window stay exactly the same."""
    raw = load_series(TEMPS, CITIES, [data_root])
    cfg = ForecastConfig(columns=CITIES)
    real = split_series(raw, cfg)
    val_start = real.bounds[0]
    poisoned = raw.copy()
    poisoned[val_start:] = poisoned[val_start:] * 10 + 1000  # a wildly different future
    fake = split_series(poisoned, cfg)
    np.testing.assert_array_equal(fake.mean, real.mean)
    np.testing.assert_array_equal(fake.std, real.std)
    np.testing.assert_array_equal(fake.x["train"], real.x["train"])
    np.testing.assert_array_equal(fake.y["train"], real.y["train"])
    # ...and the statistics are those of the training part, not of the whole year.
    np.testing.assert_allclose(real.mean, raw[:val_start].mean(axis=0))
    np.testing.assert_allclose(real.std, raw[:val_start].std(axis=0))
    assert not np.allclose(real.mean, raw.mean(axis=0), atol=0.1)


def test_windows_line_up_with_the_raw_series(data_root):
    data = load_dataset(forecast_data(TEMPS, columns=CITIES), data_dir=data_root)
    raw = load_series(TEMPS, CITIES, [data_root])
    splits = split_series(raw, ForecastConfig(columns=CITIES))
    val_start, test_start = splits.bounds
    mean, std = data.target_mean.double(), data.target_std.double()
    for split, lo, hi in (("train", 0, val_start), ("val", val_start, test_start)):
        starts = splits.target_index[split]
        assert starts.min() >= lo + (168 if lo == 0 else 0) and starts.max() + 24 <= hi
    assert data.info.test_size == len(raw) - max(test_start, 168) - 24 + 1
    for split in ("train", "val", "test"):
        starts = splits.target_index[split]
        x, y = data._batch(split, slice(0, None))
        assert len(x) == len(starts)
        for i in (0, len(starts) // 2, len(starts) - 1):
            t = int(starts[i])
            torch.testing.assert_close(
                x[i].double() * std + mean, torch.from_numpy(raw[t - 168 : t]), atol=1e-4, rtol=0
            )
            torch.testing.assert_close(
                y[i].double() * std + mean, torch.from_numpy(raw[t : t + 24]), atol=1e-4, rtol=0
            )
    # Consecutive training windows are one step apart: the split did not shuffle time.
    assert np.all(np.diff(splits.target_index["train"]) == 1)
    assert splits.target_index["test"][0] == test_start


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(60, 300),
    context=st.integers(1, 20),
    horizon=st.integers(1, 10),
    val=st.sampled_from([0.0, 0.1, 0.2]),
    test=st.sampled_from([0.1, 0.2, 0.3]),
    stride=st.integers(1, 3),
)
def test_every_target_lies_in_its_own_part(n, context, horizon, val, test, stride):
    values = np.arange(n, dtype=np.float64)[:, None]  # value = time step
    cfg = ForecastConfig(
        columns=["v"],
        context=context,
        horizon=horizon,
        val_fraction=val,
        test_fraction=test,
        stride=stride,
    )
    try:
        s = split_series(values, cfg)
    except LorankError:
        return  # too short for these sizes: a one-line error, checked elsewhere
    val_start, test_start = s.bounds
    assert 0 < val_start <= test_start < n
    edges = {"train": (0, val_start), "val": (val_start, test_start), "test": (test_start, n)}
    for part, (lo, hi) in edges.items():
        y = s.y[part][..., 0] * s.std[0] + s.mean[0]
        x = s.x[part][..., 0] * s.std[0] + s.mean[0]
        if len(y):
            assert y.min() >= lo - 1e-3 and y.max() <= hi - 1 + 1e-3  # targets stay inside
            np.testing.assert_allclose(y[:, 0] - x[:, -1], 1.0, atol=1e-3)  # no gap, no overlap
            assert x.min() >= -1e-3  # contexts only reach back, never forward


def test_missing_values_skip_or_interpolate_the_context():
    values = np.arange(40, dtype=np.float64)[:, None] * 2.0
    values[10] = np.nan
    starts = np.arange(5, 36)
    x, y, kept = make_windows(values, starts, 5, 3, "skip")
    assert not np.isnan(x).any() and not np.isnan(y).any()
    # Every window touching step 10 (context t-5..t-1 or target t..t+2) is gone.
    assert set(kept) == {t for t in starts if not (t - 5 <= 10 <= t + 2)}
    x, y, kept = make_windows(values, starts, 5, 3, "interpolate")
    assert not np.isnan(x).any() and not np.isnan(y).any()
    # Only windows with the gap in their target are dropped...
    assert set(kept) == {t for t in starts if not (t <= 10 <= t + 2)}
    # ...and a gap inside the context is filled linearly (the series is linear): exact.
    for xi, t in zip(x, kept, strict=True):
        if t - 5 < 10 < t - 1 or not (t - 5 <= 10 < t):
            np.testing.assert_allclose(xi[:, 0], 2.0 * np.arange(t - 5, t))
    # A gap at the context's edge takes the nearest observed value (nothing from the target).
    (xi,), _, _ = make_windows(values, np.array([11]), 5, 3, "interpolate")
    assert xi[-1, 0] == values[9, 0]


def test_real_series_with_missing_values(data_root):
    """CO₂ has 59 empty weeks: both modes give windows without NaN; skip gives fewer."""
    raw = load_series("timeseries/co2-weekly.csv", ["co2_ppm"], [data_root])
    assert np.isnan(raw).sum() == 59
    sizes = {}
    for mode in ("skip", "interpolate"):
        data = load_dataset(
            forecast_data(
                "timeseries/co2-weekly.csv",
                columns=["co2_ppm"],
                context=52,
                horizon=8,
                missing=mode,
            ),
            data_dir=data_root,
        )
        for split in ("train", "val", "test"):
            x, y = data._batch(split, slice(0, None))
            assert torch.isfinite(x).all() and torch.isfinite(y).all()
        sizes[mode] = data.info.train_size
    assert 0 < sizes["skip"] < sizes["interpolate"]


@pytest.mark.parametrize(
    "forecast, message",
    [
        ({"columns": ["seattle_temp"]}, "column 'seattle_temp' is not in temps-2010-hourly.csv"),
        ({"columns": ["date"]}, "column 'date' of temps-2010-hourly.csv is not numeric"),
        ({"horizon": 2000}, "horizon 2000 is longer than the test part"),
        ({"context": 6200}, "context 6200 \\+ horizon 24 do not fit the training part"),
        ({"file": "timeseries/nope.csv"}, "series file timeseries/nope.csv not found"),
    ],
)
def test_bad_forecast_inputs_are_one_line_errors(forecast, message, data_root):
    forecast = {"file": TEMPS, **forecast}
    with pytest.raises(LorankError, match=message) as e:
        load_dataset(forecast_data(**forecast), data_dir=data_root)
    assert "\n" not in str(e.value)


def test_fractions_must_leave_a_training_part():
    with pytest.raises(ValueError, match="must be below 1"):
        ForecastConfig(val_fraction=0.5, test_fraction=0.5)


# --------------------------------------------------------------------------------------------
# Models

INFO = DatasetInfo("forecast", "forecast", (48, 2), 0, None, 100, 20, horizon=12)
TINY = ForecastTransformerConfig(patch_len=8, stride=8, dim=16, depth=1, heads=2, dropout=0.0)


def test_forecaster_shapes_and_patches():
    torch.manual_seed(0)
    x = torch.randn(5, 48, 2)
    model = build_model(TINY, INFO)
    assert isinstance(model, ForecastTransformer) and model.n_patches == 6
    assert model(x).shape == (5, 12, 2)
    # A context that patches do not tile: the oldest steps are dropped, the newest kept.
    odd = ForecastTransformer(TINY.model_copy(update={"stride": 5}), 48, 12)
    assert odd.n_patches == 9 and odd.offset == 0
    odd = ForecastTransformer(TINY.model_copy(update={"stride": 6}), 50, 12)
    assert odd.offset == 0 + (50 - (7 * 6 + 8))
    linear = build_model(LinearForecasterConfig(), INFO)
    assert isinstance(linear, LinearForecaster) and linear(x).shape == (5, 12, 2)
    assert sum(p.numel() for p in linear.parameters()) == 48 * 12 + 12


def test_channels_are_forecast_independently_and_instance_norm_is_affine_equivariant():
    torch.manual_seed(0)
    model = build_model(TINY, INFO).eval()
    x = torch.randn(3, 48, 2)
    with torch.no_grad():
        out = model(x)
        # Channel independence: changing one channel leaves the other's forecast alone.
        y = x.clone()
        y[..., 1] += torch.randn(3, 48)
        torch.testing.assert_close(model(y)[..., 0], out[..., 0])
        # Instance normalisation: a·x + b forecasts a·f(x) + b (per window and channel).
        torch.testing.assert_close(model(3.0 * x + 7.0), 3.0 * out + 7.0, atol=1e-4, rtol=1e-4)


def test_forecasters_refuse_other_data_and_classifiers_refuse_series():
    image = DatasetInfo("mnist", "classification", (1, 28, 28), 10, None, 10, 10)
    with pytest.raises(LorankError, match="is a forecaster but mnist"):
        build_model(TINY, image)
    from lorank.models import MLPConfig

    with pytest.raises(LorankError, match="model mlp cannot forecast a series"):
        build_model(MLPConfig(), INFO)


def test_regression_loss_and_metrics():
    torch.manual_seed(0)
    model = build_model(LinearForecasterConfig(), INFO)
    x, y = torch.randn(7, 48, 2), torch.randn(7, 12, 2)
    with torch.no_grad():
        err = model(x) - y
    loss = task_loss(model, (x, y))
    torch.testing.assert_close(loss, err.square().mean())
    std = torch.tensor([2.0, 0.5])
    m = evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])], target_std=std)
    assert set(m) == {"loss", "mse", "mae", "mse_orig", "mae_orig"}
    assert math.isclose(m["mse"], float(err.square().mean()), rel_tol=1e-5)
    assert math.isclose(m["mae"], float(err.abs().mean()), rel_tol=1e-5)
    assert math.isclose(m["mse_orig"], float((err * std).square().mean()), rel_tol=1e-5)
    assert math.isclose(m["mae_orig"], float((err * std).abs().mean()), rel_tol=1e-5)


# --------------------------------------------------------------------------------------------
# Every training method on the transformer (pil and bipil fit MLPs only and refuse it)

METHODS = {
    "dense": {},
    "factorized": {"rank": 0.5},
    "svd": {"rank": 0.5},
    "dlrt": {"tolerance": 0.2, "r_min": 1},
    "oialr": {"delay": 1, "frequency": 1, "cutoff": 0.3},
    "hybrid": {"direction": "dense_to_lowrank", "switch_epoch": 1, "rank_rule": "rank=3"},
    "nnsvd": {"rank": 0.5},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_the_forecaster(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY, INFO)
    x, y = torch.randn(8, 48, 2), torch.randn(8, 12, 2)
    method = build({"name": name, **METHODS[name]})
    method.attach(loss_fn=task_loss, calibration=lambda n: [(x, y)], epochs=2)
    method.prepare(model)
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-3)
    losses = []
    for epoch in (1, 2):
        for _ in range(2):
            losses.append(float(method.train_step(model, optimizer, (x, y), task_loss)["loss"]))
        method.on_epoch_end(model, optimizer, epoch, {"loss_task": losses[-1]})
    assert all(math.isfinite(v) for v in losses)
    assert optimizer_holds_only(optimizer, model)
    low_rank = lorank.low_rank_layers(model)
    if name != "dense":
        attn = [n for n in low_rank if ".attn." in n]
        assert attn, f"{name} left the attention dense: {list(low_rank)}"
        assert all(isinstance(low_rank[n], LowRankLinear) for n in attn)
    assert "patch_embed" not in low_rank
    meta = {"model": TINY.model_dump(mode="json"), "data_info": INFO.__dict__}
    lorank.save(model, tmp_path / "m", meta)
    model.eval()
    loaded = lorank.load(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# --------------------------------------------------------------------------------------------
# The CLI end to end

TINY_RUN = """\
[data]
name = "forecast"
batch_size = 32
train_subset = 600

[data.forecast]
context = 48
horizon = 12

[model]
name = "forecast_transformer"
patch_len = 12
stride = 12
dim = 16
depth = 1
heads = 2

[optim]
lr = 3e-3

[train]
epochs = 2
threads = 1
"""


def test_cli_forecast_train_eval_compress_report(tmp_path, data_root, capsys):
    run = tmp_path / "runs" / "dense"
    config = tmp_path / "forecast.toml"
    config.write_text(TINY_RUN)
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and "test_acc" not in summary
    for key in ("test_mse", "test_mae", "test_mse_orig", "test_mae_orig", "val_mse"):
        assert math.isfinite(summary[key]), key
    assert summary["test_mse"] == summary["test_loss"]
    first, *_, last = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert last["test_mse"] < 0.5 * first["test_mse"]  # it learned something real
    # Original units: the per-city scales turn the normalised errors into °F.
    assert summary["test_mae_orig"] > summary["test_mae"]

    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert math.isclose(shown["test_mse"], summary["test_mse"], rel_tol=1e-6)
    assert "test_acc" not in shown

    low = tmp_path / "runs" / "compressed"
    assert main(["compress", str(run), "--rule", "rank=4", "--out", str(low), "--quiet"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["params_eval_after"] < shown["params_eval_before"]
    assert math.isfinite(shown["test_mse"]) and "test_acc" not in shown

    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method / setting"))
    assert "test MSE" in header and "test MAE (units)" in header
    assert "test acc" not in header
