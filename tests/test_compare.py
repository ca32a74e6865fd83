"""``lorank compare`` end to end on a tiny synthetic budget."""

import json

import pytest

from lorank.cli import main
from lorank.errors import LorankError
from lorank.experiments.compare import method_settings, parse_hidden, presets
from lorank.training.config import validate_config


@pytest.mark.parametrize("epochs", [1, 2, 5])
def test_every_method_config_validates_and_oialr_switches_within_the_budget(epochs):
    steps = 235
    for name in [m for m, p in presets().items() if "method" in p]:
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


def _settings_before_presets(name, epochs, steps):
    # compare's hard-coded settings before they became TOML presets: the presets must
    # reproduce them exactly, so `make demo` trains the same runs.
    import math

    return {
        "dense": {"name": "dense"},
        "factorized": {"name": "factorized", "rank": 0.125, "keep_last_dense": True},
        "svd": {
            "name": "svd",
            "rank": 0.4,
            "lambda_orth": 1.0,
            "lambda_sparsity": 0.003,
            "sparsity": "hoyer",
            "rule": "energy=0.02",
            "finetune_epochs": 1 if epochs >= 2 else 0,
            "prune_at_end": epochs < 2,
        },
        "dlrt": {
            "name": "dlrt",
            "integrator": "parallel",  # the default integrator since issue 17
            "adaptive": True,
            "tolerance": 0.15,
            "init_rank": 0.5,
            "r_min": 2,
            "r_max": 0.5,
        },
        "pil": {"name": "pil"},
        "bipil": {"name": "bipil"},
        "oialr": {
            "name": "oialr",
            "delay": max(1, (max(1, math.ceil(epochs / 3)) if epochs > 1 else 0) * steps),
            "frequency": max(1, steps // 2),
            "cutoff": 0.3,
            "max_cut_fraction": 0.5,
            "keep_last_dense": True,
        },
    }[name]


@pytest.mark.parametrize("epochs", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("steps", [1, 8, 235])
def test_presets_reproduce_the_settings_compare_always_used(epochs, steps):
    for name in ("dense", "factorized", "svd", "dlrt", "pil", "bipil", "oialr"):
        assert method_settings(name, epochs, steps) == _settings_before_presets(name, epochs, steps)


def test_every_registered_method_has_a_compare_preset_and_is_listed_everywhere(capsys):
    from lorank.experiments.compare import default_methods
    from lorank.experiments.report.collect import method_rank
    from lorank.methods import METHODS

    assert list(METHODS)[:9] == list(presets())[:9]  # registry order, every method
    assert set(METHODS) <= set(presets())
    assert {"pil", "bipil", "nnsvd"} <= set(default_methods())
    ranks = [method_rank(m) for m in METHODS]
    assert ranks == sorted(ranks) and all(r[0] < len(METHODS) for r in ranks)
    for command in (["train", "--help"], ["compare", "--help"]):
        assert main(command) == 0
        text = capsys.readouterr().out
        assert all(m in text for m in METHODS), command


def test_budget_values_are_parsed_not_evaluated():
    from lorank.experiments.compare import budget_value

    assert (
        budget_value(
            "= max(1, ceil(epochs / 3)) * steps_per_epoch", {"epochs": 4, "steps_per_epoch": 10}
        )
        == 20
    )
    with pytest.raises(LorankError, match="cannot evaluate"):
        budget_value("= __import__('os').getcwd()", {"epochs": 1, "steps_per_epoch": 1})
