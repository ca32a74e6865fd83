"""Sweeps: grid × seeds expansion, the [sweep] TOML section, worker planning, resume."""

import json
import shutil
from pathlib import Path

import pytest

from lorank.cli import main
from lorank.errors import LorankError
from lorank.experiments.sweep import (
    Sweep,
    load_sweep,
    parse_grid_arg,
    parse_seeds,
    plan_workers,
    run_sweep,
)
from lorank.training.config import validate_config
from lorank.training.rundir import run_status

TINY = """
[data]
name = "synthetic"
batch_size = 64
synthetic_train = 256
synthetic_test = 128

[model]
name = "mlp"
hidden = [16]

[optim]
name = "adam"
lr = 1e-2

[train]
epochs = 1
threads = 1
"""


@pytest.fixture
def tiny_toml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_grid_times_seeds_is_the_cartesian_product(tiny_toml):
    sweep = load_sweep(tiny_toml, ["optim.lr=1e-2,1e-3,1e-4", "model.hidden=[8],[16]"], "0,1", ())
    runs = sweep.runs()
    assert len(runs) == 3 * 2 * 2
    combos = {(r.settings["optim.lr"], tuple(r.settings["model.hidden"]), r.seed) for r in runs}
    assert len(combos) == 12  # all distinct
    assert len({r.name for r in runs}) == 12
    # Each run's config carries its values and validates.
    for r in runs:
        config = validate_config(r.raw)
        assert config.optim.lr == r.settings["optim.lr"]
        assert config.model.hidden == r.settings["model.hidden"]
        assert config.train.seed == r.seed
    assert runs[0].name == "lr=0.01,hidden=8,seed=0"
    assert runs[1].name == "lr=0.01,hidden=8,seed=1"  # seed varies fastest


def test_toml_sweep_section_is_stripped_and_cli_grid_replaces_its_key(tiny_toml):
    tiny_toml.write_text(
        TINY
        + """
[sweep]
grid = { "optim.lr" = [0.1, 0.01], "train.epochs" = [1, 2] }
seeds = [3, 4, 5]
"""
    )
    sweep = load_sweep(tiny_toml, ["optim.lr=0.5"], None, ["data.batch_size=32"])
    assert "sweep" not in sweep.base
    assert sweep.grid == {"optim.lr": [0.5], "train.epochs": [1, 2]}
    assert sweep.seeds == [3, 4, 5]
    runs = sweep.runs()
    assert len(runs) == 1 * 2 * 3
    assert all(r.raw["data"]["batch_size"] == 32 for r in runs)
    # --seeds beats the TOML's seeds.
    assert load_sweep(tiny_toml, (), "0-1", ()).seeds == [0, 1]


def test_bad_sweep_inputs_are_one_line_errors(tiny_toml):
    with pytest.raises(LorankError, match="key=v1,v2"):
        parse_grid_arg("optim.lr")
    with pytest.raises(LorankError, match="seeds"):
        parse_seeds("a,b")
    with pytest.raises(LorankError, match="--seeds"):
        load_sweep(tiny_toml, ["train.seed=1,2"], None, ())
    # A bad grid value fails at expansion, before any training, naming the run.
    with pytest.raises(LorankError, match=r"optim\.lr=-1"):
        load_sweep(tiny_toml, ["optim.lr=-1"], "0", ()).runs()
    tiny_toml.write_text(TINY + "\n[sweep]\ngrids = {}\n")
    with pytest.raises(LorankError, match="sweep.grids"):
        load_sweep(tiny_toml)


@pytest.mark.parametrize(
    "cores,runs,workers,threads,expected",
    [
        (8, 100, None, None, (8, 1)),
        (8, 3, None, None, (3, 2)),  # no more workers than runs; spare cores become threads
        (8, 100, 2, None, (2, 4)),
        (8, 100, None, 4, (2, 4)),
        (2, 100, None, None, (2, 1)),
        (1, 5, None, None, (1, 1)),
    ],
)
def test_workers_times_threads_fit_the_cores(cores, runs, workers, threads, expected):
    got = plan_workers(runs, workers, threads, cores=cores)
    assert got == expected
    if workers is None and threads is None:
        assert got[0] * got[1] <= cores


