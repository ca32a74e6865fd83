"""Gradient-free methods ``pil`` and ``bipil``: the closed-form solves and real-data runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lorank.core.io import load
from lorank.core.rank import delta
from lorank.data import DatasetInfo
from lorank.errors import LorankError
from lorank.methods import build
from lorank.methods._ridge import Gram, principal_projection, ridge
from lorank.models import LeNet5Config, MLPConfig, build_model
from lorank.training.config import load_config
from lorank.training.evaluate import evaluate
from lorank.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def vec_info(d: int, classes: int) -> DatasetInfo:
    return DatasetInfo("synthetic", "classification", (d,), classes, None, 0, 0)


def gram_in_batches(h, y=None, batch=7):
    gram = Gram(h.shape[1], 0 if y is None else y.shape[1])
    for s in range(0, len(h), batch):
        gram.update(h[s : s + batch], None if y is None else y[s : s + batch])
    return gram


def test_ridge_matches_lstsq():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(120, 9, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 9)
    y = torch.randn(120, 4, generator=g, dtype=torch.float64)
    gram = gram_in_batches(h, y)
    # λ = 0: ordinary least squares with an intercept.
    w, b = ridge(gram, 0.0)
    sol = torch.linalg.lstsq(torch.cat([h, torch.ones(120, 1, dtype=h.dtype)], 1), y).solution
    torch.testing.assert_close(w, sol[:-1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, sol[-1], rtol=1e-9, atol=1e-9)
    # λ > 0 (intercept unpenalised): lstsq on the centred system stacked with sqrt(Nλ)·I.
    lam = 0.3
    hc, yc = h - h.mean(0), y - y.mean(0)
    aug = torch.cat([hc, (120 * lam) ** 0.5 * torch.eye(9, dtype=h.dtype)])
    sol = torch.linalg.lstsq(aug, torch.cat([yc, torch.zeros(9, 4, dtype=h.dtype)])).solution
    w, b = ridge(gram, lam)
    torch.testing.assert_close(w, sol, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, y.mean(0) - h.mean(0) @ sol, rtol=1e-9, atol=1e-9)


def test_principal_projection_whitens_the_kept_directions():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64
    )
    w, b, k = principal_projection(gram_in_batches(h), 4, delta(1e-9), signed_pairs=False)
    z = h @ w + b
    assert k == 4
    torch.testing.assert_close(z.mean(0), torch.zeros(4, dtype=h.dtype), atol=1e-9, rtol=0)
    cov = z.T @ z / len(z)
    torch.testing.assert_close(cov, torch.eye(4, dtype=h.dtype), atol=1e-9, rtol=0)


def test_accumulated_gram_training_equals_full_batch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 12, generator=g)
    y = torch.randint(0, 3, (200,), generator=g)
    weights = []
    for batch in (7, 200):
        torch.manual_seed(0)
        model = build_model(MLPConfig(hidden=[16, 10]), vec_info(12, 3))
        batches = [(x[s : s + batch], y[s : s + batch]) for s in range(0, 200, batch)]
        build({"name": "pil"}).fit(model, batches)
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["pil", "bipil"])
def test_linearly_separable_reaches_100_percent_train_accuracy(name):
    g = torch.Generator().manual_seed(3)
    means = 4 * torch.randn(4, 20, generator=g)
    y = torch.arange(400) % 4
    x = means[y] + 0.3 * torch.randn(400, 20, generator=g)
    model = build_model(MLPConfig(hidden=[32, 32]), vec_info(20, 4))
    stats = build({"name": name}).fit(
        model, [(x[s : s + 50], y[s : s + 50]) for s in range(0, 400, 50)]
    )
    assert stats["train_acc"] == 1.0
    assert evaluate(model, [(x, y)])["acc"] == 1.0  # the installed nn.Linear layers agree


def test_pil_interpolates_random_labels_when_wider_than_the_data():
    # PIL's classic property: with more hidden units than samples the output solve is exact.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 20, generator=g)
    y = torch.randint(0, 5, (50,), generator=g)
    model = build_model(MLPConfig(hidden=[100]), vec_info(20, 5))
    stats = build({"name": "pil", "lam": 0.0, "rule": "delta=1e-6"}).fit(model, [(x, y)])
    assert stats["train_acc"] == 1.0


def test_refuses_non_mlp_models(tmp_path):
    lenet = build_model(
        LeNet5Config(), DatasetInfo("mnist", "classification", (1, 28, 28), 10, None, 0, 0)
    )
    for name in ("pil", "bipil"):
        with pytest.raises(
            LorankError, match="fits only the mlp and phil_kim_cnn models, not LeNet5"
        ):
            build({"name": name}).prepare(lenet)
    cfg = load_config(ROOT / "src/lorank/configs/mnist-mlp-pil.toml", ["model={name='lenet5'}"])
    with pytest.raises(LorankError, match="set model.name = 'mlp'"):
        train(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_bipil_greedy_depth_and_saved_architecture(tmp_path, data_root):
    cfg = load_config(
        ROOT / "src/lorank/configs/mnist-mlp-bipil.toml",
        ["data.train_subset=4000", "data.test_subset=2000", "model.hidden=[128, 128, 128]"],
    )
    run = train(cfg, tmp_path / "run", quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test_acc"] > 0.78  # a linear classifier on pixels gets about 0.85
    depth = summary["bipil_depth"]
    assert 1 <= depth <= 3 and summary["bipil_hidden"] == [128] * depth
    acc = summary["bipil_holdout_acc"]
    # The search stops at the first layer that does not help (or at the last layer).
    assert all(b > a for a, b in zip(acc[: depth - 1], acc[1:depth], strict=True))
    assert len(acc) == 3 or acc[depth] <= acc[depth - 1]
    model = load(run / "model")
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == depth + 1
    # Layer 1 stacks the twins; deeper layers are block-diagonal, so their zeros are stored.
    nonzero, stored = summary["bipil_nonzero_params"], summary["params_eval"]
    assert nonzero < stored if depth > 1 else nonzero <= stored


def test_cli_pil_run_on_mnist_subset(tmp_path, data_root):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "lorank",
        "train",
        str(ROOT / "src/lorank/configs/mnist-mlp-pil.toml"),
    ]
    cmd += ["--out", str(out), "--quiet", "--set", "data.train_subset=5000"]
    cmd += ["--set", "data.test_subset=2000", "--set", "model.hidden=[256, 256]"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1
    assert summary["test_acc"] > 0.84
    assert summary["params_eval"] == 784 * 256 + 256 + 256 * 256 + 256 + 2570
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    assert recs[1]["max_rss_mb"] > 0 and recs[1]["train_acc"] > summary["test_acc"] - 0.05
    ev = subprocess.run(
        [sys.executable, "-m", "lorank", "eval", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["test_acc"] == pytest.approx(summary["test_acc"])


@pytest.mark.slow  # the report's figures take most of its ~20 s
def test_compare_has_pil_and_bipil_rows(tmp_path, capsys):
    from lorank.cli import main

    args = ["compare", "--dataset", "synthetic", "--hidden", "32,32", "--methods", "pil,bipil"]
    args += ["--set", "data.synthetic_train=384", "--set", "data.synthetic_test=128"]
    assert main([*args, "--workers", "1", "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for method in ("pil", "bipil"):
        summary = json.loads((tmp_path / "cmp/runs" / f"{method},seed=0/summary.json").read_text())
        assert summary["status"] == "completed" and summary["train_time_s"] > 0
        assert f"| {method} " in printed


# -- Phil Kim's CNN and the original PIL -------------------------------------------------

MNIST_INFO = DatasetInfo("mnist", "classification", (1, 28, 28), 10, None, 0, 0)


def template_images(n: int = 240, classes: int = 4, seed: int = 5):
    """A small separable image set: each class is one random 28x28 template plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 1, 28, 28, generator=g)
    y = torch.arange(n) % classes
    x = templates[y] + 0.3 * torch.randn(n, 1, 28, 28, generator=g)
    return x, y


