"""End-to-end training on real data through the trainer and the real `lorank` command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorank.cli import main
from lorank.training.config import load_config
from lorank.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_times(recs):
    drop = {"time_s", "epoch_time_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


def test_real_mnist_mlp_run_reaches_90_percent(tmp_path, data_root):
    cfg = load_config(
        ROOT / "src/lorank/configs/mnist-mlp-dense.toml",
        ["train.epochs=2", "data.train_subset=12000", "model.hidden=[256, 256]"],
    )
    run = train(cfg, tmp_path / "run", quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test_acc"] > 0.90
    assert (
        summary["params_eval"]
        == summary["params_dense"]
        == 784 * 256 + 256 + 256 * 256 + 256 + 2570
    )
    assert summary["compression"] == 0.0 and summary["ranks"] == {}
    for name in ("config.json", "env.json", "model.safetensors", "model.json"):
        assert (run / name).is_file()
    recs = records(run)
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    for key in (
        "train_loss",
        "test_loss",
        "test_acc",
        "params_eval",
        "params_train",
        "params_dense",
        "ranks",
        "time_s",
    ):
        assert key in recs[-1]
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] and env["threads"] >= 1


def test_same_seed_same_metrics_different_seed_different(tmp_path):
    overrides = ["data.name=synthetic", "model.hidden=[32]", "train.epochs=2", "data.batch_size=64"]
    runs = [
        train(load_config(None, overrides + [f"train.seed={s}"]), tmp_path / f"r{i}", quiet=True)
        for i, s in enumerate([3, 3, 4])
    ]
    a, b, c = (without_times(records(r)) for r in runs)
    assert a == b
    assert a != c
    assert a[-1]["test_acc"] > 0.9


@pytest.mark.parametrize(
    "overrides, check",
    [
        (
            [
                "data.name=fashion-mnist",
                "data.train_subset=6000",
                "data.test_subset=2000",
                "model.name=lenet5",
                "train.epochs=1",
            ],
            lambda s: s["test_acc"] > 0.6,
        ),
        (
            [
                "data.name=cifar10",
                "data.train_subset=2000",
                "data.test_subset=1000",
                "model.name=vgg",
                "model.channels=[8, 'M', 16, 'M']",
                "model.hidden=32",
                "train.epochs=1",
            ],
            lambda s: s["test_acc"] > 0.15,
        ),
        (
            [
                "data.name=tinyshakespeare",
                "data.block_size=32",
                "data.train_subset=1500",
                "data.test_subset=200",
                "model.name=char_transformer",
                "model.n_layer=1",
                "model.d_model=32",
                "model.n_head=2",
                "optim.lr=3e-3",
                "train.epochs=1",
            ],
            lambda s: s["test_ppl"] < 30,
        ),
    ],
    ids=["fashion-lenet", "cifar-vgg", "shakespeare-transformer"],
)
def test_short_real_run_per_dataset_kind(tmp_path, data_root, overrides, check):
    run = train(load_config(None, overrides), tmp_path / "run", quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    assert check(summary), summary


def test_divergence_is_reported_and_results_kept(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(ROOT / "src/lorank/configs/mnist-mlp-dense.toml"),
            "--out",
            str(out),
            "--quiet",
            "--set",
            "data.name=synthetic",
            "--set",
            "model.hidden=[16]",
            "--set",
            "optim.name=sgd",
            "--set",
            "optim.lr=1e12",
            "--set",
            "train.epochs=3",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1  # a run that failed while running
    assert "diverged at epoch" in err and "lower optim.lr" in err
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_cli_train_eval_and_refusals_end_to_end(tmp_path, data_root):
    env = dict(os.environ)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "lorank",
        "train",
        str(ROOT / "src/lorank/configs/mnist-mlp-dense.toml"),
        "--out",
        str(out),
        "--quiet",
        "--set",
        "train.epochs=1",
        "--set",
        "data.train_subset=2000",
        "--set",
        "model.hidden=[64]",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["run_dir"] == str(out)
    before = (out / "metrics.jsonl").read_text()

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing lost

    ev = subprocess.run(
        [sys.executable, "-m", "lorank", "eval", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert result["test_acc"] == pytest.approx(summary["test_acc"])

    bad = subprocess.run(
        cmd[:-6] + ["--overwrite", "--set", "optim.lrr=1"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "lorank: error: config error: unknown key 'optim.lrr' "
        "(allowed: betas, gamma, grad_clip, lr, min_lr_ratio, momentum, "
        "name, nesterov, schedule, step_size, warmup_steps, "
        "weight_decay)"
    )
    assert (out / "metrics.jsonl").read_text() == before  # a bad config destroys nothing


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "missing.toml"], "config file missing.toml does not exist"),
        (["eval", "no-such-run"], "checkpoint no-such-run not found"),
        (
            ["train", "CFG", "--set", "data.dir=/nonexistent", "--set", "data.name=fashion-mnist"],
            "fashion-mnist",
        ),
    ],
)
def test_cli_errors_one_line_exit_2(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LORANK_OFFLINE", "1")
    monkeypatch.setenv("LORANK_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    args = [
        str(ROOT / "src/lorank/configs/mnist-mlp-dense.toml") if a == "CFG" else a for a in args
    ]
    code = main(
        args
        + (
            ["--out", str(tmp_path / "o"), "--quiet"]
            if args[0] == "train" and "CFG" not in args and len(args) > 2
            else []
        )
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_help_documents_every_command(capsys):
    assert main(["--help"]) == 0  # main returns the status; it never raises SystemExit
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--set" in out and "[optim]" in out and "--overwrite" in out
