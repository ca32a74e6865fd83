"""Kill a run with SIGKILL mid-epoch, resume it, and get exactly the uninterrupted result."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorank.cli import main
from lorank.training.checkpoint import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "data.name=synthetic",
    "data.synthetic_train=1024",
    "data.batch_size=64",
    "model.hidden=[32, 32]",
    "train.epochs=4",
    "train.threads=1",
]

# Runs lorank in a child process that SIGKILLs itself at a given optimizer step, i.e. in the
# middle of an epoch, the way a crash or an OOM killer would.
KILLER = """
import os, signal, sys
from lorank.methods.base import Method
kill_at = int(sys.argv[1])
original = Method.train_step
def train_step(self, *args, **kwargs):
    if self.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
Method.train_step = train_step
for cls in Method.__subclasses__():
    if "train_step" in vars(cls):  # methods with their own step: wrap those too
        own = cls.train_step
        def wrapped(self, *a, _own=own, **k):
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _own(self, *a, **k)
        cls.train_step = wrapped
from lorank.cli import main
sys.exit(main(sys.argv[2:]))
"""

METHODS = {
    "dense": [],
    "dlrt": ["method.name=dlrt", "method.adaptive=true", "method.tolerance=0.1"],
    "oialr": ["method.name=oialr", "method.delay=20", "method.frequency=10"],
}


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


def strip_times(records):
    return [{k: v for k, v in r.items() if k not in ("time_s", "epoch_time_s")} for r in records]


def read(run):
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("train_time_s")
    summary.pop("flop_count_s", None)  # time spent counting FLOPs, like train_time_s
    return strip_times(metrics), summary, load_file(run / "model.safetensors")


@pytest.mark.parametrize("method", list(METHODS))
def test_sigkill_mid_epoch_then_resume_is_identical(method, tmp_path):
    pytest.importorskip(f"lorank.methods.{method}")
    overrides = BASE + METHODS[method]
    config = str(ROOT / "tests/bad_inputs/ok.toml")
    reference = tmp_path / "reference"
    assert main(["train", config, "--out", str(reference), "--quiet"] + sets(overrides)) == 0

    crashed = tmp_path / "crashed"
    # 16 steps per epoch: step 40 is in the middle of epoch 3 (and after OIALR's switch).
    child = subprocess.run(
        [sys.executable, "-c", KILLER, "40", "train", config, "--out", str(crashed), "--quiet"]
        + sets(overrides),
        capture_output=True,
        text=True,
        check=False,
    )
    assert child.returncode == -9, child.stderr
    assert json.loads((crashed / "summary.json").read_text())["status"] == "running"
    assert [p.name for p in complete_checkpoints(crashed)] == ["epoch-0001", "epoch-0002"]

    assert main(["train", "--resume", str(crashed), "--quiet"]) == 0
    ref_metrics, ref_summary, ref_weights = read(reference)
    metrics, summary, weights = read(crashed)
    assert summary == ref_summary
    assert metrics == ref_metrics
    assert weights.keys() == ref_weights.keys()
    for key, value in ref_weights.items():
        assert weights[key].equal(value), key


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(["train", "--resume", str(run)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_checkpoints_keep_the_last_k(tmp_path):
    run = tmp_path / "run"
    config = str(ROOT / "tests/bad_inputs/ok.toml")
    overrides = ["train.epochs=5", "train.keep_checkpoints=3", "train.checkpoint_every=2"]
    assert main(["train", config, "--out", str(run), "--quiet"] + sets(overrides)) == 0
    assert [p.name for p in complete_checkpoints(run)] == ["epoch-0002", "epoch-0004", "epoch-0005"]
    assert not list((run / "checkpoints").glob(".tmp*"))


def test_a_hand_edited_flop_count_in_a_checkpoint(tmp_path, capsys):
    """The FLOP counter's state in state.json: a malformed structure cache only means the step
    is counted again (the run resumes); a count that is not a number is a one-line error
    that leaves the run directory as it was."""
    run = tmp_path / "run"
    config = str(ROOT / "tests/bad_inputs/ok.toml")
    overrides = ["train.epochs=2", "train.checkpoint_every=1"]
    assert main(["train", config, "--out", str(run), "--quiet"] + sets(overrides)) == 0
    state_file = complete_checkpoints(run)[-1] / "state.json"
    original = state_file.read_text()

    def edit(key, value):
        state = json.loads(original)
        top = dict(state["__dict__"])
        flops = dict(top["flops"]["__dict__"])
        flops[key] = value
        top["flops"] = {"__dict__": [[k, v] for k, v in flops.items()]}
        state["__dict__"] = [[k, v] for k, v in top.items()]
        state_file.write_text(json.dumps(state))

    edit("counted", {"__tuple__": [{"__tuple__": ["layers.0.weight", {"__tuple__": [8]}]}]})
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.epochs=3"]) == 0
    capsys.readouterr()
    state_file = complete_checkpoints(run)[-1] / "state.json"
    original = state_file.read_text()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    edit("step_flops", "many")
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.epochs=4"]) == 2
    err = capsys.readouterr().err
    assert "unreadable FLOP count" in err and "step_flops" in err and len(err.splitlines()) == 1
    before[state_file] = state_file.read_bytes()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