@pytest.mark.parametrize("name", ["bipil", "pil"])
def test_cnn_fit_reaches_100_percent_train_accuracy_and_reloads(name, tmp_path):
    from lorank.core.io import save
    from lorank.models import PhilKimCNNConfig

    x, y = template_images()
    torch.manual_seed(0)
    # The book's layout with 6 filters and 40 hidden units (600 pooled features instead of
    # 2000), so that the closed-form solves take seconds.
    cfg = PhilKimCNNConfig(filters=6, hidden=[40])
    model = build_model(cfg, MNIST_INFO)
    method = build({"name": name, "patch_images": 100})
    method.prepare(model)
    stats = method.fit(model, [(x[s : s + 60], y[s : s + 60]) for s in range(0, 240, 60)])
    assert stats["train_acc"] == 1.0
    assert evaluate(model, [(x, y)])["acc"] == 1.0  # the installed layers agree

    # The filters are the fit's: ± pairs of orthogonal directions in patch space, centred on
    # the mean patch (the bias cancels it), not PyTorch's random initialisation.
    conv = model.features[0]
    k = method.conv_rank
    assert k is not None and 1 <= k <= 3
    w = conv.weight.detach().flatten(1).double()
    torch.testing.assert_close(w[k : 2 * k], -w[:k])
    gram = w[:k] @ w[:k].T
    torch.testing.assert_close(gram - torch.diag(gram.diag()), torch.zeros(k, k).double())
    patches = torch.nn.functional.unfold(x[:100], 9).transpose(1, 2).reshape(-1, 81).double()
    torch.testing.assert_close(conv.bias.double(), -patches.mean(0) @ w.T, rtol=1e-4, atol=1e-4)

    # The saved model (hidden widths as built) reloads to the same predictions.
    hidden = stats.pop("model", {}).get("hidden", cfg.hidden)
    meta = {"model": cfg.model_dump(mode="json") | {"hidden": hidden}}
    save(model, tmp_path / "model", meta | {"data_info": MNIST_INFO.__dict__, "method": name})
    again = load(tmp_path / "model")
    torch.testing.assert_close(again(x[:8]), model(x[:8]))


