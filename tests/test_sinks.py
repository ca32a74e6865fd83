"""Logging sinks: what TensorBoard's own reader and a CSV reader get back is what
``metrics.jsonl`` says, ranks included."""

import csv

import pytest
from conftest import SYNTHETIC_DATA

from lorank.training.sinks import flatten_record

DLRT_RUN = {
    "data": SYNTHETIC_DATA,
    "model": {"name": "mlp", "hidden": [32, 32]},
    "method": {"name": "dlrt", "tolerance": 0.2},
    "optim": {"lr": 3e-3},
    "train": {"epochs": 3, "threads": 1},
}


def test_tensorboard_events_hold_the_metrics_of_the_run(run_config):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    run = run_config(DLRT_RUN, "log.tensorboard=true", "log.every_steps=5")
    events = event_accumulator.EventAccumulator(
        str(run.path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}
    )
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for record in run.records:
        for key, value in flatten_record(record).items():
            assert key in tags, key
            logged = {e.step: e.value for e in events.Scalars(key)}
            assert logged[record["epoch"]] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert any(t.startswith("rank/") for t in tags)  # DLRT's ranks, per layer
    assert "step/loss" in tags and len(events.Scalars("step/loss")) >= 3
    histograms = events.Tags()["histograms"]
    assert any(h.startswith("singular_values/") for h in histograms)


def test_csv_has_one_row_per_epoch_with_the_metrics(run_config):
    run = run_config(DLRT_RUN, "log.csv=true")
    with (run.path / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(run.records)
    for row, record in zip(rows, run.records, strict=True):
        for key, value in flatten_record(record).items():
            assert float(row[key]) == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_a_missing_sink_package_is_a_one_line_error(run_config, monkeypatch, tmp_path):
    import builtins

    from lorank.errors import LorankError

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(LorankError, match="pip install wandb"):
        run_config(DLRT_RUN, "log.wandb=true", "train.epochs=1", name="no-wandb")
    assert not (tmp_path / "no-wandb").exists()  # refused before the run directory exists
