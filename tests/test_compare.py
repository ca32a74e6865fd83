"""``lorank compare`` end to end on a tiny synthetic budget."""

import json

import pytest

from lorank.cli import main
from lorank.errors import LorankError
from lorank.experiments.compare import METHODS, method_settings, parse_hidden
from lorank.training.config import validate_config


@pytest.mark.parametrize("epochs", [1, 2, 5])
def test_every_method_config_validates_and_oialr_switches_within_the_budget(epochs):
    steps = 235
    for name in METHODS[:-1]:
        validate_config({"method": method_settings(name, epochs, steps)})
    oialr = method_settings("oialr", epochs, steps)
    assert oialr["delay"] < epochs * steps  # the low-rank phase starts within the run
    svd = method_settings("svd", epochs, steps)
    assert svd["finetune_epochs"] < epochs


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(LorankError, match="--hidden"):
        parse_hidden("a,b")
    assert main(["compare", "--dataset", "cifar10", "--out", str(tmp_path)]) == 2
    assert main(["compare", "--methods", "dense,lora", "--out", str(tmp_path)]) == 2


@pytest.mark.slow  # ~25 s on an idle 2-core CPU, over 60 s when the machine is shared
def test_compare_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--dataset",
        "synthetic",
        "--epochs",
        "2",
        "--hidden",
        "32,32",
        "--set",
        "data.synthetic_train=384",
        "--set",
        "data.synthetic_test=128",
        "--set",
        "data.batch_size=64",
        "--workers",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    runs = out / "runs"
    for method in ("dense", "factorized", "svd", "dlrt", "oialr", "nnsvd"):
        summary = json.loads((runs / f"{method},seed=0" / "summary.json").read_text())
        assert summary["status"] == "completed", method
        assert f"| {method} " in printed
    # Same model and data budget for every trained method.
    configs = [
        json.loads((runs / f"{m},seed=0" / "config.json").read_text())
        for m in ("dense", "factorized", "svd", "dlrt", "oialr")
    ]
    for key in ("data", "model", "train"):
        assert all(c[key] == configs[0][key] for c in configs)
    # nnsvd compressed the dense run (source recorded) with no training.
    compress = json.loads((runs / "nnsvd,seed=0" / "compress.json").read_text())
    assert compress["source"].endswith("dense,seed=0") and compress["finetune_epochs"] == 0
    for name in (
        "report.html",
        "summary.md",
        "compare.json",
        "figures/accuracy_params.png",
        "figures/loss_epoch.png",
        "figures/ranks.png",
        "figures/spectra.png",
    ):
        assert (out / name).is_file(), name
    info = json.loads((out / "compare.json").read_text())
    assert info["wall_time_s"] > 0 and info["epochs"] == 2

    # Rerunning resumes: every run is skipped, the report is rewritten.
    first = (runs / "dlrt,seed=0" / "summary.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (runs / "dlrt,seed=0" / "summary.json").stat().st_mtime_ns == first