def test_cnn_refusals():
    from lorank.models import PhilKimCNNConfig

    no_bias = build_model(PhilKimCNNConfig(bias=False), MNIST_INFO)
    for name in ("pil", "bipil"):
        with pytest.raises(LorankError, match="set model.bias = true"):
            build({"name": name}).prepare(no_bias)
    with pytest.raises(LorankError, match="variant 'original' is for method 'pil' only"):
        build({"name": "bipil", "variant": "original"}).prepare(
            build_model(PhilKimCNNConfig(), MNIST_INFO)
        )


def test_original_pil_stops_once_hh_pinv_is_the_identity():
    # N = 40 samples in d = 5 dimensions: H0 = X has rank 5, so ‖H0 H0⁺ − I‖_F = sqrt(35);
    # one hidden layer W1 = X⁺ gives H1 = tanh(X X⁺), 40 × 40 and of full rank, where the
    # test passes and the output layer W_o = H1⁺ T fits every sample exactly.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 5, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    model = build_model(MLPConfig(hidden=[7, 7, 7], activation="tanh"), vec_info(5, 3))
    opts = {"tolerance": 1e-6, "max_depth": 4, "pinv_rtol": 1e-10}
    method = build({"name": "pil", "variant": "original", **opts})
    stats = method.fit(model, [(x[:25], y[:25]), (x[25:], y[25:])])
    errors = method.errors
    assert errors[0] == pytest.approx(35**0.5, rel=1e-9)
    assert len(errors) == 2 and errors[1] <= 1e-6  # stopped at the first layer that passed
    assert stats["model"] == {"hidden": [40]} and method.hidden == [40]
    linears = [m for m in model.layers if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(40, 5), (3, 40)]
    assert all(float(m.bias.detach().abs().max()) == 0 for m in linears)
    w1 = torch.linalg.pinv(x.double())  # 5 × 40
    torch.testing.assert_close(linears[0].weight.double(), w1.T, rtol=1e-4, atol=1e-5)
    assert stats["train_acc"] == 1.0
    assert method.summary()["pil_errors"] == errors


def test_original_pil_stops_at_max_depth_when_rank_stays_deficient():
    # Two identical samples keep every H rank-deficient (‖HH⁺ − I‖_F ≥ 1 forever).
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 4, generator=g)
    x[1] = x[0]
    y = torch.arange(12) % 2
    model = build_model(MLPConfig(hidden=[8]), vec_info(4, 2))
    method = build({"name": "pil", "variant": "original", "max_depth": 2})
    stats = method.fit(model, [(x, y)])
    assert len(method.errors) == 3 and min(method.errors) >= 1 - 1e-6
    assert stats["model"] == {"hidden": [12, 12]}
    # `samples` caps N (and so the width); the default variant is unchanged.
    method = build({"name": "pil", "variant": "original", "samples": 6})
    assert method.fit(model, [(x, y)])["model"]["hidden"][0] == 6
    assert build({"name": "pil"}).config.variant == "whitened"
