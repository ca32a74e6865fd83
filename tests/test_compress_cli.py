"""``lorank compress`` end to end on a small dense MLP trained on real MNIST (a subset)."""

import json
import os
from pathlib import Path

import pytest
import torch

import lorank
from lorank.cli import main
from lorank.training.config import validate_config
from lorank.training.evaluate import evaluate_checkpoint
from lorank.training.trainer import train

CONFIG = """\
[data]
name = "mnist"
batch_size = 128
train_subset = 3000
test_subset = 1000

[model]
name = "mlp"
hidden = [96, 96]

[optim]
lr = 2e-3

[train]
epochs = 2
threads = 1
"""


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    root = os.environ.get("LORANK_DATA")
    if not root or not (Path(root) / "mnist").is_dir():
        pytest.skip("no MNIST: set LORANK_DATA or place ../shared/datasets")
    base = tmp_path_factory.mktemp("compress")
    (base / "dense.toml").write_text(CONFIG)
    import tomllib

    run = train(validate_config(tomllib.loads(CONFIG)), base / "dense", quiet=True)
    return run, base


def compress(args, capsys):
    code = main(["compress", *[str(a) for a in args], "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def summary_of(path):
    return json.loads((Path(path) / "summary.json").read_text())


def test_rule_compression_reports_before_and_after(dense_run, capsys):
    run, base = dense_run
    out = base / "tol"
    code, stdout, _ = compress([run, "--rule", "tolerance=0.3", "--out", out], capsys)
    assert code == 0
    summary = summary_of(out)
    printed = json.loads(stdout)
    assert printed["test_acc_after"] == summary["test_acc_after"]
    trained = summary_of(run)
    assert summary["test_acc_before"] == pytest.approx(trained["test_acc"])
    assert summary["params_eval_before"] == trained["params_eval"]
    assert summary["params_eval_after"] < summary["params_eval_before"]
    assert summary["test_acc_after"] > max(0.7, summary["test_acc_before"] - 0.15)
    assert summary["rule"] == "tolerance=0.3"
    names = [row["name"] for row in summary["layers"]]
    assert names == ["layers.0", "layers.2", "layers.4"]
    for row in summary["layers"]:
        assert row["status"] in ("converted", "kept")
        if row["status"] == "converted":
            assert summary["ranks"][row["name"]] == row["rank"] < row["full_rank"]
    assert summary["theorem1"]["bound"] > 0 and summary["output_diff_max"] > 0
    # the run directory evaluates like any other
    evaluated = evaluate_checkpoint(out)
    assert evaluated["test_acc"] == pytest.approx(summary["test_acc_after"])
    assert evaluated["params_eval"] == summary["params_eval_after"]
    assert {p.name for p in out.iterdir()} >= {
        "summary.json",
        "config.json",
        "compress.json",
        "env.json",
        "metrics.jsonl",
        "model.json",
        "model.safetensors",
    }
    assert not list(base.glob(".tol.*"))  # no temp directory left behind


def test_loss_tolerance_keeps_the_calibration_loss_within_epsilon(dense_run, capsys):
    run, base = dense_run
    out = base / "loss"
    code, _, _ = compress(
        [run, "--rule", "loss-tolerance=0.02", "--samples", 1000, "--out", out], capsys
    )
    assert code == 0
    summary = summary_of(out)
    search = summary["search"]
    assert summary["calibration_samples"] == 1000
    assert abs(summary["calibration_loss_after"] - summary["calibration_loss_before"]) < 0.02
    assert search["loss_change"] < 0.02 and 0 < search["delta"] <= 1
    assert summary["params_eval_after"] < summary["params_eval_before"]


def test_finetune_and_overwrite(dense_run, capsys):
    run, base = dense_run
    mine = base / "mine"
    mine.mkdir()
    (mine / "stale.txt").write_text("x")
    code, _, err = compress([run, "--rule", "rank=8", "--out", mine, "--overwrite"], capsys)
    assert code == 2 and "replaces only an empty directory or a lorank run" in err
    assert (mine / "stale.txt").read_text() == "x"  # not a run: --overwrite leaves it alone
    out = base / "ft"
    assert compress([run, "--rule", "rank=4", "--out", out], capsys)[0] == 0
    code, _, err = compress([run, "--rule", "rank=8", "--finetune-epochs", 1, "--out", out], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, _ = compress(
        [
            run,
            "--rule",
            "rank=8",
            "--finetune-epochs",
            1,
            "--out",
            out,
            "--overwrite",
            "--set",
            "optim.lr=1e-3",
        ],
        capsys,
    )
    assert code == 0
    summary = summary_of(out)
    assert summary["ranks"] == {"layers.0": 8, "layers.2": 8, "layers.4": 8}
    assert summary["finetune"]["epochs"] == 1
    assert summary["test_acc"] == summary["finetune"]["test_acc"]
    assert summary["test_acc"] > summary["test_acc_after"]  # fine-tuning recovers accuracy
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2  # epoch 0 (compressed) and the fine-tune epoch
    assert json.loads(records[0])["test_acc"] == pytest.approx(summary["test_acc_after"])
    # The compressed model's cost: the dense source's training plus the fine-tune epoch; its
    # inference at rank 8 is 2·8·(m + n) per low-rank layer, far below the dense 2·m·n.
    source = summary_of(run)
    assert summary["train_flops"] == source["train_flops"] + summary["finetune"]["train_flops"]
    assert summary["finetune"]["train_flops"] > 0
    assert summary["inference_flops_before"] == source["inference_flops"]
    dims = [784, 96, 96, 10]
    low_rank = sum(2 * 8 * (a + b) for a, b in zip(dims, dims[1:], strict=False))
    assert summary["inference_flops"] == pytest.approx(low_rank, rel=0.02)


def test_plain_state_dict_with_model_config(dense_run, capsys):
    run, base = dense_run
    model = lorank.load(run / "model")
    torch.save(model.state_dict(), base / "weights.pt")
    out = base / "from_state_dict"
    code, _, err = compress([base / "weights.pt", "--rule", "energy=0.05", "--out", out], capsys)
    assert code == 2 and "--model-config" in err
    code, _, _ = compress(
        [
            base / "weights.pt",
            "--model-config",
            base / "dense.toml",
            "--rule",
            "energy=0.05",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0
    summary = summary_of(out)
    assert summary["source_kind"] == "state_dict"
    assert summary["test_acc_before"] == pytest.approx(summary_of(run)["test_acc"])


@pytest.mark.parametrize("rule", ["tolerance=abc", "loss-tolerance=-1", "bogus=3", "rank=0"])
def test_bad_rule_is_a_one_line_error(dense_run, capsys, rule):
    run, base = dense_run
    code, _, err = compress([run, "--rule", rule, "--out", base / "bad"], capsys)
    assert code == 2
    assert err.startswith("lorank: error:") and err.count("\n") == 1
    assert "loss-tolerance" in err
    assert not (base / "bad").exists()


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    code, _, err = compress([tmp_path / "nope", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith("lorank: error:") and err.count("\n") == 1
    assert "not found" in err
    (tmp_path / "empty").mkdir()
    code, _, err = compress([tmp_path / "empty", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "model.json" in err


def test_compress_a_hugging_face_model_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2-tiny")
    out = tmp_path / "out"
    code = main(["compress", str(tmp_path / "gpt2-tiny"), "--rule", "rank=8", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_eval_after"] < summary["params_eval_before"]
    assert summary["ranks"] and set(summary["ranks"].values()) == {8}


def test_activation_svd_with_greedy_budget(dense_run, capsys):
    run, base = dense_run
    out = base / "act-greedy"
    code, _, err = compress(
        [run, "--svd", "activation", "--calibration", "512", "--budget", "0.3", "--out", out],
        capsys,
    )
    assert code == 0, err
    s = summary_of(out)
    assert s["svd"] == "activation"
    compressed = [r for r in s["layers"] if r["status"] != "kept"]
    weights_before = sum(r["shape"][0] * r["shape"][1] for r in s["layers"])
    weights_after = sum(
        r["rank"] * sum(r["shape"]) if r["status"] != "kept" else r["shape"][0] * r["shape"][1]
        for r in s["layers"]
    )
    assert compressed and weights_after <= 0.3 * weights_before
    assert set(s["calibration_rows"]) == {r["name"] for r in s["layers"]}
    assert all(rows == 512 for rows in s["calibration_rows"].values())
    comparison = s["svd_comparison"]
    # Same ranks, activation-aware factors: no worse on the data they were fitted to.
    assert comparison["activation"]["calibration_loss"] <= comparison["plain"]["calibration_loss"]
    assert s["test_loss_after"] == pytest.approx(comparison["activation"]["test_loss"], rel=1e-5)
    assert s["test_acc_after"] > 0.8
    # The compressed model reloads and evaluates to the same figure.
    assert evaluate_checkpoint(out)["test_acc"] == pytest.approx(s["test_acc_after"])


def test_uniform_budget_with_plain_svd_keeps_each_layer_fraction(dense_run, capsys):
    run, base = dense_run
    out = base / "plain-uniform"
    code, _, err = compress(
        [run, "--budget", "0.5", "--allocation", "uniform", "--out", out], capsys
    )
    assert code == 0, err
    s = summary_of(out)
    assert "svd_comparison" not in s
    for row in s["layers"]:
        m, n = row["shape"]
        assert row["rank"] * (m + n) <= 0.5 * m * n
        assert row["rank"] == max(1, int(0.5 * m * n // (m + n)))


@pytest.mark.parametrize(
    "extra",
    [["--budget", "1.5"], ["--calibration", "0"], ["--damping", "-1"]],
)
def test_bad_calibration_options_are_one_line_errors(dense_run, capsys, extra):
    run, base = dense_run
    code, _, err = compress([run, *extra, "--out", base / "bad"], capsys)
    assert code == 2
    assert err.startswith("lorank: error:") and len(err.strip().splitlines()) == 1


def test_calibration_file_of_training_inputs_equals_training_calibration(dense_run, capsys):
    import tomllib

    import numpy as np

    from lorank.data import load_dataset

    run, base = dense_run
    data = load_dataset(validate_config(tomllib.loads(CONFIG)).data)
    x = torch.cat([b[0] for b in data.train_subset_batches(300)])
    np.save(base / "inputs.npy", x.flatten(1).numpy())  # flattened rows are reshaped back
    common = [run, "--svd", "activation", "--budget", "0.4", "--samples", "256"]
    outs = [base / "calib-train", base / "calib-file"]
    code, _, err = compress([*common, "--calibration", "300", "--out", outs[0]], capsys)
    assert code == 0, err
    code, _, err = compress(
        [*common, "--calibration-file", base / "inputs.npy", "--out", outs[1]], capsys
    )
    assert code == 0, err
    train, file = summary_of(outs[0]), summary_of(outs[1])
    assert set(file["calibration_rows"].values()) == {300}
    assert json.loads((outs[1] / "compress.json").read_text())["calibration"] == 300
    assert file["ranks"] == train["ranks"]
    assert file["test_loss_after"] == pytest.approx(train["test_loss_after"], rel=1e-6)


def test_loss_tolerance_flag_searches_the_global_budget(dense_run, capsys):
    run, base = dense_run
    out = base / "loss-tol"
    code, _, err = compress(
        [run, "--loss-tolerance", "0.05", "--allocation", "greedy", "--samples", "512"]
        + ["--precision", "0.02", "--out", out],
        capsys,
    )
    assert code == 0, err
    s = summary_of(out)
    search = s["search"]
    assert search["kind"] == "budget" and s["rule"].startswith("loss-tolerance=0.05")
    assert abs(s["calibration_loss_after"] - s["calibration_loss_before"]) < 0.05
    assert 0 < search["budget"] < 1
    # Bisection: the budget returned was feasible, one step below it (to the precision) not.
    infeasible = [t["budget"] for t in search["trials"] if not t["feasible"]]
    assert infeasible and search["budget"] - max(infeasible) <= 0.02
    assert s["params_eval_after"] < s["params_eval_before"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text.txt", "takes tensors"),
        ("wrong.pt", "shape"),
        ("ints.pt", "float inputs"),
        ("dict.safetensors", "no inputs tensor"),
        ("garbage.pt", "cannot read"),
    ],
)
def test_bad_calibration_file_is_a_one_line_error(dense_run, capsys, tmp_path, content, message):
    from safetensors.torch import save_file

    run, _ = dense_run
    (tmp_path / "text.txt").write_text("hello")
    torch.save(torch.zeros(4, 10), tmp_path / "wrong.pt")
    torch.save(torch.zeros(4, 784, dtype=torch.long), tmp_path / "ints.pt")
    save_file({"a": torch.zeros(2, 784), "b": torch.zeros(2)}, tmp_path / "dict.safetensors")
    (tmp_path / "garbage.pt").write_bytes(b"not a tensor file")
    code, _, err = compress(
        [run, "--calibration-file", tmp_path / content, "--out", tmp_path / "o"], capsys
    )
    assert code == 2
    assert err.startswith("lorank: error:") and len(err.strip().splitlines()) == 1
    assert message in err


def test_loss_tolerance_with_budget_is_an_error(dense_run, capsys, tmp_path):
    run, _ = dense_run
    code, _, err = compress(
        [run, "--budget", "0.5", "--loss-tolerance", "0.1", "--out", tmp_path / "o"], capsys
    )
    assert code == 2 and "pass one of them" in err


CHAR_CONFIG = """\
[data]
name = "tinyshakespeare"
block_size = 32
batch_size = 16
test_subset = 16

[model]
name = "char_transformer"
n_layer = 1
n_head = 2
d_model = 32

[train]
threads = 1
"""


def test_text_calibration_file_of_a_char_transformer(tmp_path, capsys):
    import tomllib

    from lorank.data import load_dataset
    from lorank.models import build_model

    root = os.environ.get("LORANK_DATA")
    if not root or not (Path(root) / "tinyshakespeare").is_dir():
        pytest.skip("no tinyshakespeare: set LORANK_DATA")
    (tmp_path / "char.toml").write_text(CHAR_CONFIG)
    config = validate_config(tomllib.loads(CHAR_CONFIG))
    info = load_dataset(config.data).info
    torch.manual_seed(0)
    torch.save(build_model(config.model, info).state_dict(), tmp_path / "char.pt")
    text = (Path(root) / "tinyshakespeare" / "input.txt").read_text()[:1000]
    (tmp_path / "calib.txt").write_text(text)
    args = [tmp_path / "char.pt", "--model-config", tmp_path / "char.toml", "--svd", "activation"]
    code, _, err = compress(
        [*args, "--calibration-file", tmp_path / "calib.txt", "--budget", "0.5"]
        + ["--out", tmp_path / "out"],
        capsys,
    )
    assert code == 0, err
    s = summary_of(tmp_path / "out")
    # 1000 characters → 31 windows of 32 tokens; every layer saw each token as one row.
    assert set(s["calibration_rows"].values()) == {31 * 32}
    assert s["svd_comparison"]["activation"]["test_loss"] == pytest.approx(s["test_loss_after"])
    (tmp_path / "odd.txt").write_text(text + "€")
    code, _, err = compress(
        [*args, "--calibration-file", tmp_path / "odd.txt", "--out", tmp_path / "o2"], capsys
    )
    assert code == 2 and "'€'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra",
    [
        ["--svd", "activation", "--budget", "0.4", "--error-propagation", "--refit"],
        ["--svd", "activation", "--budget", "0.4", "--allocation", "measured"],
    ],
)
def test_cli_and_in_memory_api_give_identical_factors(dense_run, capsys, extra):
    import tomllib

    from lorank.compress import compress_model
    from lorank.compress.pipeline import options_config
    from lorank.data import load_dataset
    from lorank.training.evaluate import task_loss

    run, base = dense_run
    out = base / ("api-" + "-".join(e.strip("-") for e in extra))
    code, _, err = compress([run, *extra, "--calibration", "256", "--out", out], capsys)
    assert code == 0, err
    config = options_config(
        svd="activation",
        budget=0.4,
        calibration=256,
        allocation="measured" if "measured" in extra else "greedy",
        error_propagation="--error-propagation" in extra,
        refit="--refit" in extra,
    )
    model = lorank.load(run / "model")
    data = load_dataset(validate_config(tomllib.loads(CONFIG)).data)
    report = lorank.compress(
        model,
        config,
        calibration=data.train_subset_batches(256),
        loss_fn=task_loss,
        loss_batches=data.train_subset_batches(config.samples),
        progress=False,
    )
    assert report is not None and isinstance(report, lorank.compress.CompressionReport)
    saved = lorank.load(out / "model").state_dict()
    mine = model.state_dict()
    assert saved.keys() == mine.keys()
    for key, value in saved.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)
    assert summary_of(out)["ranks"] == report.ranks
    assert compress_model is not None


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--budget", "0.5", "--loss-tolerance", "0.1"], "--budget"),
        (["--budget", "0.5", "--error-propagation"], "--svd"),
        (["--loss-tolerance", "0.1", "--allocation", "measured"], "--allocation"),
        (["--budget", "0.5", "--distill", "--distill-steps", "0"], "--distill-steps"),
        # a calibration set of one batch (128 samples) leaves nothing to hold out
        (
            ["--budget", "0.5", "--svd", "activation", "--calibration", "100", "--distill"],
            "--calibration",
        ),
    ],
)
def test_impossible_compress_options_are_one_line_errors_naming_flags(
    dense_run, capsys, extra, flag
):
    run, base = dense_run
    code, _, err = compress([run, *extra, "--out", base / "bad"], capsys)
    assert code == 2, err
    assert err.startswith("lorank: error:") and len(err.strip().splitlines()) == 1
    assert flag in err and "`" not in err
    assert not (base / "bad").exists()


def test_distill_flag_lowers_the_held_out_distance_and_keeps_the_parameter_count(dense_run, capsys):
    run, base = dense_run
    out = base / "distill"
    code, _, err = compress(
        [
            run,
            "--svd",
            "activation",
            "--budget",
            "0.05",
            "--calibration",
            "768",
            "--distill",
            "--distill-steps",
            "50",
            "--distill-lr",
            "3e-4",
            "--distill-holdout",
            "0.2",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    s = summary_of(out)
    d = s["distill"]
    assert d["loss"] == "kl" and d["held_out_batches"] == 1 and d["train_batches"] == 5
    assert d["held_out_after"] < d["held_out_before"]
    assert s["params_eval"] == s["params_eval_after"]
    assert evaluate_checkpoint(out)["test_acc"] == pytest.approx(s["test_acc_after"])


def test_objective_latency_flag_reports_measured_times(dense_run, capsys):
    # Real timers: only what holds whatever the timings are is asserted (a rule, not a
    # budget, which a machine where no layer measures faster would refuse).
    run, base = dense_run
    out = base / "latency"
    code, stdout, err = compress(
        [run, "--rule", "rank=8", "--objective", "latency", "--out", out], capsys
    )
    assert code == 0, err
    s = summary_of(out)
    assert s["objective"] == "latency" and "latency (forward)" in s["rule"]
    t = s["latency"]
    assert t["mode"] == "forward" and t["model_dense_ms"] > 0 and t["model_ms"] > 0
    assert json.loads(stdout)["latency"]["predicted_speedup"] == t["predicted_speedup"]
    for row in s["layers"]:
        assert row["form"] in ("dense", "low-rank") and row["dense_ms"] > 0
        if row["form"] == "low-rank":
            assert row["status"] == "converted" and row["low_rank_ms"] < row["dense_ms"]
        else:
            assert row["status"] == "kept"
    code, _, err = compress(
        [run, "--objective", "fastest", "--out", base / "bad-objective"], capsys
    )
    assert code == 2 and "--objective" in err


def test_library_errors_name_arguments_and_the_cli_names_flags(dense_run, capsys, tmp_path):
    # The library speaks of compress()'s arguments and CompressConfig fields (in backquotes);
    # `lorank compress` says the same with its flags.
    from lorank.compress.pipeline import compress as compress_run
    from lorank.errors import LorankError

    run, base = dense_run
    model = lorank.load(run / "model")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    taken = tmp_path / "taken"
    assert compress([run, "--rule", "rank=4", "--out", taken], capsys)[0] == 0
    cases = [
        # (library call, CLI arguments, the argument the library names, the CLI's flag)
        (
            lambda: compress_run(
                run, "rank=4", tmp_path / "o1", calibration_file=tmp_path / "missing.txt"
            ),
            [run, "--calibration-file", tmp_path / "missing.txt", "--out", tmp_path / "o1"],
            "`calibration_file`",
            "--calibration-file",
        ),
        (
            lambda: compress_run(tmp_path / "weights.pt", "rank=4", tmp_path / "o2"),
            [tmp_path / "weights.pt", "--rule", "rank=4", "--out", tmp_path / "o2"],
            "`model_config`",
            "--model-config",
        ),
        (
            lambda: compress_run(run, "rank=4", taken),
            [run, "--rule", "rank=4", "--out", taken],
            "`overwrite`",
            "--overwrite",
        ),
        (
            lambda: compress_run(run, None, tmp_path / "o3", budget=0.5, loss_tolerance=0.1),
            [run, "--budget", "0.5", "--loss-tolerance", "0.1", "--out", tmp_path / "o3"],
            "`ranks.loss_tolerance`",
            "--loss-tolerance",
        ),
    ]
    for call, args, field, flag in cases:
        with pytest.raises(LorankError) as raised:
            call()
        message = str(raised.value)
        assert field in message and " --" not in message and not message.startswith("--")
        code, _, err = compress(args, capsys)
        assert code == 2 and flag in err and "`" not in err