def test_resume_skips_finished_runs_and_restarts_broken_ones(tiny_toml, tmp_path):
    out = tmp_path / "sweep"
    sweep = load_sweep(tiny_toml, ["optim.lr=1e-2,1e-3"], "0", ())
    run_sweep(sweep, out, workers=1, quiet=True)
    index = json.loads((out / "sweep.json").read_text())
    assert index["counts"]["completed"] == 2
    done, broken = (out / r.name for r in sweep.runs())
    assert run_status(done) == "completed"

    # Simulate a run killed before its first checkpoint: summary says running, metrics torn.
    # (A run killed after a checkpoint resumes from it instead: tests/test_resume.py.)
    shutil.rmtree(broken / "checkpoints")
    (broken / "summary.json").write_text(json.dumps({"status": "running"}))
    (broken / "metrics.jsonl").write_text('{"epoch": 0')
    (broken / ".metrics.jsonl.x1.tmp").write_text("left over")  # a killed atomic write
    assert run_status(broken) == "broken"
    done_mtime = (done / "summary.json").stat().st_mtime_ns

    run_sweep(sweep, out, workers=1, quiet=True)
    index = json.loads((out / "sweep.json").read_text())
    entries = {e["name"]: e for e in index["runs"]}
    assert entries[done.name].get("skipped") is True
    assert (done / "summary.json").stat().st_mtime_ns == done_mtime  # untouched
    assert entries[broken.name]["status"] == "completed"
    assert not (broken / ".metrics.jsonl.x1.tmp").exists()  # restarted from scratch
    assert run_status(broken) == "completed"


def test_diverged_run_is_recorded_and_the_sweep_continues(tiny_toml, tmp_path):
    out = tmp_path / "sweep"
    # SGD at lr 1e30 makes the loss NaN (the trainer stops and raises); at lr 1e6 the loss
    # stays finite but explodes to ~1e31 (the trainer completes; the sweep marks it).
    sweep = load_sweep(tiny_toml, ["optim.lr=1e30,1e6,1e-2"], "0", ["optim.name=sgd"])
    run_sweep(sweep, out, workers=1, quiet=True)
    index = json.loads((out / "sweep.json").read_text())
    statuses = {e["settings"]["optim.lr"]: e["status"] for e in index["runs"]}
    assert statuses == {1e30: "diverged", 1e6: "diverged", 1e-2: "completed"}
    assert {e["settings"]["optim.lr"]: e.get("diverged_epoch") for e in index["runs"]} == {
        1e30: 1,
        1e6: 1,
        1e-2: None,
    }
    assert index["counts"]["diverged"] == 2
    # A diverged run counts as finished: a rerun skips it.
    run_sweep(sweep, out, workers=1, quiet=True)
    index = json.loads((out / "sweep.json").read_text())
    assert all(e.get("skipped") for e in index["runs"])


def test_two_worker_processes_via_cli(tiny_toml, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            str(tiny_toml),
            "--grid",
            "optim.lr=1e-2,3e-3",
            "--seeds",
            "0",
            "--workers",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["completed"] == 2
    for name in ("lr=0.01,seed=0", "lr=0.003,seed=0"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["status"] == "completed"
        env = json.loads((out / name / "env.json").read_text())
        assert env["threads"] == 1  # 2 workers on this config's 1 thread each


def test_sweep_without_grid_runs_the_seeds(tiny_toml):
    sweep = Sweep(base=validate_config({}).model_dump(mode="json"), seeds=[0, 1, 2])
    assert [r.name for r in sweep.runs()] == ["seed=0", "seed=1", "seed=2"]
