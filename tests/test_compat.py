"""Run directories and checkpoints written by release 0.1.0 (before the package layout of
``lorank/core``, ``lorank/training``, ...) still load, evaluate and resume to the same result.

The fixtures in ``tests/fixtures/release-0.1.0`` were written by commit b7d74ee with
``lorank train`` on a tiny synthetic problem (MLP 16-16, 2 epochs, seed 0, one thread): a
``dlrt`` run (low-rank layer specs in ``model.json``) and a ``dense`` run with its epoch-1
checkpoint (optimizer, schedule and RNG state).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorank
from lorank.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "release-0.1.0"


def test_a_release_checkpoint_rebuilds_and_evaluates_to_its_summary(capsys):
    run = FIXTURES / "dlrt"
    model = lorank.load(run / "model")
    assert set(lorank.core.metrics.ranks(model)) == set(
        json.loads((run / "model.json").read_text())["low_rank_layers"]
    )
    assert main(["eval", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert result["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)
    assert result["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)


def test_a_release_checkpoint_resumes_to_the_release_result(tmp_path):
    run = tmp_path / "dense"
    shutil.copytree(FIXTURES / "dense", run)
    final = load_file(run / "model.safetensors")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for name in ("model.safetensors", "model.json", "summary.json"):
        (run / name).unlink()
    assert main(["train", "--resume", str(run), "--set", "train.threads=1"]) == 0
    resumed = load_file(run / "model.safetensors")
    assert resumed.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(resumed[key], final[key], rtol=0, atol=0)
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in records]
